"""Apply training-time transformations to a built model, in a fixed order: pipeline split -> TP/CP -> EP/ETP ->
activation checkpointing -> compile -> FSDP. This version keeps a pipeline stage's part of the policy (``pipeline``),
splits rows and mixer heads over token groups (``heads``: league's TP and CP), places the routed experts over
expert-parallel ranks and splits each over expert tensor-parallel ranks (``expert``), recomputes activations and
shards everything with FSDP2 (the dense weights over the stage's ranks, the experts over the ranks that hold the same
expert shards); the model code itself never changes (it imports nothing of torch.distributed).
"""

import logging
from collections.abc import Collection, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from league.models.qwen3_5_moe import Transformer
from league.parallel.blocks import in_blocks
from league.parallel.dims import ParallelDims
from league.parallel.expert import apply_ep
from league.parallel.heads import apply_head_parallel
from league.parallel.pipeline import Stage
from league.parallel.recompute import Recompute, apply_recompute


def held_layers(model: Transformer) -> list[nn.Module]:
    """The decoder layers this rank holds: its trunk layers (all, or a pipeline stage's) and the MTP head's."""
    trunk = [layer for layer in model.layers if layer is not None]
    return trunk + (list(model.mtp.layers) if model.mtp is not None else [])


def apply_fsdp(
    model: Transformer,
    mesh: DeviceMesh,
    expert_mesh: DeviceMesh | None = None,
    reduce_dtype: torch.dtype = torch.float32,
    root: nn.Module | None = None,
) -> None:
    """FSDP2 over ``mesh`` (every rank, or a pipeline stage's): each decoder layer, the MTP head and the root
    (embedding, final norm, output head; ``root`` when given, a pipeline ``Stage`` holding ``model``) are one unit
    each, all-gathered for their forward and backward and sharded otherwise. With expert (tensor) parallelism
    (``expert_mesh`` of dims ``(edp, ep, etp)``, the experts already sharded over ``ep`` and ``etp``), each layer's
    routed experts are a unit of their own, sharded over ``edp`` (the ranks holding the same expert shards).

    Gradients are reduce-scattered in ``reduce_dtype`` as a plain sum: the trainer's losses are already divided by
    the step's global counts, so each rank's gradient is its share of the one-process gradient. The root stays
    gathered from its forward to the backward (FSDP2's default for the root), so the trainer's head and MTP calls
    after the forward (``output_weight``, ``logits``, ``mtp_forward``) read whole weights: they are only ever called
    after a forward of the same micro-batch.
    """
    policy = MixedPrecisionPolicy(reduce_dtype=reduce_dtype)
    for layer in held_layers(model):
        if expert_mesh is not None:
            fully_shard(layer.moe.experts, mesh=expert_mesh["edp"], mp_policy=policy)
    for layer in model.layers:
        if layer is not None:
            fully_shard(layer, mesh=mesh, mp_policy=policy)
    if model.mtp is not None:
        fully_shard(model.mtp, mesh=mesh, mp_policy=policy)
    root = root or model
    fully_shard(root, mesh=mesh, mp_policy=policy)
    for module in root.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)


def parallelize_qwen3_5_moe(
    model: Transformer,
    dims: ParallelDims,
    recompute: "bool | Recompute",
    mesh: DeviceMesh | None = None,
    expert_mesh: DeviceMesh | None = None,
    token_group: dist.ProcessGroup | None = None,
    stage: int = 0,
) -> nn.Module:
    """Prepare ``model`` for training on ``dims``, in this order: the pipeline split (when ``dims.pp`` > 1:
    ``model`` keeps only stage ``stage``'s part and a ``Stage`` holding it is returned), head parallelism over
    ``token_group`` (when ``dims.tp * dims.cp`` > 1), expert and expert tensor parallelism over ``expert_mesh``'s
    ``ep`` and ``etp`` (when ``dims.ep * dims.etp`` > 1), activation recompute, FSDP2 over ``mesh`` (the ranks of
    this stage; when there is more than one). Returns the module to run: ``model``, or its ``Stage``."""
    experts_split = dims.ep * dims.etp > 1
    root = None
    if dims.pp > 1:
        if dims.tp * dims.cp > 1:
            raise ValueError("pipeline parallelism with head parallelism (--tp/--cp) is not available")
        root = Stage(model, stage, dims.pp)
    if dims.tp * dims.cp > 1:
        if token_group is None:
            raise ValueError(f"tp x cp = {dims.tp * dims.cp} needs a token group")
        apply_head_parallel(model, token_group)
    if experts_split:
        if expert_mesh is None:
            raise ValueError(f"expert-parallel sizes ep {dims.ep} x etp {dims.etp} need an expert mesh")
        apply_ep(model, expert_mesh)
    if recompute:
        apply_recompute(held_layers(model), Recompute() if recompute is True else recompute, model)
    if mesh is not None and mesh.size() > 1:
        apply_fsdp(model, mesh, expert_mesh if experts_split else None, root=root)
    return model if root is None else root


@torch.no_grad()
def full_parameters(model: nn.Module, skip: Collection[str] = ()) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, whole tensor)`` of each parameter but those named in ``skip``, in ``named_parameters`` order: a
    sharded one (a DTensor) is gathered (laid out in blocks first: ``blocks.in_blocks``), so every rank must walk
    the whole model together (with the same ``skip``).

    An expert weight sharded over several mesh dims (FSDP over ``edp``, experts over ``ep`` and ``etp``) is gathered
    by one all-gather per dim, which DTensor warns about on every call; the warning is held back here, where it is
    expected."""
    redistribute_log = logging.getLogger("torch.distributed.tensor._redistribute")
    for name, param in model.named_parameters():
        if name in skip:
            continue
        if not isinstance(param, DTensor):
            yield name, param.detach()
            continue
        level = redistribute_log.level
        redistribute_log.setLevel(logging.ERROR)
        try:
            full = in_blocks(param).full_tensor()
        finally:
            redistribute_log.setLevel(level)
        yield name, full


def pipeline_parameters(
    model: nn.Module, stage: int, num_stages: int, group: dist.ProcessGroup, device: torch.device
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every stage's ``(name, whole tensor)`` on every rank of the pipeline, stage 0's first (``model``: the part
    this rank's stage holds, maybe sharded). Each stage in turn sends the names, shapes and dtypes of its
    parameters, then the tensors one at a time (gathered from the stage's shards as they go); every rank of the
    pipeline walks them together, and receives on ``device``."""
    for source in range(num_stages):
        box = [[(n, p.shape, p.dtype) for n, p in model.named_parameters()] if source == stage else None]
        dist.broadcast_object_list(box, group_src=source, group=group)
        mine = full_parameters(model) if source == stage else None
        for name, shape, dtype in box[0]:
            tensor = next(mine)[1].contiguous() if mine else torch.empty(shape, dtype=dtype, device=device)
            dist.broadcast(tensor, group_src=source, group=group)
            yield name, tensor
