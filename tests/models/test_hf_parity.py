"""league's forward equals transformers' Qwen3_5MoeForCausalLM on the same weights (fp32)."""

import torch
from transformers import Qwen3_5MoeForCausalLM

from league.checkpoint.qwen3_5_moe import from_hf
from league.models.qwen3_5_moe import ForwardBatch, ModelArgs, Transformer
from tests.conftest import hf_text_config, randomize_vectors


def build_pair(name: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = hf_text_config(name, **overrides)
    hf = Qwen3_5MoeForCausalLM(config).eval()
    randomize_vectors(hf, seed)
    args = ModelArgs.from_hf_config(config.to_dict())
    ours = Transformer(args).eval()
    ours.load_state_dict(from_hf(hf.state_dict(), args.moe_intermediate_size, args.num_experts), strict=False)
    return hf, ours


def test_packed_batch_matches_transformers(tiny_config_name):
    hf, ours = build_pair(tiny_config_name)
    lengths = [150, 201, 67, 1]
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, ours.args.vocab_size, (n,), generator=gen) for n in lengths]
    with torch.no_grad():
        logits = ours.logits(ours(torch.cat(seqs), ForwardBatch.packed(lengths)))
        start = 0
        for seq in seqs:
            reference = hf(seq[None]).logits[0]
            assert (reference - logits[start : start + len(seq)]).abs().max().item() < 1e-5
            start += len(seq)


def test_multimodal_config_reads_text_config():
    from transformers import Qwen3_5MoeConfig

    text = hf_text_config("gqa2_interval2")
    config = Qwen3_5MoeConfig(
        text_config=text.to_dict(),
        vision_config={"depth": 1, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64, "out_hidden_size": 64},
    )
    args = ModelArgs.from_hf_config(config.to_dict())
    assert args == ModelArgs.from_hf_config(text.to_dict())
    assert args.layer_types == ["linear_attention", "full_attention"] * 2
    assert args.rotary_dim == 8
