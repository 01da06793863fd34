"""Weights handed to a running engine from another process, in SGLang's two forms.

- **Tensors by reference** (``/update_weights_from_tensor``): a list of ``(name, tensor)``, or a flattened bucket
  ``{"flattened_tensor", "metadata"}``, pickled with torch's multiprocessing reductions (a CPU tensor travels as a
  shared-memory file name, a CUDA tensor as an IPC handle: no tensor data is copied into the message) and
  base64-encoded, as SGLang's ``MultiprocessingSerializer`` does. The receiver reads it with an unpickler that
  builds only torch tensors and bucket metadata.
- **A broadcast group** (``/init_weights_update_group`` then ``/update_weights_from_distributed``): a
  torch.distributed process group of its own between the trainer (rank 0) and the engine's ranks, made from a
  TCP store without touching the default group (gloo on CPU, NCCL on the GPU); tensors are broadcast from rank 0
  in the order of the request's ``names``.

Pure plumbing: names stay as sent (the engine maps Hugging Face names to its parameters, ``checkpoint.hf``).
"""

import base64
import datetime
import io
import pickle
from collections.abc import Iterable
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler

import torch
import torch.distributed as dist
import torch.multiprocessing.reductions  # noqa: F401  (registers the tensor reductions with ForkingPickler)
from torch.multiprocessing import set_sharing_strategy

LOAD_FORMATS = (None, "direct", "flattened_bucket")
"""``load_format`` values of /update_weights_from_tensor: None and ``direct`` take ``(name, tensor)`` lists,
``flattened_bucket`` a bucket."""
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""dtype names of /update_weights_from_distributed (``str(dtype)`` without ``torch.``)."""


@dataclass
class FlattenedTensorMetadata:
    """Where one tensor lies in a flattened bucket (SGLang's field names): elements ``start_idx:end_idx`` of the
    bucket, or bytes of a ``uint8`` bucket that mixes dtypes."""

    name: str
    shape: torch.Size
    dtype: torch.dtype
    start_idx: int
    end_idx: int
    numel: int


def flatten_bucket(named: list[tuple[str, torch.Tensor]]) -> dict:
    """``(name, tensor)`` pairs as one ``uint8`` buffer and their metadata (any mix of dtypes)."""
    parts, metadata, offset = [], [], 0
    for name, tensor in named:
        raw = tensor.detach().contiguous().view(-1).view(torch.uint8)
        metadata.append(
            FlattenedTensorMetadata(name, tensor.shape, tensor.dtype, offset, offset + raw.numel(), tensor.numel())
        )
        parts.append(raw)
        offset += raw.numel()
    return {"flattened_tensor": torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8), "metadata": metadata}


def unflatten_bucket(bucket: dict) -> list[tuple[str, torch.Tensor]]:
    """The ``(name, tensor)`` pairs of a bucket, as views of its buffer (a bucket of one dtype counts elements, a
    ``uint8`` one bytes)."""
    if not isinstance(bucket, dict) or set(bucket) != {"flattened_tensor", "metadata"}:
        raise ValueError("a flattened_bucket must be {'flattened_tensor': tensor, 'metadata': [...]}")
    flat, out = bucket["flattened_tensor"], []
    for meta in bucket["metadata"]:
        piece = flat[meta.start_idx : meta.end_idx]
        if flat.dtype == torch.uint8 and meta.dtype != torch.uint8:
            piece = piece.view(meta.dtype)
        if piece.numel() != meta.numel:
            raise ValueError(
                f"flattened_bucket: {meta.name} has {piece.numel()} elements, its metadata says {meta.numel}"
            )
        out.append((meta.name, piece.view(meta.shape)))
    return out


BUCKET_BYTES = 512 << 20
"""Tensor bytes per update by default (the reference system's ``--update-weight-buffer-size``)."""


def buckets(named: Iterable[tuple[str, torch.Tensor]], max_bytes: int = BUCKET_BYTES):
    """``(name, tensor)`` pairs in order, grouped into lists of at most ``max_bytes`` (a larger tensor alone)."""
    bucket, size = [], 0
    for name, tensor in named:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > max_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def serialize(obj: object) -> str:
    """``obj`` (tensors by reference) as base64 text for ``serialized_named_tensors``. CPU tensors are moved to
    shared memory and named by file, so any process on this machine can open them; keep them alive until the
    receiver has answered."""
    set_sharing_strategy("file_system")
    buffer = io.BytesIO()
    ForkingPickler(buffer).dump(obj)
    return base64.b64encode(buffer.getvalue()).decode()


_SGLANG_METADATA = ("sglang.srt.weight_sync.tensor_bucket", "FlattenedTensorMetadata")
_BUILTINS = {"list", "tuple", "dict", "set", "frozenset", "int", "float", "str", "bytes", "bool", "slice"}


def _is_tensor_global(module: str, name: str) -> bool:
    """The globals torch's tensor reductions pickle: rebuild functions, storage and tensor classes, dtypes."""
    if module == "torch.multiprocessing.reductions" or module == "torch._utils":
        return name.startswith(("rebuild_", "_rebuild_"))
    if module == "torch.storage":
        return name in ("UntypedStorage", "TypedStorage")
    if module == "torch":
        return name in ("Tensor", "Size") or isinstance(getattr(torch, name, None), torch.dtype)
    return False


class _TensorUnpickler(pickle.Unpickler):
    """Builds torch tensors, storages and dtypes, bucket metadata and plain containers; nothing else."""

    def find_class(self, module: str, name: str):
        if (module, name) == _SGLANG_METADATA or (module, name) == (__name__, "FlattenedTensorMetadata"):
            return FlattenedTensorMetadata
        if _is_tensor_global(module, name):
            return super().find_class(module, name)
        if module == "builtins" and name in _BUILTINS:
            return super().find_class(module, name)
        if (module, name) in {("collections", "OrderedDict"), ("copyreg", "_reconstructor"), ("builtins", "object")}:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"serialized_named_tensors may hold tensors only; found {module}.{name}")


def deserialize(text: str) -> object:
    """The object of :func:`serialize`, or of SGLang's ``MultiprocessingSerializer.serialize(obj, output_str=True)``."""
    if not isinstance(text, str):
        raise ValueError(f"each serialized_named_tensors entry must be a base64 string, got {type(text).__name__}")
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError:
        raise ValueError("a serialized_named_tensors entry is not valid base64") from None
    try:
        return _TensorUnpickler(io.BytesIO(raw)).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, RuntimeError, OSError, TypeError) as e:
        raise ValueError(f"serialized_named_tensors could not be read: {e}") from None


