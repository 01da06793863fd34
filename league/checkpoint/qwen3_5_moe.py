"""State-dict adapter between league's parameter names and the published Hugging Face names.

Pure functions over names and tensors; one visible table drives loading, saving and weight sync.
Not responsible for files (see ``checkpoint.safetensors``).

Hugging Face layout: text weights under ``model.language_model.`` (multimodal checkpoints) or ``model.``
(text-only), ``lm_head.weight`` and ``mtp.*`` at the top level, ``model.visual.*`` (not used here).
Routed experts are fused (``mlp.experts.gate_up_proj`` [E, 2I, D], ``mlp.experts.down_proj`` [E, D, I],
no ``.weight``) or stored one by one (``mlp.experts.{e}.{gate,up,down}_proj.weight``); both load.
"""

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch

MULTIMODAL_PREFIX = "model.language_model."
TEXT_PREFIX = "model."

# league name -> Hugging Face name, for names outside the decoder layers ("{text}" = the text-model prefix)
TOP_LEVEL_MAP = {
    "tok_embeddings.weight": "{text}embed_tokens.weight",
    "norm.weight": "{text}norm.weight",
    "output.weight": "lm_head.weight",
    "mtp.fc.weight": "mtp.fc.weight",
    "mtp.embed_norm.weight": "mtp.pre_fc_norm_embedding.weight",
    "mtp.hidden_norm.weight": "mtp.pre_fc_norm_hidden.weight",
    "mtp.norm.weight": "mtp.norm.weight",
}

