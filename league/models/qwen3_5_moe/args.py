"""ModelArgs: the architecture of a Qwen3.5 / Qwen3.6 MoE text model, read from a Hugging Face config.

Accepts the multimodal form (``model_type`` ``qwen3_5_moe`` with a ``text_config``) and the text-only
form (``qwen3_5_moe_text``). Not responsible for weights.
"""

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LAYER_TYPES = ("linear_attention", "full_attention")
TEXT_MODEL_TYPES = ("qwen3_5_moe_text",)
MULTIMODAL_MODEL_TYPES = ("qwen3_5_moe",)

# keys a Hugging Face text config may carry that do not change the text model's math
_IGNORED_KEYS = {
    "architectures",
    "quantization_config",  # FP8 weights: dequantised as they load (checkpoint.fp8)
    "transformers_version",
    "model_type",
    "torch_dtype",
    "use_cache",
    "output_router_logits",
    "initializer_range",
    "attention_dropout",
    "pad_token_id",
    "bos_token_id",
    "decoder_sparse_step",
    "mlp_only_layers",
    "norm_topk_prob",
    "rope_scaling",
    "_name_or_path",
    "return_dict",
    "output_hidden_states",
    "output_attentions",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "tie_encoder_decoder",
    "id2label",
    "label2id",
    "problem_type",
    "tokenizer_class",
    "prefix",
    "sep_token_id",
    "decoder_start_token_id",
    "task_specific_params",
    "base_config_key",
    "dtype",
    "mamba_ssm_dtype",
    "layer_types",
    "full_attention_interval",
    "rope_parameters",
    "rope_theta",
    "partial_rotary_factor",
    "router_aux_loss_coef",
    "mtp_use_dedicated_embeddings",
    "_attn_implementation_autoset",
    "add_cross_attention",
    "tf_legacy_loss",
    "use_bfloat16",
    "pruned_heads",
    "torchscript",
    "cross_attention_hidden_size",
    "finetuning_task",
    "typical_p",
    "vision_config",
}