def named_tensors(entry: object, load_format: str | None) -> list[tuple[str, torch.Tensor]]:
    """The ``(name, tensor)`` pairs of one deserialized entry, by ``load_format``."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"`load_format` must be one of {list(LOAD_FORMATS)}, got {load_format!r}")
    if load_format == "flattened_bucket":
        return unflatten_bucket(entry)
    pairs = list(entry) if isinstance(entry, list | tuple) else None
    if pairs is None or not all(
        isinstance(p, list | tuple) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], torch.Tensor)
        for p in pairs
    ):
        raise ValueError("serialized_named_tensors must hold a list of (name, tensor) pairs for this load_format")
    return [(name, tensor) for name, tensor in pairs]


def new_group(
    master_address: str, master_port: int, rank: int, world_size: int, backend: str, timeout_s: float = 300.0
) -> dist.ProcessGroup:
    """A process group of its own (no default group needed, none changed): rank 0 hosts the TCP store."""
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"`backend` must be gloo or nccl, got {backend!r}")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("`backend` nccl needs a GPU; this engine runs on the CPU: use gloo")
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(master_address, master_port, world_size, is_master=rank == 0, timeout=timeout)
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world_size, timeout)
    return dist.ProcessGroupNCCL(store, rank, world_size)


def broadcast(group: dist.ProcessGroup, tensors: list[torch.Tensor]) -> None:
    """Broadcast each tensor from rank 0 of ``group`` in order (rank 0 sends its tensors, the others receive
    into theirs)."""
    works = [group.broadcast(t, 0) for t in tensors]
    for work in works:
        work.wait()


def receive(
    group: dist.ProcessGroup, names: list, dtypes: list, shapes: list, device: torch.device
) -> list[tuple[str, torch.Tensor]]:
    """Check an /update_weights_from_distributed request's metadata, then receive its tensors from rank 0."""
    if not (isinstance(names, list) and isinstance(dtypes, list) and isinstance(shapes, list)):
        raise ValueError("`names`, `dtypes` and `shapes` must be lists")
    if not (len(names) == len(dtypes) == len(shapes)):
        raise ValueError(
            f"`names`, `dtypes` and `shapes` differ in length ({len(names)}, {len(dtypes)}, {len(shapes)})"
        )
    for name, dtype, shape in zip(names, dtypes, shapes):
        if not isinstance(name, str):
            raise ValueError(f"`names` must be strings, got {name!r}")
        if str(dtype).removeprefix("torch.") not in DTYPES:
            raise ValueError(f"`dtypes` of {name}: {dtype!r} is not one of {sorted(DTYPES)}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise ValueError(f"`shapes` of {name} must be a list of sizes, got {shape!r}")
    tensors = [
        torch.empty(shape, dtype=DTYPES[str(dtype).removeprefix("torch.")], device=device)
        for dtype, shape in zip(dtypes, shapes)
    ]
    broadcast(group, tensors)
    return list(zip(names, tensors))
