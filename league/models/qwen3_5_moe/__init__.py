"""Qwen3.5 / Qwen3.6 MoE: Gated DeltaNet + gated attention + sparse MoE, with a multi-token-prediction head."""

from league.models.qwen3_5_moe.args import ModelArgs
from league.models.qwen3_5_moe.batch import AttentionCache, ForwardBatch, GDNCache, ModelCache, Pages
from league.models.qwen3_5_moe.model import Transformer

__all__ = ["AttentionCache", "ForwardBatch", "GDNCache", "ModelArgs", "ModelCache", "Pages", "Transformer"]
