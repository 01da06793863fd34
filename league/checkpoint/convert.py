"""``league convert``: Hugging Face checkpoint folders to DCP folders and back, streaming, by one process or by the
ranks of a torchrun launch together.

hf-to-dcp writes the weights as ``model.<league name>`` tensors (fused experts, the conv kernel as league holds it;
each tensor in the dtype the folder stores it in), the folder's config.json (with ``mtp_num_hidden_layers`` 0 when
the MTP layer is dropped) and its tokenizer files: what ``league train --load`` reads, at any number of ranks.
dcp-to-hf writes the published naming (fused experts, ``mtp.*``; ``model.language_model.`` when config.json is the
multimodal form), sharded with an index above 5 GB, with the DCP folder's config.json and tokenizer files: a folder
that transformers and league load. Of a training checkpoint it writes the policy (``model.*``).

Host memory is bounded by one tensor (hf-to-dcp makes each league tensor when DCP's writer asks for it) or by a bucket
of tensors (dcp-to-hf reads ``bucket_bytes`` at a time), never the model. Across ranks, hf-to-dcp gives each rank a
share of the tensors (balanced by bytes; each rank writes its own DCP file) and dcp-to-hf a share of the output's
shards; the output is the same as one process's.

torch's ``HuggingFaceStorageReader`` / ``Writer`` are not used: they read or write under the Hugging Face names and
layouts (per-expert or fused, the conv kernel's extra dimension) and hold the whole state dict, while this goes
through league's name map one tensor at a time.

Not responsible for the name map (``checkpoint.qwen3_5_moe``), the safetensors files (``checkpoint.safetensors``) or
DCP's mechanics (``checkpoint.dcp``).
"""

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from league.checkpoint import dcp
from league.checkpoint.hf import TOKENIZER_FILES, copy_files, meta_model, plan_hf_load
from league.checkpoint.qwen3_5_moe import (
    MULTIMODAL_PREFIX,
    TEXT_PREFIX,
    Target,
    expert_slice,
    league_to_hf,
    to_hf_tensor,
    to_league_tensor,
)
from league.checkpoint.safetensors import (
    DEFAULT_MAX_SHARD_BYTES,
    DTYPES,
    TensorInfo,
    TensorSpec,
    iter_tensors,
    plan_shards,
    shard_names,
    write_index,
    write_shard,
)
from league.checks import check_writable
from league.models.qwen3_5_moe.args import MULTIMODAL_MODEL_TYPES, ModelArgs

CONFIG_FILE = "config.json"
MODEL_PREFIX = "model."
"""The DCP names of the policy's weights: ``model.<league name>`` (as in ``league train``'s checkpoints)."""
BUCKET_BYTES = 1 << 30
"""Tensor bytes dcp-to-hf reads at a time (a bigger tensor is read alone)."""
_TORCH_DTYPES = {name: dtype for dtype, name in DTYPES.items()}