@dataclass(kw_only=True, slots=True)
class ModelArgs:
    """Architecture hyper-parameters (spec/model.md section 1). Defaults are Qwen3.6-35B-A3B."""

    vocab_size: int = 248320
    """Rows of the embedding and of the output head."""
    dim: int = 2048
    """Hidden size."""
    num_layers: int = 40
    """Decoder layers of the trunk."""
    layer_types: list[str] = field(
        default_factory=lambda: ["linear_attention", "linear_attention", "linear_attention", "full_attention"] * 10
    )
    """``linear_attention`` (Gated DeltaNet) or ``full_attention`` (gated attention) for each layer."""
    num_heads: int = 16
    """Query heads of a full-attention layer."""
    num_kv_heads: int = 2
    """Key/value heads of a full-attention layer."""
    head_dim: int = 256
    """Dimension of one attention head."""
    rope_theta: float = 10_000_000.0
    """RoPE base."""
    partial_rotary_factor: float = 0.25
    """Fraction of ``head_dim`` that RoPE rotates."""
    linear_num_key_heads: int = 16
    """Query/key heads of a Gated DeltaNet layer."""
    linear_num_value_heads: int = 32
    """Value heads of a Gated DeltaNet layer (a multiple of the key heads)."""
    linear_key_head_dim: int = 128
    """Key dimension of a GDN head."""
    linear_value_head_dim: int = 128
    """Value dimension of a GDN head."""
    linear_conv_kernel_dim: int = 4
    """Width of the causal depthwise convolution."""
    num_experts: int = 256
    """Routed experts per MoE block."""
    num_experts_per_tok: int = 8
    """Experts each token is routed to."""
    moe_intermediate_size: int = 512
    """Intermediate size of one routed expert."""
    shared_expert_intermediate_size: int = 512
    """Intermediate size of the shared expert."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    tie_word_embeddings: bool = False
    """Whether the output head reuses the embedding."""
    max_position_embeddings: int = 262144
    """Longest context the checkpoint was made for."""
    mtp_num_layers: int = 1
    """Decoder layers in the multi-token-prediction head (0: no MTP head)."""
    router_aux_loss_coef: float = 0.001
    """Load-balancing loss coefficient (kept for round trips; league's RL recipe uses none)."""
    eos_token_id: list[int] = field(default_factory=lambda: [248044])
    """End-of-sequence token ids."""
    dtype: str = "bfloat16"
    """The checkpoint's parameter dtype."""

    def __post_init__(self) -> None:
        positive = (
            "vocab_size",
            "dim",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "linear_num_key_heads",
            "linear_num_value_heads",
            "linear_key_head_dim",
            "linear_value_head_dim",
            "linear_conv_kernel_dim",
            "num_experts",
            "num_experts_per_tok",
            "moe_intermediate_size",
            "shared_expert_intermediate_size",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
        if self.mtp_num_layers < 0:
            raise ValueError(f"`mtp_num_hidden_layers` must be >= 0, got {self.mtp_num_layers}")
        if len(self.layer_types) != self.num_layers:
            raise ValueError(
                f"`layer_types` has {len(self.layer_types)} entries but `num_hidden_layers` is {self.num_layers}"
            )
        for i, kind in enumerate(self.layer_types):
            if kind not in LAYER_TYPES:
                raise ValueError(f"`layer_types[{i}]` is {kind!r}; expected one of {LAYER_TYPES}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"`num_attention_heads` ({self.num_heads}) must be divisible by `num_key_value_heads` "
                f"({self.num_kv_heads})"
            )
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise ValueError(
                f"`linear_num_value_heads` ({self.linear_num_value_heads}) must be divisible by "
                f"`linear_num_key_heads` ({self.linear_num_key_heads})"
            )
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(
                f"`num_experts_per_tok` ({self.num_experts_per_tok}) exceeds `num_experts` ({self.num_experts})"
            )
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            raise ValueError(f"`partial_rotary_factor` must be in (0, 1], got {self.partial_rotary_factor}")
        if self.rotary_dim % 2 or self.rotary_dim == 0:
            raise ValueError(
                f"rotary dim = partial_rotary_factor ({self.partial_rotary_factor}) x head_dim ({self.head_dim}) "
                f"= {self.rotary_dim} must be a positive even number"
            )
        if self.rope_theta <= 0:
            raise ValueError(f"`rope_theta` must be positive, got {self.rope_theta}")
        if self.norm_eps <= 0:
            raise ValueError(f"`rms_norm_eps` must be positive, got {self.norm_eps}")

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def gdn_key_dim(self) -> int:
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def gdn_value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def gdn_conv_dim(self) -> int:
        return 2 * self.gdn_key_dim + self.gdn_value_dim

    @classmethod
    def from_hf_config(cls, config: dict[str, Any], source: str = "config.json") -> "ModelArgs":
        """Read a Hugging Face config dict (multimodal or text-only). ``source`` names it in errors."""
        model_type = config.get("model_type")
        if model_type in MULTIMODAL_MODEL_TYPES:
            text = config.get("text_config")
            if not isinstance(text, dict):
                raise ValueError(f"{source}: model_type {model_type!r} needs a `text_config` object")
            text = dict(text)
            text.setdefault("tie_word_embeddings", config.get("tie_word_embeddings", False))
            if text.get("model_type", "qwen3_5_moe_text") not in TEXT_MODEL_TYPES:
                raise ValueError(f"{source}: text_config.model_type {text.get('model_type')!r} is not supported")
        elif model_type in TEXT_MODEL_TYPES:
            text = config
        else:
            raise ValueError(
                f"{source}: model_type {model_type!r} is not supported; expected one of "
                f"{MULTIMODAL_MODEL_TYPES + TEXT_MODEL_TYPES}"
            )
        try:
            return _text_args(text)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from None

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelArgs":
        """Read ``config.json`` from a checkpoint folder."""
        config_path = Path(path) / "config.json"
        if not config_path.is_file():
            raise ValueError(f"{config_path}: no such file (a checkpoint folder needs a config.json)")
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_path}: not valid JSON ({e})") from None
        if not isinstance(config, dict):
            raise ValueError(f"{config_path}: expected a JSON object")
        return cls.from_hf_config(config, source=str(config_path))

    def to_hf_config(self) -> dict[str, Any]:
        """The text-only Hugging Face config (``qwen3_5_moe_text``) that transformers loads."""
        return {
            "architectures": ["Qwen3_5MoeForCausalLM"],
            "model_type": "qwen3_5_moe_text",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "num_hidden_layers": self.num_layers,
            "layer_types": list(self.layer_types),
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "attn_output_gate": True,
            "attention_bias": False,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": self.rope_theta,
                "partial_rotary_factor": self.partial_rotary_factor,
                "mrope_section": _mrope_section(self.rotary_dim),
                "mrope_interleaved": True,
            },
            "partial_rotary_factor": self.partial_rotary_factor,
            "linear_num_key_heads": self.linear_num_key_heads,
            "linear_num_value_heads": self.linear_num_value_heads,
            "linear_key_head_dim": self.linear_key_head_dim,
            "linear_value_head_dim": self.linear_value_head_dim,
            "linear_conv_kernel_dim": self.linear_conv_kernel_dim,
            "num_experts": self.num_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "moe_intermediate_size": self.moe_intermediate_size,
            "shared_expert_intermediate_size": self.shared_expert_intermediate_size,
            "hidden_act": "silu",
            "rms_norm_eps": self.norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "mtp_num_hidden_layers": self.mtp_num_layers,
            "mtp_use_dedicated_embeddings": False,
            "router_aux_loss_coef": self.router_aux_loss_coef,
            "eos_token_id": self.eos_token_id[0] if len(self.eos_token_id) == 1 else list(self.eos_token_id),
            "dtype": self.dtype,
            "mamba_ssm_dtype": "float32",
        }

    def replace(self, **changes: Any) -> "ModelArgs":
        return dataclasses.replace(self, **changes)