# league name -> Hugging Face name inside one decoder layer (trunk "{text}layers.{i}." and MTP "mtp.layers.{j}.")
LAYER_MAP = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "attn.q_norm.weight": "self_attn.q_norm.weight",
    "attn.k_norm.weight": "self_attn.k_norm.weight",
    "gdn.w_qkv.weight": "linear_attn.in_proj_qkv.weight",
    "gdn.w_z.weight": "linear_attn.in_proj_z.weight",
    "gdn.w_b.weight": "linear_attn.in_proj_b.weight",
    "gdn.w_a.weight": "linear_attn.in_proj_a.weight",
    "gdn.conv_weight": "linear_attn.conv1d.weight",  # [C, W] here, [C, 1, W] there
    "gdn.dt_bias": "linear_attn.dt_bias",
    "gdn.A_log": "linear_attn.A_log",
    "gdn.norm_weight": "linear_attn.norm.weight",
    "gdn.wo.weight": "linear_attn.out_proj.weight",
    "moe.router.weight": "mlp.gate.weight",
    "moe.experts.w_gate_up": "mlp.experts.gate_up_proj",
    "moe.experts.w_down": "mlp.experts.down_proj",
    "moe.shared.w_gate.weight": "mlp.shared_expert.gate_proj.weight",
    "moe.shared.w_up.weight": "mlp.shared_expert.up_proj.weight",
    "moe.shared.w_down.weight": "mlp.shared_expert.down_proj.weight",
    "moe.shared_gate.weight": "mlp.shared_expert_gate.weight",
}
_LAYER_MAP_INV = {hf: ours for ours, hf in LAYER_MAP.items()}
_PER_EXPERT = re.compile(r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
_LAYER_PREFIX = re.compile(r"^(layers|mtp\.layers)\.(\d+)\.(.+)$")


@dataclass(frozen=True, slots=True)
class Target:
    """Where one Hugging Face tensor goes: a league parameter, or one expert's part of a fused one.

    ``expert`` is None for a whole parameter; ``part`` is ``gate``/``up`` (halves of ``w_gate_up[expert]``)
    or ``down`` (``w_down[expert]``).
    """

    name: str
    expert: int | None = None
    part: str | None = None


def detect_text_prefix(hf_names: Iterable[str]) -> str:
    """``model.language_model.`` if any name uses it, else ``model.``."""
    return MULTIMODAL_PREFIX if any(n.startswith(MULTIMODAL_PREFIX) for n in hf_names) else TEXT_PREFIX


def is_skipped(hf_name: str) -> bool:
    """Tensors league does not use: the vision tower."""
    return hf_name.startswith("model.visual.") or hf_name.startswith("visual.")


def hf_to_league(hf_name: str, text_prefix: str) -> Target | None:
    """Map one Hugging Face tensor name to its :class:`Target`; None if the name is not part of the model."""
    for ours, theirs in TOP_LEVEL_MAP.items():
        if theirs.format(text=text_prefix) == hf_name:
            return Target(ours)
    if hf_name.startswith(text_prefix + "layers."):
        rel = hf_name[len(text_prefix) :]
    elif hf_name.startswith("mtp.layers."):
        rel = hf_name
    else:
        return None
    match = _LAYER_PREFIX.match(rel)
    if match is None:
        return None
    head, index, rest = match.groups()
    base = f"{head}.{index}."
    if rest in _LAYER_MAP_INV:
        return Target(base + _LAYER_MAP_INV[rest])
    per_expert = _PER_EXPERT.fullmatch(rest)
    if per_expert:
        expert, proj = int(per_expert.group(1)), per_expert.group(2)
        fused = "moe.experts.w_down" if proj == "down_proj" else "moe.experts.w_gate_up"
        return Target(base + fused, expert=expert, part=proj.removesuffix("_proj"))
    return None


def league_to_hf(name: str, text_prefix: str) -> str:
    """The Hugging Face name of a league parameter (fused experts)."""
    if name in TOP_LEVEL_MAP:
        return TOP_LEVEL_MAP[name].format(text=text_prefix)
    head, index, rest = _LAYER_PREFIX.match(name).groups()
    prefix = f"{text_prefix}layers.{index}." if head == "layers" else f"mtp.layers.{index}."
    return prefix + LAYER_MAP[rest]


def to_league_tensor(target: Target, tensor: torch.Tensor) -> torch.Tensor:
    """Layout change from the Hugging Face tensor to the league one (only the conv kernel differs)."""
    if target.name.endswith("gdn.conv_weight"):
        return tensor.reshape(tensor.shape[0], tensor.shape[-1])
    return tensor


def to_hf_tensor(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Layout change from a league parameter to its Hugging Face tensor (the conv kernel gains a middle dim)."""
    if name.endswith("gdn.conv_weight"):
        return tensor.reshape(tensor.shape[0], 1, tensor.shape[-1])
    return tensor


def expert_slice(target: Target, intermediate: int) -> tuple[int | slice, ...]:
    """Index into the fused parameter for a per-expert tensor: ``w_gate_up[e, :I]`` (gate),
    ``w_gate_up[e, I:]`` (up) or ``w_down[e]`` (down)."""
    if target.part == "gate":
        return (target.expert, slice(0, intermediate))
    if target.part == "up":
        return (target.expert, slice(intermediate, 2 * intermediate))
    return (target.expert,)


def from_hf(hf_sd: dict[str, torch.Tensor], moe_intermediate_size: int, num_experts: int) -> dict[str, torch.Tensor]:
    """Whole-state-dict conversion Hugging Face -> league (per-expert tensors are fused)."""
    prefix = detect_text_prefix(hf_sd)
    out: dict[str, torch.Tensor] = {}
    for hf_name, tensor in hf_sd.items():
        target = hf_to_league(hf_name, prefix)
        if target is None:
            continue
        if target.expert is None:
            out[target.name] = to_league_tensor(target, tensor)
            continue
        if target.name not in out:
            shape = (
                (num_experts, 2 * moe_intermediate_size, tensor.shape[1])
                if target.part != "down"
                else (num_experts, tensor.shape[0], moe_intermediate_size)
            )
            out[target.name] = tensor.new_zeros(shape)
        out[target.name][expert_slice(target, moe_intermediate_size)] = tensor
    return out


def to_hf(sd: dict[str, torch.Tensor], text_prefix: str = TEXT_PREFIX) -> dict[str, torch.Tensor]:
    """Whole-state-dict conversion league -> Hugging Face (fused experts, ``mtp.*`` included)."""
    return {league_to_hf(name, text_prefix): to_hf_tensor(name, t) for name, t in sd.items()}
