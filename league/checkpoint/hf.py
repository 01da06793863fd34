"""Hugging Face checkpoint folders in and out of a league :class:`Transformer`, tensor by tensor.

Loading copies each tensor of the folder into its parameter in place (a per-expert tensor into its slice
of the fused expert weight), so host memory stays near one copy of the weights; everything is checked
against the folder's headers before the first copy, so a bad checkpoint leaves the model untouched.
Saving writes the published naming (fused experts, ``mtp.*`` included), sharded with an index above a
size limit. ``league init`` (``checkpoint.init``) writes random checkpoints with the same naming.

Not responsible for the name map (``checkpoint.qwen3_5_moe``), the file format (``checkpoint.safetensors``)
or training state (``checkpoint.dcp``).
"""

import dataclasses
import json
import logging
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from league.checkpoint.fp8 import FP8_NAMES, SCALE_SUFFIX, dequantize
from league.checkpoint.qwen3_5_moe import (
    MULTIMODAL_PREFIX,
    TEXT_PREFIX,
    Target,
    detect_text_prefix,
    expert_slice,
    hf_to_league,
    is_skipped,
    league_to_hf,
    to_hf_tensor,
    to_league_tensor,
)
from league.checkpoint.safetensors import (
    DEFAULT_MAX_SHARD_BYTES,
    TensorInfo,
    TensorSpec,
    iter_tensors,
    list_tensors,
    staged_folder,
    write_tensors,
)
from league.models.qwen3_5_moe.args import ModelArgs
from league.models.qwen3_5_moe.model import Transformer
from league.ops.rope import rope_inv_freq

logger = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "generation_config.json",
)
"""Files copied from ``tokenizer_from`` by :func:`save_hf` when present."""
DTYPE_NAMES = ("float32", "bfloat16", "float16")
"""Parameter dtypes a checkpoint may be loaded in or written with."""
_SHOWN = 5


@dataclass(kw_only=True, slots=True)
class LoadReport:
    """What :func:`load_hf_weights` did."""

    folder: Path
    """The checkpoint folder."""
    text_prefix: str
    """``model.language_model.`` (multimodal naming) or ``model.`` (text-only)."""
    num_loaded: int = 0
    """Checkpoint tensors copied into the model."""
    num_skipped_visual: int = 0
    """``model.visual.*`` tensors skipped (the vision tower)."""
    num_skipped_mtp: int = 0
    """``mtp.*`` tensors skipped because the model has no MTP head."""
    unexpected: list[str] = field(default_factory=list)
    """Tensors that are not part of the model (ignored, with a warning)."""
    scales: dict[str, TensorInfo] = field(default_factory=dict)
    """The block scales of each FP8 weight to load, by the weight's name (``checkpoint.fp8``)."""


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``float32`` / ``bfloat16`` / ``float16`` (or a torch dtype) -> torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype {name!r} is not supported; expected one of {DTYPE_NAMES}")
    return getattr(torch, name)


