"""The reference system's model arguments (Megatron's names, from its model file for Qwen3.5 / Qwen3.6 MoE), accepted
on league's command line so the reference's command lines run as they are.

league takes the architecture from the checkpoint's ``config.json`` (or the preset), so these are checks, not
settings: a value equal to the architecture's passes silently; a different one is an error naming the flag, both
values and where the architecture came from. Flags that describe what league's model always is (RMSNorm (1 + w),
RoPE, SwiGLU, softmax router in fp32, gated attention output, gated shared expert, no biases, QK norm) must have that
value; flags that choose an implementation without changing the result (grouped GEMM, permute fusion, token
dispatcher, the model spec module) are accepted with any value. Not responsible for building the model.
"""

import math
from dataclasses import dataclass
from typing import Any

from league.models.qwen3_5_moe.args import ModelArgs


@dataclass(kw_only=True, slots=True)
class MegatronModelArgs:
    """The reference's model arguments (Megatron names), each checked against the policy's architecture; None: not
    given."""

    num_layers: int | None = None
    """Decoder layers (config.json num_hidden_layers)."""
    hidden_size: int | None = None
    """Model width (hidden_size)."""
    num_attention_heads: int | None = None
    """Query heads of the full-attention layers."""
    num_query_groups: int | None = None
    """Key/value heads of the full-attention layers."""
    group_query_attention: bool | None = None
    """Grouped-query attention (league's model: always)."""
    kv_channels: int | None = None
    """Head dim of the full-attention layers."""
    ffn_hidden_size: int | None = None
    """Dense FFN width: a placeholder in the reference (every layer is MoE); any value."""
    normalization: str | None = None
    """RMSNorm (league's model: always)."""
    apply_layernorm_1p: bool | None = None
    """Zero-centred (1 + w) norms (league's model: always)."""
    norm_epsilon: float | None = None
    """RMSNorm epsilon (rms_norm_eps)."""
    position_embedding_type: str | None = None
    """rope (league's model: always)."""
    rotary_percent: float | None = None
    """Fraction of the head dim rotated (partial_rotary_factor)."""
    rotary_base: float | None = None
    """RoPE base (rope_theta)."""
    swiglu: bool | None = None
    """SwiGLU experts (league's model: always)."""
    untie_embeddings_and_output_weights: bool | None = None
    """Separate output head (not tie_word_embeddings)."""
    vocab_size: int | None = None
    """Vocabulary size."""
    disable_bias_linear: bool | None = None
    """No biases in projections (league's model: always)."""
    qk_layernorm: bool | None = None
    """RMSNorm on queries and keys (league's model: always)."""
    attention_output_gate: bool | None = None
    """Sigmoid gate on the attention output (league's model: always)."""
    num_experts: int | None = None
    """Routed experts per MoE layer."""
    moe_router_topk: int | None = None
    """Experts per token (num_experts_per_tok)."""
    moe_ffn_hidden_size: int | None = None
    """Routed expert width (moe_intermediate_size)."""
    moe_shared_expert_intermediate_size: int | None = None
    """Shared expert width (shared_expert_intermediate_size)."""
    moe_shared_expert_gate: bool | None = None
    """Sigmoid gate on the shared expert (league's model: always)."""
    moe_router_score_function: str | None = None
    """softmax (league's router: always)."""
    moe_router_dtype: str | None = None
    """fp32 (league's router: always)."""
    moe_aux_loss_coeff: float | None = None
    """Load-balancing loss weight: league trains without one, so 0."""
    moe_layer_freq: str | None = None
    """Which layers are MoE: all of them (``[1]*N`` or ``1``)."""
    moe_grouped_gemm: bool | None = None
    """Grouped expert GEMMs: an implementation choice (league groups experts its own way); any value."""
    moe_permute_fusion: bool | None = None
    """Fused token permutation: an implementation choice; any value."""
    moe_token_dispatcher_type: str | None = None
    """Megatron's token dispatcher (alltoall, flex): an implementation choice; any value."""
    moe_token_drop_policy: str | None = None
    """Which tokens a full expert drops: league drops none (no capacity factor); any value."""
    spec: list[str] | None = None
    """The Megatron model-spec module and function: league's model is its own; any value."""


def architecture_values(args: ModelArgs) -> dict[str, Any]:
    """What each checked flag must be for ``args``."""
    return {
        "num_layers": args.num_layers,
        "hidden_size": args.dim,
        "num_attention_heads": args.num_heads,
        "num_query_groups": args.num_kv_heads,
        "group_query_attention": True,
        "kv_channels": args.head_dim,
        "normalization": "RMSNorm",
        "apply_layernorm_1p": True,
        "norm_epsilon": args.norm_eps,
        "position_embedding_type": "rope",
        "rotary_percent": args.partial_rotary_factor,
        "rotary_base": args.rope_theta,
        "swiglu": True,
        "untie_embeddings_and_output_weights": not args.tie_word_embeddings,
        "vocab_size": args.vocab_size,
        "disable_bias_linear": True,
        "qk_layernorm": True,
        "attention_output_gate": True,
        "num_experts": args.num_experts,
        "moe_router_topk": args.num_experts_per_tok,
        "moe_ffn_hidden_size": args.moe_intermediate_size,
        "moe_shared_expert_intermediate_size": args.shared_expert_intermediate_size,
        "moe_shared_expert_gate": True,
        "moe_router_score_function": "softmax",
        "moe_router_dtype": "fp32",
        "moe_aux_loss_coeff": 0.0,
    }


def check_architecture(given: MegatronModelArgs, args: ModelArgs, source: str) -> None:
    """Every flag given agrees with the architecture (a ValueError naming the first that does not)."""
    every_layer = ("1", f"[1]*{args.num_layers}")
    if given.moe_layer_freq is not None and given.moe_layer_freq.replace(" ", "") not in every_layer:
        raise ValueError(
            f"`--moe-layer-freq` {given.moe_layer_freq!r}: every layer of the {source} is MoE (`[1]*{args.num_layers}`)"
        )
    for name, want in architecture_values(args).items():
        value = getattr(given, name)
        if value is None:
            continue
        same = math.isclose(value, want, rel_tol=1e-12) if isinstance(want, float) else value == want
        if not same:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"`{flag}` {value!r} differs from the policy's architecture: {want!r} in the {source}")
