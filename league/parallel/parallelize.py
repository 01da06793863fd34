"""Apply training-time transformations to a built model, in a fixed order: TP/CP -> EP/ETP -> activation
checkpointing -> compile -> FSDP. This version splits rows and mixer heads over token groups (``heads``: league's TP
and CP), places the routed experts over expert-parallel ranks and splits each over expert tensor-parallel ranks
(``expert``), recomputes activations and shards everything with FSDP2 (the dense weights over every rank, the experts
over the ranks that hold the same expert shards); the model code itself never changes (it imports nothing of
torch.distributed).
"""

import functools
import logging
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from league.models.qwen3_5_moe import Transformer
from league.parallel.blocks import in_blocks
from league.parallel.dims import ParallelDims
from league.parallel.expert import apply_ep
from league.parallel.heads import apply_head_parallel


def apply_ac(model: Transformer) -> None:
    """Full activation recompute, one decoder layer per checkpoint (trunk and MTP head).

    The layers' ``forward`` is wrapped in place, so parameter names do not change."""
    layers = list(model.layers) + (list(model.mtp.layers) if model.mtp is not None else [])
    for layer in layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False, preserve_rng_state=False)


def apply_fsdp(
    model: Transformer,
    mesh: DeviceMesh,
    expert_mesh: DeviceMesh | None = None,
    reduce_dtype: torch.dtype = torch.float32,
) -> None:
    """FSDP2 over ``mesh`` (every rank): each decoder layer, the MTP head and the root (embedding, final
    norm, output head) are one unit each, all-gathered for their forward and backward and sharded otherwise. With
    expert (tensor) parallelism (``expert_mesh`` of dims ``(edp, ep, etp)``, the experts already sharded over
    ``ep`` and ``etp``), each layer's routed experts are a unit of their own, sharded over ``edp`` (the ranks
    holding the same expert shards).

    Gradients are reduce-scattered in ``reduce_dtype`` as a plain sum: the trainer's losses are already divided by
    the step's global counts, so each rank's gradient is its share of the one-process gradient. The root stays
    gathered from its forward to the backward (FSDP2's default for the root), so the trainer's head and MTP calls
    after the forward (``output_weight``, ``logits``, ``mtp_forward``) read whole weights: they are only ever called
    after a forward of the same micro-batch.
    """
    policy = MixedPrecisionPolicy(reduce_dtype=reduce_dtype)
    for layer in [*model.layers, *(model.mtp.layers if model.mtp is not None else ())]:
        if expert_mesh is not None:
            fully_shard(layer.moe.experts, mesh=expert_mesh["edp"], mp_policy=policy)
    for layer in model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    if model.mtp is not None:
        fully_shard(model.mtp, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)


def parallelize_qwen3_5_moe(
    model: Transformer,
    dims: ParallelDims,
    recompute: bool,
    mesh: DeviceMesh | None = None,
    expert_mesh: DeviceMesh | None = None,
    token_group: dist.ProcessGroup | None = None,
) -> nn.Module:
    """Prepare ``model`` for training on ``dims``, in this order: head parallelism over ``token_group`` (when
    ``dims.tp * dims.cp`` > 1), expert and expert tensor parallelism over ``expert_mesh``'s ``ep`` and ``etp``
    (when ``dims.ep * dims.etp`` > 1), activation recompute, FSDP2 over ``mesh`` (when there is more than one
    rank). PP is refused by ``ParallelConfig.resolve`` in this version."""
    assert dims.pp == 1, dims
    experts_split = dims.ep * dims.etp > 1
    if dims.tp * dims.cp > 1:
        if token_group is None:
            raise ValueError(f"tp x cp = {dims.tp * dims.cp} needs a token group")
        apply_head_parallel(model, token_group)
    if experts_split:
        if expert_mesh is None:
            raise ValueError(f"expert-parallel sizes ep {dims.ep} x etp {dims.etp} need an expert mesh")
        apply_ep(model, expert_mesh)
    if recompute:
        apply_ac(model)
    if mesh is not None and mesh.size() > 1:
        apply_fsdp(model, mesh, expert_mesh if experts_split else None)
    return model


@torch.no_grad()
def full_parameters(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, whole tensor)`` of each parameter, in ``named_parameters`` order: a sharded one (a DTensor) is
    gathered (laid out in blocks first: ``blocks.in_blocks``), so every rank must walk the whole model together.

    An expert weight sharded over several mesh dims (FSDP over ``edp``, experts over ``ep`` and ``etp``) is gathered
    by one all-gather per dim, which DTensor warns about on every call; the warning is held back here, where it is
    expected."""
    redistribute_log = logging.getLogger("torch.distributed.tensor._redistribute")
    for name, param in model.named_parameters():
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
