"""Streaming read and write of Hugging Face safetensors checkpoint folders.

A folder holds either one ``model.safetensors`` or shards named ``model-00001-of-00003.safetensors`` with a
``model.safetensors.index.json`` whose ``weight_map`` says which shard holds each tensor. Reading lists the
tensors from the files' headers and yields them one at a time; writing takes the list of tensors up front,
so each shard's header is known before its data and no more than one tensor is held at once. Folders are
written beside their target and renamed into place at the end, so a failure leaves no partial output.

Not responsible for tensor names or layouts (``checkpoint.qwen3_5_moe``) or for config.json.
"""

import json
import os
import shutil
import struct
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5_000_000_000
"""Shard size limit (bytes of tensor data), the same 5 GB the published Qwen checkpoints use at most."""

DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
"""torch dtype -> safetensors dtype name."""
_MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One tensor of a checkpoint folder, as its file's header describes it.

    Args:
        name (str): the tensor's name in the checkpoint.
        file (Path): the safetensors file that holds it.
        shape (tuple[int, ...]): its shape.
        dtype (str): safetensors dtype name, e.g. ``BF16``.
        offset (int): start of its data in the file's data section (reading in offset order is sequential).
    """

    name: str
    file: Path
    shape: tuple[int, ...]
    dtype: str
    offset: int


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A tensor to be written: its name, shape and dtype, known before its data."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def num_bytes(self) -> int:
        return _numel(self.shape) * self.dtype.itemsize


def read_header(file: str | Path) -> dict[str, TensorInfo]:
    """The tensors a safetensors file holds, from its header (no tensor data is read).

    Args:
        file (str | Path): a ``.safetensors`` file.

    Raises:
        ValueError: the file is missing, truncated or not in the safetensors format.
    """
    file = Path(file)
    if not file.is_file():
        raise ValueError(f"{file}: no such file")
    size = file.stat().st_size
    with open(file, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError(f"{file}: not a safetensors file (shorter than its 8-byte header length)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(_MAX_HEADER_BYTES, size - 8):
            raise ValueError(f"{file}: not a safetensors file (header length {header_len} exceeds the file)")
        try:
            header = json.loads(fh.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{file}: not a safetensors file (header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{file}: not a safetensors file (header is not a JSON object)")
    data_bytes = size - 8 - header_len
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            shape, dtype, (begin, end) = tuple(entry["shape"]), entry["dtype"], entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{file}: malformed header entry for tensor {name!r}") from None
        if not 0 <= begin <= end <= data_bytes:
            raise ValueError(f"{file}: tensor {name!r} lies outside the file (truncated?)")
        out[name] = TensorInfo(name=name, file=file, shape=shape, dtype=dtype, offset=begin)
    return out


def list_tensors(folder: str | Path) -> dict[str, TensorInfo]:
    """Every tensor of a checkpoint folder (one ``model.safetensors``, or shards with an index).

    Args:
        folder (str | Path): the checkpoint folder.

    Returns:
        tensor name -> :class:`TensorInfo`, in the order of the index (or of the file's header).

    Raises:
        ValueError: naming the folder or file, when neither layout is there, the index is malformed, or
            the index names a file that does not exist or a tensor its file does not hold.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such folder")
    index_path = folder / INDEX_FILE
    if not index_path.is_file():
        if (folder / SINGLE_FILE).is_file():
            return read_header(folder / SINGLE_FILE)
        raise ValueError(f"{folder}: no {SINGLE_FILE} and no {INDEX_FILE} (not a Hugging Face checkpoint folder)")
    try:
        index = json.loads(index_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{index_path}: not valid JSON ({e})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise ValueError(f"{index_path}: expected a JSON object with a `weight_map` of tensor name -> file name")
    headers: dict[str, dict[str, TensorInfo]] = {}
    out = {}
    for name, file_name in weight_map.items():
        if file_name not in headers:
            file = folder / file_name
            if Path(file_name).name != file_name or not file.is_file():
                raise ValueError(f"{index_path}: tensor {name!r} is in {file_name!r}, which is not a file in {folder}")
            headers[file_name] = read_header(file)
        if name not in headers[file_name]:
            raise ValueError(f"{index_path}: tensor {name!r} is said to be in {file_name}, which does not hold it")
        out[name] = headers[file_name][name]
    return out


def iter_tensors(infos: Iterable[TensorInfo], device: str = "cpu") -> Iterator[tuple[TensorInfo, torch.Tensor]]:
    """Read the given tensors one at a time, a file after another, each file in data order.

    Args:
        infos (Iterable[TensorInfo]): tensors from :func:`list_tensors`.
        device (str): where ``safe_open`` puts each tensor. Default: ``cpu``.
    """
    from safetensors import SafetensorError, safe_open

    by_file: dict[Path, list[TensorInfo]] = {}
    for info in infos:
        by_file.setdefault(info.file, []).append(info)
    for file, group in by_file.items():
        try:
            with safe_open(file, framework="pt", device=device) as fh:
                for info in sorted(group, key=lambda i: i.offset):
                    yield info, fh.get_tensor(info.name)
        except SafetensorError as e:
            raise ValueError(f"{file}: cannot read ({e})") from None


def plan_shards(specs: Sequence[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Split tensors, in order, into shards of at most ``max_shard_bytes`` (a bigger tensor gets its own)."""
    if max_shard_bytes <= 0:
        raise ValueError(f"`max_shard_bytes` must be positive, got {max_shard_bytes}")
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.num_bytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.num_bytes
    return shards


def shard_names(num_shards: int) -> list[str]:
    """``model.safetensors`` for one shard, else ``model-00001-of-0000N.safetensors`` ... (the published naming)."""
    if num_shards == 1:
        return [SINGLE_FILE]
    return [f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors" for i in range(num_shards)]


def write_tensors(
    folder: str | Path,
    specs: Sequence[TensorSpec],
    tensors: Iterable[torch.Tensor],
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> list[str]:
    """Write tensors into ``folder`` as shards (plus an index when there are several), one tensor at a time.

    ``tensors`` is consumed lazily, in the order of ``specs``, so only one tensor needs to exist at a time.
    Write into a :func:`staged_folder` so that a failure leaves nothing behind.

    Args:
        folder (str | Path): an existing (staging) folder.
        specs (Sequence[TensorSpec]): name, shape and dtype of each tensor, in writing order.
        tensors (Iterable[torch.Tensor]): the tensors, matching ``specs`` one for one (any device).
        max_shard_bytes (int): tensor bytes per shard at most. Default: :data:`DEFAULT_MAX_SHARD_BYTES`.

    Returns:
        the file names written, shards then the index if any.
    """
    folder = Path(folder)
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate tensor names: {sorted({n for n in names if names.count(n) > 1})[:5]}")
    unknown = [spec for spec in specs if spec.dtype not in DTYPES]
    if unknown:
        raise ValueError(f"tensor {unknown[0].name!r} has dtype {unknown[0].dtype}, which safetensors cannot hold")
    shards = plan_shards(specs, max_shard_bytes)
    files = shard_names(len(shards))
    source = iter(tensors)
    for file_name, shard in zip(files, shards):
        write_shard(folder / file_name, shard, source)
    if next(source, None) is not None:
        raise ValueError(f"more tensors were given than the {len(specs)} specified")
    return files + write_index(folder, files, shards)


def write_index(folder: Path, files: list[str], shards: list[list[TensorSpec]]) -> list[str]:
    """``model.safetensors.index.json`` of a sharded folder (nothing for one shard); returns the names written."""
    if len(files) == 1:
        return []
    index = {
        "metadata": {"total_size": sum(spec.num_bytes for shard in shards for spec in shard)},
        "weight_map": {spec.name: file_name for file_name, shard in zip(files, shards) for spec in shard},
    }
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return [INDEX_FILE]


def write_shard(path: Path, specs: list[TensorSpec], source: Iterator[torch.Tensor]) -> None:
    """One safetensors file of ``specs``, its tensors taken one at a time from ``source`` (:func:`write_tensors`)."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": DTYPES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.num_bytes],
        }
        offset += spec.num_bytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(encoded)))
        fh.write(encoded)
        for spec in specs:
            tensor = next(source, None)
            if tensor is None:
                raise ValueError(f"fewer tensors were given than specified (none for {spec.name!r})")
            if tuple(tensor.shape) != tuple(spec.shape) or tensor.dtype != spec.dtype:
                raise ValueError(
                    f"tensor {spec.name!r} is {tensor.dtype} {list(tensor.shape)}, "
                    f"but {spec.dtype} {list(spec.shape)} was specified"
                )
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            fh.write(data.numpy().data)


@contextmanager
def staged_folder(target: str | Path, force: bool = False) -> Iterator[Path]:
    """A fresh folder beside ``target`` to write into; renamed to ``target`` when the block succeeds and
    removed when it fails, so that ``target`` is either untouched or complete.

    Args:
        target (str | Path): the folder to create (its parents are created too).
        force (bool): replace a non-empty ``target``; otherwise that is an error. Default: ``False``.
    """
    staging = prepare_stage(target, force)
    try:
        yield staging
    except BaseException:
        discard_stage(staging)
        raise
    commit_stage(staging, target)


def prepare_stage(target: str | Path, force: bool = False) -> Path:
    """The staging folder of :func:`staged_folder`, made beside ``target`` after checking that ``target`` may be
    written (absent, empty, or ``force``)."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target}: exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise ValueError(f"{target}: folder is not empty; choose another or replace it (--force)")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    return staging


def commit_stage(staging: Path, target: str | Path) -> None:
    """Rename a complete staging folder to ``target``, replacing what was there."""
    target = Path(target)
    if target.exists():
        old = staging.with_name(staging.name.replace(".partial-", ".old-", 1))
        os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, target)


def discard_stage(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count