def resolve_device_dtype(device: str | None, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    """Where and in what dtype to run: ``None`` (or ``auto``) picks cuda when available, and bfloat16 on a GPU,
    float32 on the CPU. Asking for cuda without a CUDA device is an error."""
    name = device if device not in (None, "auto") else ("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(name)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but no CUDA device is available")
    if dtype in (None, "auto"):
        return resolved, torch.bfloat16 if resolved.type == "cuda" else torch.float32
    return resolved, parse_dtype(dtype)


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def meta_model(args: ModelArgs, dtype: torch.dtype) -> Transformer:
    """The model on the meta device (names, shapes and dtypes, no memory), parameters in ``dtype``.

    Parameters the model creates with an explicit dtype keep it; the RoPE table stays fp32.
    """
    with _default_dtype(dtype), torch.device("meta"):
        return Transformer(args)


def empty_model(args: ModelArgs, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Transformer:
    """The model with allocated but uninitialised parameters (no random init is paid for); buffers filled.

    Args:
        args (ModelArgs): the architecture.
        device (str | torch.device): where the parameters live. Default: ``cpu``.
        dtype (torch.dtype): parameter dtype. Default: ``torch.float32``.
    """
    model = meta_model(args, dtype).to_empty(device=device)
    buffers = dict(model.named_buffers())
    # the only buffer is derived from the config; anything new must be filled here
    assert set(buffers) == {"inv_freq"}, f"empty_model does not know how to fill buffers {sorted(buffers)}"
    with torch.no_grad():
        buffers["inv_freq"].copy_(rope_inv_freq(args.rotary_dim, args.rope_theta))
    return model


def load_model(
    folder: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None
) -> Transformer:
    """Build a :class:`Transformer` from a Hugging Face checkpoint folder (config.json + safetensors).

    Args:
        folder (str | Path): the checkpoint folder (multimodal or text-only, fused or per-expert experts).
        device (str | torch.device): where the parameters live. Default: ``cpu``.
        dtype (str | torch.dtype, Optional): parameter dtype. Default: the config's ``dtype``.
    """
    args = ModelArgs.from_dir(folder)
    model = empty_model(args, device, parse_dtype(dtype or args.dtype))
    load_hf_weights(model, folder)
    return model


def load_hf_weights(model: Transformer, folder: str | Path, strict: bool = False, layout=None) -> LoadReport:
    """Copy a checkpoint folder's tensors into ``model``'s parameters in place, one tensor at a time.

    Each tensor is converted to its parameter's dtype and device. ``model.visual.*`` is skipped (one log
    line); ``mtp.*`` is skipped when the model has no MTP head; other tensors that are not part of the
    model are ignored with a warning, unless ``strict``.

    Args:
        model (Transformer): the model to fill (its config decides what must be there).
        folder (str | Path): the checkpoint folder.
        strict (bool): the checkpoint must be of the model's architecture (its config.json, where there is one,
            gives the same :class:`ModelArgs` but for the dtype), hold floating-point tensors only, and no tensor
            the model does not have (the vision tower aside): a weight update of a running engine. Default:
            ``False``.

    Raises:
        ValueError: before any parameter is changed, as :func:`plan_hf_load` says; with ``strict``, also when the
            architecture differs (naming the first differences).
        layout (EngineLayout, Optional): the model is an engine's, laid out over its ranks
            (``parallel.inference``): each rank reads every tensor and keeps its part. Default: None (whole).
    """
    folder = Path(folder)
    if strict and (folder / "config.json").is_file():
        _check_same_architecture(ModelArgs.from_dir(folder), model.args, folder)
    params = dict(model.named_parameters())
    plan, report = plan_hf_load(folder, whole_parameters(model, layout), model.args, strict)
    targets = {info.name: target for info, target in plan}
    with torch.no_grad():
        for info, tensor in iter_tensors(info for info, _ in plan):
            target = targets[info.name]
            if info.name in report.scales:  # FP8: dequantised (to the parameter's dtype below)
                _, scale_inv = next(iter_tensors([report.scales[info.name]]))
                tensor = dequantize(tensor, scale_inv)
            copy_into(params, target, to_league_tensor(target, tensor), model.args, layout)
            report.num_loaded += 1
    return report


def whole_parameters(model: Transformer, layout=None) -> dict[str, torch.Tensor]:
    """``model``'s parameters by name, whole: the model's own, or, laid out over an engine's ranks (``layout``
    sharding anything), a meta model's of the same architecture (for names and shapes)."""
    params = dict(model.named_parameters())
    if layout is None or (layout.tp == 1 and layout.ep == 1):
        return params
    with torch.device("meta"):
        whole = dict(Transformer(model.args).named_parameters())
    return {name: whole[name] for name in params}


def copy_into(params: dict[str, torch.Tensor], target: Target, value: torch.Tensor, args: ModelArgs, layout=None):
    """Copy a whole parameter's value, or one expert's part of a fused one, into its parameter in place; with an
    engine ``layout``, this rank's part of it (nothing when another rank holds that expert)."""
    param = params[target.name]
    if target.expert is None:
        param.copy_(value if layout is None else layout.local_part(args, target.name, value))
        return
    expert = target.expert if layout is None else layout.local_expert(args, target.expert)
    if expert is not None:
        param[expert_slice(dataclasses.replace(target, expert=expert), args.moe_intermediate_size)].copy_(value)


def plan_hf_load(
    folder: Path, params: dict[str, torch.Tensor], args: ModelArgs, strict: bool = False
) -> tuple[list[tuple[TensorInfo, Target]], LoadReport]:
    """Which tensor of a checkpoint folder goes where among ``params`` (a model's parameters, or a meta model's:
    only names and shapes are read), checked whole from the files' headers: every parameter covered once, every
    shape right. ``model.visual.*`` is skipped (one log line), ``mtp.*`` too when ``params`` has no MTP head; other
    tensors that are not parameters are ignored with a warning, unless ``strict``.

    Returns:
        ``(tensor, target)`` pairs to read, and a :class:`LoadReport` whose ``num_loaded`` is still 0.

    Raises:
        ValueError: when a tensor has the wrong shape (naming the tensor, its file, the expected and found shapes),
            when parameters are missing (naming the first few, with their league names), including single experts of
            a per-expert layout; with ``strict``, when a dtype is not floating point or a tensor is not a parameter.
    """
    listing = list_tensors(folder)
    scales = {n.removesuffix(SCALE_SUFFIX): info for n, info in listing.items() if n.endswith(SCALE_SUFFIX)}
    listing = {n: info for n, info in listing.items() if not n.endswith(SCALE_SUFFIX)}
    for name, info in listing.items():
        if info.dtype in FP8_NAMES and name not in scales:
            raise ValueError(f"{info.file}: FP8 tensor {name} has no block scales ({name}{SCALE_SUFFIX})")
    if strict:
        _check_float_dtypes(listing, folder)
    has_mtp = any(name.startswith("mtp.") for name in params)
    report = LoadReport(folder=folder, text_prefix=detect_text_prefix(listing))
    plan: list[tuple[TensorInfo, Target]] = []
    covered: dict[str, set] = {name: set() for name in params}
    for hf_name, info in listing.items():
        if is_skipped(hf_name):
            report.num_skipped_visual += 1
            continue
        target = hf_to_league(hf_name, report.text_prefix)
        if target is None or target.name not in params:
            if hf_name.startswith("mtp.") and not has_mtp:
                report.num_skipped_mtp += 1
            else:
                report.unexpected.append(hf_name)
            continue
        _check_shape(info, target, params[target.name], args)
        part = "all" if target.expert is None else (target.expert, target.part)
        seen = covered[target.name]
        if part in seen or "all" in seen or (part == "all" and seen):
            raise ValueError(f"{info.file}: tensor {hf_name} duplicates weights already given for {target.name}")
        covered[target.name].add(part)
        plan.append((info, target))
        if info.dtype in FP8_NAMES:
            report.scales[hf_name] = scales[hf_name]
    _check_complete(covered, params, args, report)
    if report.num_skipped_visual:
        logger.info("%s: skipped %d vision-tower tensors (model.visual.*)", folder, report.num_skipped_visual)
    if report.num_skipped_mtp:
        logger.info("%s: skipped %d mtp.* tensors (the model has no MTP head)", folder, report.num_skipped_mtp)
    if report.unexpected and strict:
        shown = ", ".join(report.unexpected[:_SHOWN])
        more = f" and {len(report.unexpected) - _SHOWN} more" if len(report.unexpected) > _SHOWN else ""
        raise ValueError(f"{folder}: {len(report.unexpected)} tensors are not part of the running model: {shown}{more}")
    if report.unexpected:
        shown = ", ".join(report.unexpected[:10]) + (", ..." if len(report.unexpected) > 10 else "")
        warnings.warn(
            f"{folder}: ignored {len(report.unexpected)} tensors that are not part of the model: {shown}", stacklevel=3
        )
    return plan, report


FLOAT_DTYPES = ("F32", "BF16", "F16", *FP8_NAMES)
"""safetensors dtypes a parameter can be loaded from (FP8 with its block scales)."""


def _check_same_architecture(found: ModelArgs, expected: ModelArgs, folder: Path) -> None:
    """The checkpoint's config against the running model's, all fields but the dtype."""
    ours, theirs = dataclasses.asdict(expected), dataclasses.asdict(found)
    differ = [name for name in ours if name != "dtype" and ours[name] != theirs[name]]
    if differ:
        shown = ", ".join(f"{name} {theirs[name]!r:.60} (running: {ours[name]!r:.60})" for name in differ[:_SHOWN])
        raise ValueError(f"{folder}/config.json is another architecture than the running model's: {shown}")


def _check_float_dtypes(listing: dict[str, TensorInfo], folder: Path) -> None:
    other = [info for info in listing.values() if info.dtype not in FLOAT_DTYPES and not is_skipped(info.name)]
    if other:
        shown = ", ".join(f"{info.name} ({info.dtype})" for info in other[:_SHOWN])
        raise ValueError(
            f"{folder}: {len(other)} tensors are not floating point ({', '.join(FLOAT_DTYPES)}): {shown}; "
            "quantized checkpoints cannot update a running engine"
        )


def _expected_hf_shape(target: Target, param: torch.Tensor, args: ModelArgs) -> tuple[int, ...]:
    if target.expert is None:
        return tuple(to_hf_tensor(target.name, torch.empty(param.shape, device="meta")).shape)
    if target.part == "down":
        return (args.dim, args.moe_intermediate_size)
    return (args.moe_intermediate_size, args.dim)


def _check_shape(info: TensorInfo, target: Target, param: torch.Tensor, args: ModelArgs) -> None:
    expected = _expected_hf_shape(target, param, args)
    if tuple(info.shape) != expected:
        raise ValueError(
            f"{info.file}: tensor {info.name} has shape {list(info.shape)}, expected {list(expected)} "
            f"(league parameter {target.name}; does config.json match the weights?)"
        )
    if target.expert is not None and target.expert >= args.num_experts:
        raise ValueError(
            f"{info.file}: tensor {info.name} is expert {target.expert}, but the config has {args.num_experts} experts"
        )


def _check_complete(
    covered: dict[str, set], params: dict[str, torch.Tensor], args: ModelArgs, report: LoadReport
) -> None:
    missing: list[tuple[str, str]] = []
    for name in params:
        parts = covered[name]
        if "all" in parts:
            continue
        if name.endswith(("moe.experts.w_gate_up", "moe.experts.w_down")) and parts:
            kinds = ("down",) if name.endswith("w_down") else ("gate", "up")
            fused = league_to_hf(name, report.text_prefix)
            expert_prefix = fused.rsplit(".", 1)[0]
            for expert in range(args.num_experts):
                for kind in kinds:
                    if (expert, kind) not in parts:
                        missing.append((f"{expert_prefix}.{expert}.{kind}_proj.weight", f"{name}[{expert}]"))
            continue
        missing.append((league_to_hf(name, report.text_prefix), name))
    if missing:
        shown = ", ".join(f"{hf} ({ours})" for hf, ours in missing[:_SHOWN])
        more = f" and {len(missing) - _SHOWN} more" if len(missing) > _SHOWN else ""
        raise ValueError(
            f"{report.folder}: {len(missing)} tensors the config needs are missing from the checkpoint: {shown}{more}"
        )


def hf_config(args: ModelArgs, text_prefix: str = TEXT_PREFIX) -> dict[str, Any]:
    """config.json for ``args``: text-only (``qwen3_5_moe_text``) for ``model.`` naming, the multimodal
    form (``qwen3_5_moe`` with a ``text_config``, no vision tower) for ``model.language_model.`` naming."""
    text = args.to_hf_config()
    if text["eos_token_id"] == []:
        text["eos_token_id"] = None
    if text_prefix == TEXT_PREFIX:
        return text
    text.pop("architectures")
    return {
        "architectures": ["Qwen3_5MoeForConditionalGeneration"],
        "model_type": "qwen3_5_moe",
        "text_config": text,
        "tie_word_embeddings": args.tie_word_embeddings,
        "dtype": args.dtype,
    }


def hf_tensor_specs(model: Transformer, text_prefix: str = TEXT_PREFIX) -> list[tuple[str, TensorSpec]]:
    """(league name, Hugging Face :class:`TensorSpec`) for each parameter, in ``named_parameters`` order.

    Works on a meta-device model, so the published checkpoint's tensor list costs no memory.
    """
    return [
        (
            name,
            TensorSpec(
                name=league_to_hf(name, text_prefix),
                shape=tuple(to_hf_tensor(name, torch.empty(p.shape, device="meta")).shape),
                dtype=p.dtype,
            ),
        )
        for name, p in model.named_parameters()
    ]


def save_hf(
    model: Transformer,
    folder: str | Path,
    *,
    text_prefix: str = TEXT_PREFIX,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    tokenizer_from: Any = None,
    dtype: str | torch.dtype | None = None,
    force: bool = False,
) -> Path:
    """Write ``model`` as a Hugging Face checkpoint folder that transformers and league load.

    config.json, fused experts (``mlp.experts.gate_up_proj`` / ``down_proj``), ``mtp.*`` when the model has
    an MTP head, one ``model.safetensors`` or shards with ``model.safetensors.index.json``. Parameters are
    moved to the host one at a time. The folder appears complete or not at all.

    Args:
        model (Transformer): the model to save (any device).
        folder (str | Path): the checkpoint folder to create.
        text_prefix (str): ``model.`` (text-only, ``Qwen3_5MoeForCausalLM``) or ``model.language_model.``
            (the multimodal naming of the published checkpoints). Default: ``model.``.
        max_shard_bytes (int): tensor bytes per shard at most. Default: 5 GB.
        tokenizer_from (str | Path | tokenizer, Optional): a folder whose tokenizer files are copied, or a
            tokenizer object with ``save_pretrained``. Default: none.
        dtype (str | torch.dtype, Optional): cast every tensor to this dtype. Default: keep each one's.
        force (bool): replace a non-empty ``folder``. Default: ``False``.
    """
    if text_prefix not in (TEXT_PREFIX, MULTIMODAL_PREFIX):
        raise ValueError(f"`text_prefix` {text_prefix!r} must be {TEXT_PREFIX!r} or {MULTIMODAL_PREFIX!r}")
    cast = None if dtype is None else parse_dtype(dtype)
    params = dict(model.named_parameters())
    specs = hf_tensor_specs(model, text_prefix)
    if cast is not None:
        specs = [(name, TensorSpec(name=s.name, shape=s.shape, dtype=cast)) for name, s in specs]
    args = saved_args(model, cast)

    def tensors() -> Iterator[torch.Tensor]:
        for name, spec in specs:
            yield to_hf_tensor(name, params[name].detach()).to(device="cpu", dtype=spec.dtype)

    with staged_folder(folder, force) as stage:
        write_config(stage, hf_config(args, text_prefix))
        write_tensors(stage, [spec for _, spec in specs], tensors(), max_shard_bytes)
        if tokenizer_from is not None:
            copy_tokenizer(tokenizer_from, stage)
    return Path(folder)


def saved_args(model: Transformer, dtype: torch.dtype | None = None) -> ModelArgs:
    """The architecture a checkpoint of ``model`` declares: its ``args`` (the MTP layers it was built with, none when
    its head was dropped: ``args`` say so) with its parameters' dtype (or ``dtype``). ``model`` may be a pipeline
    stage's part: its ``args`` are the whole policy's."""
    saved_dtype = dtype or next(model.parameters()).dtype
    return model.args.replace(dtype=str(saved_dtype).removeprefix("torch."))


def write_config(folder: Path, config: dict[str, Any]) -> None:
    """``folder/config.json``."""
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def copy_tokenizer(source: Any, folder: Path) -> None:
    """A tokenizer's files into ``folder``: from a folder (those of :data:`TOKENIZER_FILES` it has; none is an error),
    or saved by a tokenizer object's ``save_pretrained``."""
    if hasattr(source, "save_pretrained"):
        source.save_pretrained(folder)
        return
    source = Path(source)
    if not copy_files(source, folder, TOKENIZER_FILES):
        raise ValueError(f"{source}: no tokenizer files (expected some of {', '.join(TOKENIZER_FILES[:3])}, ...)")


def copy_files(source: Path, folder: Path, names: tuple[str, ...]) -> list[str]:
    """Copy those of ``names`` that are files in ``source`` into ``folder``; returns the names copied."""
    found = [name for name in names if (source / name).is_file()]
    for name in found:
        shutil.copy2(source / name, folder / name)
    return found


def load_named_tensors(
    model: Transformer, named: list[tuple[str, torch.Tensor]], layout=None, whole: dict | None = None
) -> int:
    """Copy ``(name, tensor)`` pairs into ``model``'s parameters in place: names as in a Hugging Face checkpoint
    (per-expert or fused experts, ``mtp.*``; the vision tower's are skipped) or league's own parameter names, whole
    tensors (an engine laid out over ranks, ``layout``, keeps its part of each). Every pair is checked (name, shape,
    floating-point dtype) before the first copy, so a bad update changes nothing. Returns the number of tensors
    copied. ``whole``: :func:`whole_parameters` of the model, when the caller keeps it."""
    params = whole if whole is not None else whole_parameters(model, layout)
    prefix = detect_text_prefix(name for name, _ in named)
    plan = []
    for name, tensor in named:
        if is_skipped(name):
            continue
        native = name in params
        target = Target(name) if native else hf_to_league(name, prefix)
        if target is None or target.name not in params:
            raise ValueError(f"no parameter of the model is named {name!r} (Hugging Face or league names)")
        if not tensor.is_floating_point():
            raise ValueError(f"{name} has dtype {tensor.dtype}; a floating-point tensor is needed")
        param = params[target.name]
        expected = tuple(param.shape) if native else _expected_hf_shape(target, param, model.args)
        if tuple(tensor.shape) != expected:
            raise ValueError(f"{name} has shape {list(tensor.shape)}, expected {list(expected)}")
        if target.expert is not None and target.expert >= model.args.num_experts:
            raise ValueError(f"{name} is expert {target.expert}, but the model has {model.args.num_experts} experts")
        plan.append((target, tensor, native))
    held = dict(model.named_parameters())
    with torch.no_grad():
        for target, tensor, native in plan:
            copy_into(held, target, tensor if native else to_league_tensor(target, tensor), model.args, layout)
    return len(plan)