def hf_to_dcp(
    hf_checkpoint: str | Path,
    save: str | Path,
    mtp_num_layers: int | None = None,
    force: bool = False,
    group: dist.ProcessGroup | None = None,
) -> Path:
    """Convert a Hugging Face checkpoint folder into a DCP folder (see the module docstring).

    Args:
        hf_checkpoint (str | Path): the folder (one file or sharded; text-only or multimodal naming, the vision tower
            skipped; fused or per-expert experts, ``mtp.*`` in either layout).
        save (str | Path): the DCP folder to create; absent or empty unless ``force``.
        mtp_num_layers (int, Optional): 0 drops the MTP layer; otherwise it must be the checkpoint's. Default:
            ``None`` (the checkpoint's).
        force (bool): replace a non-empty ``save``. Default: ``False``.
        group (ProcessGroup, Optional): the ranks converting together, each a share of the tensors. Default:
            ``None`` (this process alone).

    Raises:
        ValueError: naming the flag, before anything is written: no such folder, no config.json, a tensor of the
            wrong shape, missing or duplicated tensors, an ``mtp_num_layers`` other than 0 or the checkpoint's.
    """
    source, save = Path(hf_checkpoint), Path(save)
    if not source.is_dir():
        raise ValueError(f"`--hf-checkpoint` {source}: no such folder")
    _check_output(save, force)
    args = ModelArgs.from_dir(source)
    if mtp_num_layers not in (None, 0, args.mtp_num_layers):
        raise ValueError(
            f"`--mtp-num-layers` {mtp_num_layers} does not match the checkpoint's mtp_num_hidden_layers "
            f"({args.mtp_num_layers}); give 0 to drop the MTP layer, or leave it out to keep it"
        )
    if mtp_num_layers == 0:
        args = args.replace(mtp_num_layers=0)
    params = dict(meta_model(args, torch.float32).named_parameters())
    plan, report = plan_hf_load(source, params, args)
    if report.scales:
        raise ValueError(
            f"{source} holds FP8 weights with block scales; converting them to DCP is not available: train from it "
            "with --hf-checkpoint (dequantised as it loads)"
        )
    parts: dict[str, list[tuple[TensorInfo, Target]]] = {name: [] for name in params}
    for info, target in plan:
        parts[target.name].append((info, target))
    dtypes = {name: _stored_dtype(source, pieces) for name, pieces in parts.items()}
    sizes = [params[name].numel() * dtypes[name].itemsize for name in params]
    owners = share_by_size(sizes, dcp.group_size(group))
    mine = [name for name, owner in zip(params, owners) if owner == dcp.group_rank(group)]
    tensors = {MODEL_PREFIX + n: torch.empty(params[n].shape, dtype=dtypes[n], device="meta") for n in mine}

    def produce(key: str) -> torch.Tensor:
        name = key.removeprefix(MODEL_PREFIX)
        return _assemble(parts[name], params[name].shape, dtypes[name], args.moe_intermediate_size)

    with dcp.staged_together(save, group, force) as stage:
        dcp.save_tensors(stage, tensors, group, produce)
        if dcp.group_rank(group) == 0:
            _write_hf_config(source, stage, args.mtp_num_layers)
            copy_files(source, stage, TOKENIZER_FILES)
    return save


def dcp_to_hf(
    load: str | Path,
    save: str | Path,
    force: bool = False,
    group: dist.ProcessGroup | None = None,
    unsafe_pickle: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    bucket_bytes: int = BUCKET_BYTES,
) -> Path:
    """Convert the policy of a DCP folder (``hf-to-dcp``'s or a ``league train`` checkpoint) into a Hugging Face
    folder (see the module docstring).

    Args:
        load (str | Path): the DCP folder, or a folder of checkpoints whose ``latest`` file names one.
        save (str | Path): the folder to create; absent or empty unless ``force``.
        force (bool): replace a non-empty ``save``. Default: ``False``.
        group (ProcessGroup, Optional): the ranks converting together, each writing a share of the shards. Default:
            ``None`` (this process alone).
        unsafe_pickle (bool): unpickle the folder's ``.metadata`` without restriction (``dcp.read_metadata``).
            Default: ``False``.
        max_shard_bytes (int): tensor bytes per output file at most. Default: 5 GB.
        bucket_bytes (int): tensor bytes read at a time. Default: :data:`BUCKET_BYTES`.

    Raises:
        ValueError: naming the flag, before anything is written: not a DCP folder, no config.json, tensors the
            config's model needs missing from the folder or of another shape.
    """
    folder, save = dcp.find_checkpoint(load), Path(save)
    _check_output(save, force)
    args = ModelArgs.from_dir(folder)
    entries = dcp.list_tensors(folder, unsafe_pickle)
    params = dict(meta_model(args, torch.float32).named_parameters())
    dcp.check_loadable(folder, entries, {MODEL_PREFIX + n: p for n, p in params.items()}, "--load")
    config = json.loads((folder / CONFIG_FILE).read_text())
    prefix = MULTIMODAL_PREFIX if config.get("model_type") in MULTIMODAL_MODEL_TYPES else TEXT_PREFIX
    specs = {
        name: TensorSpec(
            name=league_to_hf(name, prefix),
            shape=tuple(to_hf_tensor(name, p).shape),
            dtype=entries[MODEL_PREFIX + name].dtype,
        )
        for name, p in params.items()
    }
    league_names = {spec.name: name for name, spec in specs.items()}
    shards = plan_shards(list(specs.values()), max_shard_bytes)
    files = shard_names(len(shards))
    with dcp.staged_together(save, group, force) as stage:
        for i, (file_name, shard) in enumerate(zip(files, shards)):
            if i % dcp.group_size(group) == dcp.group_rank(group):
                names = [league_names[spec.name] for spec in shard]
                write_shard(
                    stage / file_name,
                    shard,
                    _read_in_buckets(folder, names, params, entries, bucket_bytes, unsafe_pickle),
                )
        if dcp.group_rank(group) == 0:
            write_index(stage, files, shards)
            copy_files(folder, stage, (CONFIG_FILE, *TOKENIZER_FILES))
    return save


