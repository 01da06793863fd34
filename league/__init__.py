"""league: GRPO post-training for Qwen3.5 / Qwen3.6 MoE models, with its own rollout engine."""

__version__ = "0.1.0"
