"""Tensors in and out of torch.distributed.checkpoint (DCP) folders, by the ranks of a process group together.

A DCP folder holds a ``.metadata`` file (every tensor's name, global shape, dtype and the chunks it was saved in) and
one ``__<rank>_0.distcp`` file per saving rank. Each rank saves the tensors it holds: a plain tensor whole (saved once
when several ranks hold the same one), a DTensor as its local shard, described by its mesh, placements and global
shape (one block of the global tensor: a DTensor whose local part is several, the experts' gate/up split by columns
over ``etp``, is saved and loaded through a twin laid out in blocks, ``parallel.blocks``). Loading fills tensors
laid out any way (plain or DTensors of another mesh or size): each rank reads the chunks that overlap what it holds,
so a checkpoint saved by N ranks loads on M. ``group`` None means one process (no collectives; a process that is
part of a larger group may do this too).

DCP's ``.metadata`` is a pickle; :func:`read_metadata` unpickles only the classes DCP's metadata is made of, so a
folder cannot run code when it is listed or loaded, unless ``unsafe_pickle``. Tensor data is read by torch with
``weights_only``. Folders appear whole or not at all (:func:`staged_together`).

Not responsible for what the tensors are or what they are called (the train checkpoint in ``rl.checkpoints``, the
weights in ``checkpoint.convert``).
"""

import io
import pickle
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.tensor import DTensor

from league.checkpoint.safetensors import commit_stage, discard_stage, prepare_stage
from league.parallel.blocks import copy_from_blocks, in_blocks

METADATA_FILE = ".metadata"
LATEST = "latest"
"""A file in a folder of checkpoints naming the newest (``league train --save``)."""
T = TypeVar("T")
_SHOWN = 5

# (module, name) of every class DCP's .metadata pickle is made of (torch dtypes are checked apart)
_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "TensorProperties",
        "ChunkStorageMetadata",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
}


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """One tensor of a DCP folder: its global shape and dtype."""

    shape: tuple[int, ...]
    dtype: torch.dtype


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_CLASSES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a DCP checkpoint's metadata")


def is_dcp_folder(path: Path) -> bool:
    return (path / METADATA_FILE).is_file()


def find_checkpoint(path: str | Path, flag: str = "--load") -> Path:
    """The DCP folder ``path`` is, or the one its ``latest`` file names (a folder of ``league train`` checkpoints).

    Raises:
        ValueError: naming ``flag`` and the path, when it is neither; a Hugging Face folder or an earlier league
            checkpoint (``train_state.pt``) is named as such, with the way to use it.
    """
    path = Path(path)
    if is_dcp_folder(path):
        return path
    if (path / LATEST).is_file():
        folder = path / (path / LATEST).read_text().strip()
        if not is_dcp_folder(folder):
            raise ValueError(f"`{flag}` {path}: `latest` names {folder.name}, which is not a checkpoint (no .metadata)")
        return folder
    if (path / "train_state.pt").is_file():
        raise ValueError(
            f"`{flag}` {path}: a checkpoint of an earlier league version (train_state.pt), which this one does not "
            f"resume; start from its weights with --hf-checkpoint {path / 'model'}"
        )
    if (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file():
        raise ValueError(
            f"`{flag}` {path}: a Hugging Face folder, not a DCP checkpoint; convert it with `league convert hf-to-dcp` "
            "(`league train` also starts from it as --hf-checkpoint)"
        )
    raise ValueError(f"`{flag}` {path}: neither a DCP checkpoint (.metadata) nor a folder with a `latest` file")


def read_metadata(folder: Path, unsafe_pickle: bool = False, flag: str = "--load") -> Metadata:
    """The ``.metadata`` of a DCP folder, unpickling only DCP's metadata classes (anything, with ``unsafe_pickle``).

    Raises:
        ValueError: naming ``flag`` and the file, when it is missing, refused or not DCP metadata.
    """
    path = folder / METADATA_FILE
    if not path.is_file():
        raise ValueError(f"`{flag}` {folder}: no {METADATA_FILE} (not a DCP checkpoint)")
    data = path.read_bytes()
    try:
        metadata = pickle.loads(data) if unsafe_pickle else _MetadataUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"`{flag}` {path}: refused to unpickle ({e}); if you trust the file, pass --load-unsafe-pickle (this "
            "runs any code it holds)"
        ) from None
    except (EOFError, ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"`{flag}` {path}: not readable DCP metadata ({e})") from None
    if not isinstance(metadata, Metadata):
        raise ValueError(f"`{flag}` {path}: not DCP metadata (a pickled {type(metadata).__name__})")
    return metadata