def share_by_size(sizes: list[int], world: int) -> list[int]:
    """The rank of each item when ``world`` ranks share items of these sizes: largest first, each to the rank with
    the fewest bytes so far (the lowest such rank), so the shares differ by at most the largest item."""
    loads, owners = [0] * world, [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        owners[i] = min(range(world), key=lambda r: (loads[r], r))
        loads[owners[i]] += sizes[i]
    return owners


def buckets(sizes: list[int], bucket_bytes: int) -> list[list[int]]:
    """Consecutive indices of ``sizes`` grouped into buckets of at most ``bucket_bytes`` (a bigger item alone)."""
    out: list[list[int]] = []
    total = 0
    for i, size in enumerate(sizes):
        if not out or total + size > bucket_bytes:
            out.append([])
            total = 0
        out[-1].append(i)
        total += size
    return out


def _read_in_buckets(
    folder: Path,
    names: list[str],
    params: dict[str, torch.Tensor],
    entries: dict[str, dcp.TensorEntry],
    bucket_bytes: int,
    unsafe_pickle: bool,
) -> Iterator[torch.Tensor]:
    """The Hugging Face tensors of ``names``, in order, read from the DCP folder a bucket at a time."""
    sizes = [params[n].numel() * entries[MODEL_PREFIX + n].dtype.itemsize for n in names]
    for bucket in buckets(sizes, bucket_bytes):
        tensors = {
            MODEL_PREFIX + names[i]: torch.empty(params[names[i]].shape, dtype=entries[MODEL_PREFIX + names[i]].dtype)
            for i in bucket
        }
        dcp.load_tensors(folder, tensors, unsafe_pickle=unsafe_pickle)
        for i in bucket:
            yield to_hf_tensor(names[i], tensors.pop(MODEL_PREFIX + names[i]))


def _assemble(
    pieces: list[tuple[TensorInfo, Target]], shape: torch.Size, dtype: torch.dtype, intermediate: int
) -> torch.Tensor:
    """One league tensor from its Hugging Face tensors: a whole one, or a fused expert weight from per-expert ones."""
    if len(pieces) == 1 and pieces[0][1].expert is None:
        [(info, tensor)] = iter_tensors([pieces[0][0]])
        return to_league_tensor(pieces[0][1], tensor)
    fused = torch.empty(shape, dtype=dtype)
    targets = {info.name: target for info, target in pieces}
    for info, tensor in iter_tensors(info for info, _ in pieces):
        fused[expert_slice(targets[info.name], intermediate)] = tensor
    return fused


def _stored_dtype(folder: Path, pieces: list[tuple[TensorInfo, Target]]) -> torch.dtype:
    kinds = {info.dtype for info, _ in pieces}
    if len(kinds) > 1 or next(iter(kinds)) not in _TORCH_DTYPES:
        shown = ", ".join(f"{info.name} ({info.dtype})" for info, _ in pieces[:2])
        raise ValueError(f"`--hf-checkpoint` {folder}: {shown}: dtypes that one league tensor cannot hold")
    return _TORCH_DTYPES[next(iter(kinds))]


def _write_hf_config(source: Path, stage: Path, mtp_num_layers: int) -> None:
    """The source's config.json, with ``mtp_num_hidden_layers`` set to the layers kept (of ``text_config`` in the
    multimodal form)."""
    config = json.loads((source / CONFIG_FILE).read_text())
    text = config["text_config"] if config.get("model_type") in MULTIMODAL_MODEL_TYPES else config
    if text.get("mtp_num_hidden_layers", 0) != mtp_num_layers:
        text["mtp_num_hidden_layers"] = mtp_num_layers
        (stage / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    else:
        shutil.copy2(source / CONFIG_FILE, stage / CONFIG_FILE)


def _check_output(save: Path, force: bool) -> None:
    check_writable("--save", save)
    if save.is_dir() and any(save.iterdir()) and not force:
        raise ValueError(f"`--save` {save}: folder is not empty; choose another or replace it (--force)")