def _mrope_section(rotary_dim: int) -> list[int]:
    """Split R/2 frequency slots over (T, H, W) as the published config does (32 -> [11, 11, 10])."""
    half = rotary_dim // 2
    base, extra = divmod(half, 3)
    return [base + (1 if i < extra else 0) for i in range(3)]


def _text_args(text: dict[str, Any]) -> ModelArgs:
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"):
        if key not in text:
            raise KeyError(f"missing required key `{key}`")
    unknown = sorted(k for k in text if k not in _IGNORED_KEYS and k not in _READ_KEYS)
    if unknown:
        warnings.warn(f"config keys not used by league: {unknown}", stacklevel=3)
    if text.get("hidden_act", "silu") != "silu":
        raise ValueError(f"`hidden_act` {text['hidden_act']!r} is not supported (expected 'silu')")
    if text.get("attention_bias", False):
        raise ValueError("`attention_bias` true is not supported (the Qwen3.5 MoE family has no attention biases)")
    if not text.get("attn_output_gate", True):
        raise ValueError("`attn_output_gate` false is not supported (the Qwen3.5 MoE family gates attention)")
    if text.get("mtp_use_dedicated_embeddings", False):
        raise ValueError("`mtp_use_dedicated_embeddings` true is not supported (the MTP head shares the embedding)")
    rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"`rope_parameters.rope_type` {rope_type!r} is not supported (expected 'default')")
    rope_theta = rope.get("rope_theta", text.get("rope_theta", 10_000.0))
    partial = rope.get("partial_rotary_factor", text.get("partial_rotary_factor", 0.25))
    num_layers = text["num_hidden_layers"]
    layer_types = text.get("layer_types")
    if layer_types is None:
        interval = text.get("full_attention_interval", 4)
        if not isinstance(interval, int) or interval <= 0:
            raise ValueError(f"`full_attention_interval` must be a positive integer, got {interval!r}")
        layer_types = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(num_layers)]
    eos = text.get("eos_token_id")
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    num_heads = text["num_attention_heads"]
    return ModelArgs(
        vocab_size=text["vocab_size"],
        dim=text["hidden_size"],
        num_layers=num_layers,
        layer_types=list(layer_types),
        num_heads=num_heads,
        num_kv_heads=text["num_key_value_heads"],
        head_dim=text.get("head_dim") or text["hidden_size"] // num_heads,
        rope_theta=float(rope_theta),
        partial_rotary_factor=float(partial),
        linear_num_key_heads=text.get("linear_num_key_heads", 16),
        linear_num_value_heads=text.get("linear_num_value_heads", 32),
        linear_key_head_dim=text.get("linear_key_head_dim", 128),
        linear_value_head_dim=text.get("linear_value_head_dim", 128),
        linear_conv_kernel_dim=text.get("linear_conv_kernel_dim", 4),
        num_experts=text.get("num_experts", 256),
        num_experts_per_tok=text.get("num_experts_per_tok", 8),
        moe_intermediate_size=text.get("moe_intermediate_size", 512),
        shared_expert_intermediate_size=text.get("shared_expert_intermediate_size", 512),
        norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(text.get("tie_word_embeddings", False)),
        max_position_embeddings=text.get("max_position_embeddings", 32768),
        mtp_num_layers=text.get("mtp_num_hidden_layers", 0),
        router_aux_loss_coef=float(text.get("router_aux_loss_coef", 0.001)),
        eos_token_id=eos_ids,
        dtype=str(text.get("dtype") or text.get("torch_dtype") or "bfloat16"),
    )


_READ_KEYS = {
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "attention_bias",
    "attn_output_gate",
    "linear_num_key_heads",
    "linear_num_value_heads",
    "linear_key_head_dim",
    "linear_value_head_dim",
    "linear_conv_kernel_dim",
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "rms_norm_eps",
    "tie_word_embeddings",
    "max_position_embeddings",
    "mtp_num_hidden_layers",
    "eos_token_id",
}