def list_tensors(folder: Path, unsafe_pickle: bool = False, flag: str = "--load") -> dict[str, TensorEntry]:
    """Every tensor of a DCP folder (name -> :class:`TensorEntry`), from its metadata; non-tensor entries left out."""
    metadata = read_metadata(folder, unsafe_pickle, flag)
    return {
        name: TensorEntry(tuple(entry.size), entry.properties.dtype)
        for name, entry in metadata.state_dict_metadata.items()
        if isinstance(entry, TensorStorageMetadata)
    }


def check_loadable(folder: Path, entries: dict[str, TensorEntry], tensors: dict[str, torch.Tensor], flag: str) -> None:
    """Every one of ``tensors`` is in the folder as a tensor of its (global) shape; else one error naming the first
    few missing or mismatched, before anything is read."""
    missing = [name for name in tensors if name not in entries]
    if missing:
        shown = ", ".join(missing[:_SHOWN]) + (f" and {len(missing) - _SHOWN} more" if len(missing) > _SHOWN else "")
        raise ValueError(f"`{flag}` {folder}: {len(missing)} tensors are not in the checkpoint: {shown}")
    wrong = [
        f"{name} {list(entries[name].shape)} (expected {list(t.shape)})"
        for name, t in tensors.items()
        if tuple(entries[name].shape) != tuple(t.shape)
    ]
    if wrong:
        raise ValueError(
            f"`{flag}` {folder}: {len(wrong)} tensors have another shape in the checkpoint: {', '.join(wrong[:_SHOWN])}"
            " (a checkpoint of another architecture?)"
        )


def load_tensors(
    folder: Path,
    tensors: dict[str, torch.Tensor],
    group: dist.ProcessGroup | None = None,
    unsafe_pickle: bool = False,
    flag: str = "--load",
) -> None:
    """Fill ``tensors`` (plain tensors or DTensors, any layout) in place from a DCP folder; the ranks of ``group``
    call this together (None: this process alone). Checked whole first (:func:`check_loadable`), so a bad
    checkpoint changes nothing."""
    check_loadable(folder, list_tensors(folder, unsafe_pickle, flag), tensors, flag)
    reader = _Reader(folder, unsafe_pickle, flag)
    blocks = {name: in_blocks(t) if isinstance(t, DTensor) else t for name, t in tensors.items()}
    with _one_process_quietly(group):
        _unwrapped(lambda: dcp.load(blocks, storage_reader=reader, process_group=group, no_dist=group is None))
    for name, t in tensors.items():
        if isinstance(t, DTensor):
            copy_from_blocks(t, blocks[name])


def save_tensors(
    folder: Path,
    tensors: dict[str, torch.Tensor],
    group: dist.ProcessGroup | None = None,
    produce: Callable[[str], torch.Tensor] | None = None,
) -> None:
    """Save ``tensors`` into the (empty) ``folder``; the ranks of ``group`` call this together, each with the tensors
    it holds (None: this process alone).

    Args:
        folder (Path): an existing, empty folder every rank writes into (a staging folder of :func:`staged_together`).
        tensors (dict[str, torch.Tensor]): name -> tensor or DTensor. Keys may differ between ranks: a name held by
            one rank only is saved by it.
        group (ProcessGroup, Optional): the saving ranks. Default: ``None`` (this process alone).
        produce (Callable[[str], torch.Tensor], Optional): streaming: ``tensors`` are shapes only (meta tensors), and
            ``produce(name)`` makes each one's data when it is written, so host memory holds one tensor at a time.
            Default: ``None`` (the tensors hold their data).
    """
    writer = FileSystemWriter(folder)
    planner = _ProducingPlanner(produce) if produce is not None else None
    blocks = {name: in_blocks(t) if isinstance(t, DTensor) else t for name, t in tensors.items()}
    with _one_process_quietly(group):
        _unwrapped(
            lambda: dcp.save(blocks, storage_writer=writer, planner=planner, process_group=group, no_dist=group is None)
        )


