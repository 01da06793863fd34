"""Shared fixtures: tiny Qwen3.5-MoE configurations built with transformers' own config class."""

import json
import os
import warnings

import pytest
import torch
from filelock import FileLock

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


@pytest.fixture(scope="session")
def demo_metrics(tmp_path_factory, worker_id) -> list[dict]:
    """The metrics of the embedded default (`league train`'s tiny recipe) in one process, from one run per test
    session: the first pytest-xdist worker to ask runs it, the others wait for its metrics (the demo's own test and
    the runs across ranks compared with it share them)."""
    from league.config import apply_overrides
    from league.recipes import get_recipe
    from league.rl.loop import train
    from league.rl.metrics import read_metrics

    shared = tmp_path_factory.getbasetemp() if worker_id == "master" else tmp_path_factory.getbasetemp().parent
    results = shared / "demo_metrics.json"
    with FileLock(f"{results}.lock"):
        if not results.is_file():
            overrides = {"run_dir": str(shared / "demo_run"), "tensorboard": False, "reward_num_workers": 1}
            results.write_text(json.dumps(read_metrics(train(apply_overrides(get_recipe("tiny"), overrides)))))
        return json.loads(results.read_text())
