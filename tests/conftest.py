"""Shared fixtures: tiny Qwen3.5-MoE configurations built with transformers' own config class."""

import os
import warnings

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", message=".*falling back to its reference PyTorch implementation.*")
# tiny models run fastest single-threaded (and the suite runs two workers on two cores)
torch.set_num_threads(1)

# three tiny architectures that vary every dimension the issue lists
TINY_CONFIGS = {
    "gqa2_interval2": dict(
        vocab_size=96,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=24,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        full_attention_interval=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
    ),
    "mha_pattern": dict(
        vocab_size=80,
        hidden_size=48,
        num_hidden_layers=3,
        num_attention_heads=3,
        num_key_value_heads=3,
        head_dim=16,
        linear_num_key_heads=3,
        linear_num_value_heads=3,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        num_experts=5,
        num_experts_per_tok=3,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=16,
        layer_types=["full_attention", "linear_attention", "full_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.5},
    ),
    "gqa4_interval4": dict(
        vocab_size=128,
        hidden_size=96,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=24,
        linear_num_key_heads=2,
        linear_num_value_heads=6,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        num_experts=16,
        num_experts_per_tok=4,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=32,
        full_attention_interval=4,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "partial_rotary_factor": 1.0},
    ),
}


def hf_text_config(name: str, **overrides):
    from transformers import Qwen3_5MoeTextConfig

    return Qwen3_5MoeTextConfig(**{**TINY_CONFIGS[name], **overrides})


def randomize_vectors(model: torch.nn.Module, seed: int = 0) -> None:
    """Give norm weights non-trivial values so that a wrong (1+w) vs w form shows in the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "A_log" not in name and "dt_bias" not in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)


@pytest.fixture(params=sorted(TINY_CONFIGS))
def tiny_config_name(request) -> str:
    return request.param