class _Reader(FileSystemReader):
    """DCP's file reader with :func:`read_metadata`'s restricted unpickling."""

    def __init__(self, folder: Path, unsafe_pickle: bool, flag: str):
        super().__init__(folder)
        self._folder, self._unsafe, self._flag = folder, unsafe_pickle, flag

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        assert kwargs.get("rank") is None, "league saves with rank coordination (one .metadata)"
        return read_metadata(self._folder, self._unsafe, self._flag)


class _ProducingPlanner(DefaultSavePlanner):
    """Plans from the state dict's shapes and makes each tensor's data only when the writer asks for it."""

    def __init__(self, produce: Callable[[str], torch.Tensor]):
        super().__init__()
        self._produce = produce

    def resolve_data(self, write_item):
        return self._produce(write_item.index.fqn)


@contextmanager
def _one_process_quietly(group: dist.ProcessGroup | None) -> Iterator[None]:
    """DCP warns on every one-process call that it assumes one process; here that is the intent."""
    with warnings.catch_warnings():
        if group is None:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _unwrapped(call: Callable[[], T]) -> T:
    """``call()``, with DCP's CheckpointException (every rank's failures, raised on every rank) replaced by the first
    failing rank's own exception, so that a full disk reads as an OSError naming the file."""
    try:
        return call()
    except CheckpointException as e:
        failures = sorted(e.failures.items())
        if not failures:
            raise
        error = failures[0][1][0] if isinstance(failures[0][1], tuple) else failures[0][1]
        raise error from None


# ranks together -------------------------------------------------------------------------------------------------


def group_rank(group: dist.ProcessGroup | None) -> int:
    """This process's rank in ``group`` (0 for None: one process)."""
    return 0 if group is None else dist.get_rank(group)


def group_size(group: dist.ProcessGroup | None) -> int:
    """The ranks of ``group`` (1 for None: one process)."""
    return 1 if group is None else dist.get_world_size(group)


def on_main(group: dist.ProcessGroup | None, fn: Callable[[], T]) -> T:
    """``fn()`` run by rank 0 of ``group``; its result on every rank. When it raises, rank 0 raises its exception and
    the other ranks a ValueError quoting it, so no rank waits for another that failed."""
    if group is None:
        return fn()
    result, error = None, None
    if dist.get_rank(group) == 0:
        try:
            result = fn()
        except Exception as e:
            error = e
    box = [(result, None if error is None else str(error))]
    dist.broadcast_object_list(box, group_src=0, group=group)
    if error is not None:
        raise error
    result, message = box[0]
    if message is not None:
        raise ValueError(f"rank 0: {message}")
    return result


def _first_failure(group: dist.ProcessGroup | None, error: BaseException | None) -> tuple[int, str] | None:
    """(rank, message) of the lowest rank of ``group`` that failed, or None; every rank calls it once."""
    if group is None:
        return None if error is None else (0, str(error))
    mine = None if error is None else str(error)
    everyone: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    return next(((rank, message) for rank, message in enumerate(everyone) if message is not None), None)


@contextmanager
def staged_together(target: Path, group: dist.ProcessGroup | None = None, force: bool = False) -> Iterator[Path]:
    """A staging folder beside ``target`` that the ranks of ``group`` write into together; renamed to ``target`` when
    the block succeeded on every rank, removed when it failed on any (each rank then raises: its own error, or a
    ValueError naming the rank that failed). ``target`` is untouched or complete. Rank 0 makes, renames and removes
    the folder; every rank must enter and leave the block (a rank failing alone inside it must not be waited for in
    a collective by the others).

    Args:
        target (Path): the folder to create (an existing one is replaced only with ``force``).
        group (ProcessGroup, Optional): the writing ranks. Default: ``None`` (this process alone).
        force (bool): replace a non-empty ``target``. Default: ``False``.
    """
    stage = on_main(group, lambda: prepare_stage(target, force))
    error = None
    try:
        yield stage
    except BaseException as e:
        error = e
    failure = _first_failure(group, error)
    if failure is not None:
        if group_rank(group) == 0:
            discard_stage(stage)
        if error is not None:
            raise error
        raise ValueError(f"rank {failure[0]}: {failure[1]}")
    on_main(group, lambda: commit_stage(stage, target))
