"""Sharded tensors whose local part is not one block of the global tensor, and their twins laid out in blocks.

A ``_StridedShard(dim, split_factor=k)`` placement cuts ``dim`` into k equal parts and gives each rank of its mesh
dim one slice of every part. FSDP2 uses it where its own split of dim 0 and expert parallelism's meet; the slices of
one rank are then adjacent again, one block. The routed experts' fused gate/up weight split by columns over ``etp``
(``expert``) is a case where they are not: each rank holds a slice of the gate rows and the same slice of the up
rows, two blocks. DCP describes a rank's part as one block (an offset and a size), and DTensor's redistribution to a
whole tensor (torch 2.13) fails on such a placement beside FSDP2's strided split of the experts over ``edp``. So
checkpoints and whole-tensor gathers take the same tensor laid out in blocks (``Shard(dim)`` in that mesh dim; one
exchange within its groups): :func:`in_blocks`, and :func:`copy_from_blocks` back.

Not responsible for choosing placements (``expert``, FSDP2) or for what is saved (``checkpoint.dcp``).
"""

import math

import torch
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta
from torch.distributed.tensor.placement_types import Placement, _StridedShard


def block_placements(t: DTensor) -> list[Placement]:
    """``t``'s placements, with every strided shard whose slices are not completed into one block by the mesh dims
    after it (their splits of the same tensor dim multiply to its split factor, as FSDP2 makes them) replaced by
    ``Shard`` of its tensor dim."""
    mesh, placements = t.device_mesh, list(t.placements)
    blocks = []
    for i, p in enumerate(placements):
        if isinstance(p, _StridedShard):
            later = [mesh.size(j) for j in range(i + 1, mesh.ndim) if _shards(placements[j], p.dim)]
            if math.prod(later) != p.split_factor:
                p = Shard(p.dim)
        blocks.append(p)
    return blocks


def _shards(p: Placement, dim: int) -> bool:
    return isinstance(p, (Shard, _StridedShard)) and p.dim == dim


def in_blocks(t: DTensor) -> DTensor:
    """``t`` itself when each rank's part is one block, else the same global tensor laid out by
    :func:`block_placements` (a new local tensor, on the device of ``t``'s local part)."""
    blocks = block_placements(t)
    if blocks == list(t.placements):
        return t
    local = _redistributed(t, blocks)
    spec = DTensorSpec(t.device_mesh, tuple(blocks), tensor_meta=TensorMeta(t.shape, t.stride(), local.dtype))
    return DTensor(local, spec, requires_grad=False)


@torch.no_grad()
def copy_from_blocks(t: DTensor, blocks: DTensor) -> None:
    """Fill ``t``'s local part, in place, from ``blocks``: the same global tensor laid out by :func:`in_blocks`."""
    if blocks is not t:
        t.to_local().copy_(_redistributed(blocks, list(t.placements)))


def _redistributed(t: DTensor, placements: list[Placement]) -> torch.Tensor:
    """This rank's part of ``t`` laid out by ``placements``, on the device of ``t``'s local part (a CPU-offloaded
    optimizer state is exchanged on the mesh's device: ``from_local`` moves it there)."""
    local = t.to_local().detach()
    on_mesh = DTensor.from_local(local, t.device_mesh, t.placements, shape=t.shape, stride=t.stride())
    return on_mesh.redistribute(t.device_mesh, placements).to_local().to(local.device)
