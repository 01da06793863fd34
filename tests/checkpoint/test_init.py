"""``init_checkpoint``: the streamed random checkpoint equals ``Transformer.init_weights``; the 35B preset's
tensor list and parameter count (never materialised); layer patterns; presets."""

import json

import pytest
import torch

from league.checkpoint.hf import hf_config, hf_tensor_specs, load_model, meta_model
from league.checkpoint.init import init_checkpoint, iter_init_tensors, preset_args
from league.checkpoint.safetensors import list_tensors
from league.models.qwen3_5_moe import ModelArgs, Transformer
from league.models.qwen3_5_moe.presets import PRESETS
from league.tokenizer import EOS_TOKEN_ID, VOCAB
from tests.checkpoint.helpers import assert_same_params

L, F = "linear_attention", "full_attention"


def test_tiny_init_equals_init_weights(tmp_path):
    folder = init_checkpoint("tiny", tmp_path / "tiny", seed=7)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in folder.iterdir()
    }
    assert ModelArgs.from_dir(folder) == PRESETS["tiny"]
    reference = Transformer(PRESETS["tiny"])
    reference.init_weights(7)
    assert_same_params(reference, load_model(folder))


def test_streamed_values_match_init_weights_in_bfloat16():
    args = preset_args("tiny", num_layers=2, dtype="bfloat16")
    reference = Transformer(args).to(torch.bfloat16)
    reference.init_weights(3)
    streamed = dict(iter_init_tensors(meta_model(args, torch.bfloat16), seed=3))
    params = dict(reference.named_parameters())
    assert streamed.keys() == params.keys()
    assert all(streamed[k].dtype == torch.bfloat16 and torch.equal(streamed[k], params[k]) for k in params)


def test_init_dtype_shards_and_overwrite(tmp_path):
    out = tmp_path / "ckpt"
    init_checkpoint("tiny", out, num_layers=1, mtp_num_layers=0, dtype="bfloat16", max_shard_bytes=200_000)
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["mtp_num_hidden_layers"] == 0 and config["num_hidden_layers"] == 1
    listing = list_tensors(out)
    assert {info.dtype for info in listing.values()} == {"BF16"} and len({i.file for i in listing.values()}) > 1
    assert not any(name.startswith("mtp.") for name in listing)
    with pytest.raises(ValueError, match="not empty"):
        init_checkpoint("tiny", out)
    init_checkpoint("tiny", out, force=True)
    assert ModelArgs.from_dir(out) == PRESETS["tiny"]
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        init_checkpoint("huge", tmp_path / "x")
    with pytest.raises(ValueError, match="dtype 'int8'"):
        init_checkpoint("tiny", tmp_path / "x", dtype="int8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def big_param_count(num_layers: int = 40, num_full: int = 10, mtp: bool = True) -> tuple[int, int]:
    """(text, MTP) parameters of Qwen3.6-35B-A3B, from the shapes of spec/model.md section 3."""
    dim, vocab, experts, inter, shared = 2048, 248320, 256, 512, 512
    moe = experts * dim + experts * 2 * inter * dim + experts * dim * inter + 3 * shared * dim + dim
    norms = 2 * dim
    gdn = 8192 * dim + 4096 * dim + 2 * 32 * dim + 8192 * 4 + 32 + 32 + 128 + dim * 4096
    attn = 8192 * dim + 2 * 512 * dim + dim * 4096 + 2 * 256
    text = 2 * vocab * dim + dim + num_layers * (norms + moe) + (num_layers - num_full) * gdn + num_full * attn
    mtp_params = dim * 2 * dim + 3 * dim + norms + moe + attn
    return text, mtp_params if mtp else 0


def test_big_preset_tensor_list_without_materialising():
    model = meta_model(preset_args("qwen3.6-35b-a3b"), torch.bfloat16)
    specs = dict(hf_tensor_specs(model))
    shapes = {spec.name: spec.shape for spec in specs.values()}
    assert all(spec.dtype == torch.bfloat16 for spec in specs.values())
    assert shapes["model.embed_tokens.weight"] == (248320, 2048) and shapes["lm_head.weight"] == (248320, 2048)
    assert shapes["model.layers.0.linear_attn.in_proj_qkv.weight"] == (8192, 2048)
    assert shapes["model.layers.0.linear_attn.conv1d.weight"] == (8192, 1, 4)
    assert shapes["model.layers.3.self_attn.q_proj.weight"] == (8192, 2048)
    assert shapes["model.layers.39.mlp.experts.gate_up_proj"] == (256, 1024, 2048)
    assert shapes["model.layers.39.mlp.experts.down_proj"] == (256, 2048, 512)
    assert shapes["mtp.fc.weight"] == (2048, 4096) and shapes["mtp.layers.0.mlp.experts.gate_up_proj"] == (
        256,
        1024,
        2048,
    )
    assert (
        "model.layers.40.input_layernorm.weight" not in shapes
        and "model.layers.4.self_attn.q_proj.weight" not in shapes
    )
    text, mtp = big_param_count()
    assert text == 34_660_610_688  # spec/model.md: 34.66 B text parameters
    assert mtp == 844_640_768
    numel = {name: torch.Size(shape).numel() for name, shape in shapes.items()}
    assert sum(n for name, n in numel.items() if not name.startswith("mtp.")) == text
    assert sum(numel.values()) == text + mtp


@pytest.mark.parametrize(
    "preset, num_layers, expected",
    [
        ("qwen3.6-35b-a3b", 2, [L, L]),
        ("qwen3.6-35b-a3b", 6, [L, L, L, F, L, L]),
        ("qwen3.6-35b-a3b", None, [L, L, L, F] * 10),
        ("tiny", 6, [L, L, L, F, L, L]),
        ("tiny", 8, [L, L, L, F] * 2),
    ],
)
def test_num_layers_keeps_the_pattern(preset, num_layers, expected):
    args = preset_args(preset, num_layers=num_layers)
    assert args.layer_types == expected and args.num_layers == len(expected)
    assert ModelArgs.from_hf_config(hf_config(args)) == args


def test_big_preset_with_two_layers_lists_its_tensors():
    args = preset_args("qwen3.6-35b-a3b", num_layers=2)
    names = [spec.name for _, spec in hf_tensor_specs(meta_model(args, torch.bfloat16))]
    assert "model.layers.1.linear_attn.A_log" in names and not any(".layers.2." in n for n in names)
    text, mtp = big_param_count(num_layers=2, num_full=0)
    assert sum(p.numel() for p in meta_model(args, torch.bfloat16).parameters()) == text + mtp


def test_presets():
    big = PRESETS["qwen3.6-35b-a3b"]
    assert big == ModelArgs(layer_types=[L, L, L, F] * 10)
    assert [i for i, kind in enumerate(big.layer_types) if kind == F] == list(range(3, 40, 4))
    tiny = PRESETS["tiny"]
    assert tiny.vocab_size % 64 == 0 and len(VOCAB) <= tiny.vocab_size < len(VOCAB) + 64
    assert tiny.eos_token_id == [EOS_TOKEN_ID] and tiny.dtype == "float32" and tiny.mtp_num_layers == 1
    assert tiny.layer_types == [L, L, L, F] and tiny.rotary_dim == 8
