"""Named architectures: the published Qwen3.6-35B-A3B and a tiny model of the same family for CPU runs.

Not responsible for weights (``league init`` writes random ones, ``checkpoint.hf`` loads real ones).
Each entry is shared: derive variants with ``PRESETS[name].replace(...)`` rather than mutating it.
"""

from league.models.qwen3_5_moe.args import ModelArgs

TINY = ModelArgs(
    vocab_size=128,  # the tiny character tokenizer's 85 tokens, rounded up to a multiple of 64
    dim=128,
    num_layers=4,
    layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
    num_heads=4,
    num_kv_heads=2,
    head_dim=32,
    rope_theta=10_000.0,
    partial_rotary_factor=0.25,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=32,
    linear_value_head_dim=32,
    linear_conv_kernel_dim=4,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=64,
    shared_expert_intermediate_size=64,
    max_position_embeddings=4096,
    mtp_num_layers=1,
    eos_token_id=[81],  # the tiny tokenizer's end-of-sequence token
    dtype="float32",
)
"""A few hundred thousand parameters; its vocabulary is :mod:`league.tokenizer`'s, padded to 64."""

QWEN3_6_35B_A3B = ModelArgs(
    layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"] * 10
)
"""spec/model.md section 1: the ModelArgs defaults, with every 4th layer (3, 7, ..., 39) full attention."""

PRESETS: dict[str, ModelArgs] = {
    "qwen3.6-35b-a3b": QWEN3_6_35B_A3B,
    "tiny": TINY,
}
"""Preset name -> architecture."""


def with_num_layers(args: ModelArgs, num_layers: int) -> ModelArgs:
    """``args`` with ``num_layers`` decoder layers, repeating its layer-type pattern from the start.

    Args:
        args (ModelArgs): the architecture to shorten or lengthen.
        num_layers (int): decoder layers of the result (>= 1).
    """
    if num_layers < 1:
        raise ValueError(f"`num_layers` must be >= 1, got {num_layers}")
    pattern = args.layer_types
    return args.replace(num_layers=num_layers, layer_types=[pattern[i % len(pattern)] for i in range(num_layers)])
