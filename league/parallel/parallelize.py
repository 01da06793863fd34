"""Apply training-time transformations to a built model, in a fixed order: TP/EP -> activation
checkpointing -> compile -> FSDP. This version runs on one process, so only activation checkpointing
applies; the model code itself never changes.
"""

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint

from league.models.qwen3_5_moe import Transformer
from league.parallel.dims import ParallelDims


def apply_ac(model: Transformer) -> None:
    """Full activation recompute, one decoder layer per checkpoint (trunk and MTP head).

    The layers' ``forward`` is wrapped in place, so parameter names do not change."""
    layers = list(model.layers) + (list(model.mtp.layers) if model.mtp is not None else [])
    for layer in layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False, preserve_rng_state=False)


def parallelize_qwen3_5_moe(model: Transformer, dims: ParallelDims, recompute: bool) -> nn.Module:
    """Prepare ``model`` for training on ``dims`` (one process: recompute only)."""
    assert (dims.tp, dims.ep, dims.cp, dims.pp, dims.etp) == (1, 1, 1, 1, 1), dims
    if recompute:
        apply_ac(model)
    return model
