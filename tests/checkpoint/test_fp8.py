"""FP8 checkpoints in the model's FP8 release layout (projections in float8_e4m3fn with 128 x 128 block scales):
quantisation round-trips within FP8's precision, `league init --dtype fp8` writes one, and loading dequantises
it exactly (the loaded weights are ``fp8 * scale_inv`` of the files) for training and for the engine."""

import json

import pytest
import torch
from typer.testing import CliRunner

from league.checkpoint.fp8 import BLOCK, SCALE_SUFFIX, dequantize, is_quantized, quantize
from league.checkpoint.hf import load_model
from league.checkpoint.init import init_checkpoint
from league.checkpoint.safetensors import iter_tensors, list_tensors
from league.cli import app
from league.engine.config import EngineConfig
from league.engine.engine import LLMEngine
from league.engine.request import SamplingParams


@pytest.mark.parametrize("shape", [(256, 384), (130, 70), (3, 200, 129)])
def test_block_quantisation_round_trip(shape):
    w = torch.randn(shape) * torch.logspace(-3, 1, shape[-1])  # columns of very different scales
    q, scale_inv = quantize(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert scale_inv.shape == (*shape[:-2], -(-shape[-2] // BLOCK), -(-shape[-1] // BLOCK))
    back = dequantize(q, scale_inv)
    # e4m3 keeps 3 mantissa bits: within 2**-4 of each element's block maximum, relative to it
    blocks = scale_inv.repeat_interleave(BLOCK, -2).repeat_interleave(BLOCK, -1)[..., : shape[-2], : shape[-1]]
    assert ((back - w).abs() <= blocks * 448 * 2**-4 + 1e-12).all()
    with pytest.raises(ValueError, match="block scales"):
        dequantize(q, scale_inv[..., :-1])


def test_init_fp8_writes_the_release_layout_and_loads_dequantised(tmp_path):
    result = CliRunner().invoke(app, ["init", "--preset", "tiny", "--out", str(tmp_path / "fp8"), "--dtype", "fp8"])
    assert result.exit_code == 0, result.output
    folder = tmp_path / "fp8"
    listing = list_tensors(folder)
    quantized = [n for n in listing if is_quantized(n)]
    assert quantized and all(listing[n].dtype == "F8_E4M3" and n + SCALE_SUFFIX in listing for n in quantized)
    assert listing["model.embed_tokens.weight"].dtype == "BF16" and listing["lm_head.weight"].dtype == "BF16"
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [128, 128]

    model = load_model(folder, "cpu", torch.float32)
    files = dict(iter_tensors(listing.values()))
    by_name = {info.name: t for info, t in files.items()}
    hf_name = "model.layers.0.linear_attn.in_proj_qkv.weight"
    expected = dequantize(by_name[hf_name], by_name[hf_name + SCALE_SUFFIX])
    assert torch.equal(model.layers[0].gdn.w_qkv.weight.detach(), expected)
    assert torch.equal(model.tok_embeddings.weight.detach(), by_name["model.embed_tokens.weight"].float())

    # the same weights in bf16: the FP8 model is close to them, and the engine serves it
    plain = load_model(init_checkpoint("tiny", tmp_path / "bf16", dtype="bfloat16"), "cpu", torch.float32)
    w_fp8, w_bf16 = model.layers[0].gdn.w_qkv.weight.detach(), plain.layers[0].gdn.w_qkv.weight.detach()
    assert (w_fp8 - w_bf16).abs().max() <= w_bf16.abs().max() * 2**-3
    out = LLMEngine(model, EngineConfig(context_length=64)).generate([[5, 6, 7]], SamplingParams(max_new_tokens=4))
    assert len(out[0].output_ids) == 4


def test_an_fp8_weight_without_scales_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = init_checkpoint("tiny", tmp_path / "fp8", dtype="fp8")
    shard = next(folder.glob("*.safetensors"))
    tensors = load_file(shard)
    name = next(n for n in tensors if n.endswith(SCALE_SUFFIX))
    del tensors[name]
    save_file(tensors, shard)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"].pop(name, None)
        index.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="has no block scales"):
        load_model(folder, "cpu", torch.float32)
