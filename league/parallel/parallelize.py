"""Apply training-time transformations to a built model, in a fixed order: TP/EP -> activation
checkpointing -> compile -> FSDP. This version shards over data-parallel ranks (FSDP2) and recomputes
activations; the model code itself never changes (it imports nothing of torch.distributed).
"""

import functools
from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from league.models.qwen3_5_moe import Transformer
from league.parallel.dims import ParallelDims


def apply_ac(model: Transformer) -> None:
    """Full activation recompute, one decoder layer per checkpoint (trunk and MTP head).

    The layers' ``forward`` is wrapped in place, so parameter names do not change."""
    layers = list(model.layers) + (list(model.mtp.layers) if model.mtp is not None else [])
    for layer in layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False, preserve_rng_state=False)


def apply_fsdp(model: Transformer, mesh: DeviceMesh, reduce_dtype: torch.dtype = torch.float32) -> None:
    """FSDP2 over ``mesh`` (the data-parallel ranks): each decoder layer, the MTP head and the root (embedding, final
    norm, output head) are one unit each, all-gathered for their forward and backward and sharded otherwise.

    Gradients are reduce-scattered in ``reduce_dtype`` as a plain sum: the trainer's losses are already divided by
    the step's global counts, so each rank's gradient is its share of the one-process gradient. The root stays
    gathered from its forward to the backward (FSDP2's default for the root), so the trainer's head and MTP calls
    after the forward (``output_weight``, ``logits``, ``mtp_forward``) read whole weights: they are only ever called
    after a forward of the same micro-batch.
    """
    policy = MixedPrecisionPolicy(reduce_dtype=reduce_dtype)
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
    model: Transformer, dims: ParallelDims, recompute: bool, mesh: DeviceMesh | None = None
) -> nn.Module:
    """Prepare ``model`` for training on ``dims``: activation recompute, then FSDP2 over ``mesh`` when ``dims.dp``
    is above 1 (the other parallelisms are refused by ``ParallelConfig.resolve`` in this version)."""
    assert (dims.tp, dims.ep, dims.cp, dims.pp, dims.etp) == (1, 1, 1, 1, 1), dims
    if recompute:
        apply_ac(model)
    if dims.dp > 1:
        if mesh is None:
            raise ValueError(f"data-parallel size {dims.dp} needs a device mesh")
        apply_fsdp(model, mesh)
    return model


@torch.no_grad()
def full_parameters(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, whole tensor)`` of each parameter, in ``named_parameters`` order: a sharded one (a DTensor) is
    gathered, so every rank must walk the whole model together."""
    for name, param in model.named_parameters():
        yield name, param.full_tensor() if isinstance(param, DTensor) else param.detach()
