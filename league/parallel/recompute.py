"""Activation recompute as Megatron names it: which activations a training forward drops and recomputes in the
backward. Not responsible for anything else of a layout (``parallelize``).

- ``full`` / ``uniform`` / N: the decoder layers this rank holds, in runs of N consecutive layers, each run a
  checkpoint (its first input kept, all N layers recomputed in the backward; N = 1: every layer).
- ``full`` / ``block`` / N: the first N decoder layers this rank holds are checkpoints, the others keep their
  activations (less recompute where memory allows).
- ``selective``: only each layer's token mixer (attention or Gated DeltaNet: projections, core, gate and output
  projection) is a checkpoint; the MoE keeps its activations.

Checkpointing wraps a module's ``forward`` in place (parameter names do not change) with non-reentrant
``torch.utils.checkpoint``; runs of several layers wrap the model's ``forward_layers``. Values and gradients are those
of the run without recompute.
"""

import functools
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

GRANULARITIES = ("full", "selective")
METHODS = ("uniform", "block")


@dataclass(frozen=True, slots=True)
class Recompute:
    """Which activations to recompute (Megatron's ``--recompute-granularity / -method / -num-layers``)."""

    granularity: str = "full"
    method: str = "uniform"
    num_layers: int = 1

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"`--recompute-granularity` {self.granularity!r}: expected one of {GRANULARITIES}")
        if self.method not in METHODS:
            raise ValueError(f"`--recompute-method` {self.method!r}: expected one of {METHODS}")
        if not isinstance(self.num_layers, int) or self.num_layers < 1:
            raise ValueError(f"`--recompute-num-layers` must be an integer >= 1, got {self.num_layers!r}")

    @property
    def every_layer(self) -> bool:
        """Whether every decoder layer is a checkpoint of its own (what the dry run's memory plan models)."""
        return self.granularity == "full" and self.method == "uniform" and self.num_layers == 1


def _checkpointed(module: nn.Module) -> None:
    module.forward = functools.partial(checkpoint, module.forward, use_reentrant=False, preserve_rng_state=False)


def apply_recompute(layers: list[nn.Module], policy: Recompute, model: nn.Module | None = None) -> None:
    """Wrap the checkpoints ``policy`` asks for among ``layers`` (the decoder layers this rank holds, in order; the
    trunk's and the MTP head's). Runs of several layers (uniform, N > 1) are checkpoints of ``model.forward_layers``
    over the trunk's layers; the MTP head's layers stay checkpoints of their own."""
    if policy.granularity == "selective":
        for layer in layers:
            _checkpointed(layer.attn if layer.layer_type == "full_attention" else layer.gdn)
        return
    if policy.method == "block":
        for layer in layers[: policy.num_layers]:
            _checkpointed(layer)
        return
    trunk = {id(layer) for layer in model.layers if layer is not None} if model is not None else set()
    for layer in layers:
        if policy.num_layers == 1 or id(layer) not in trunk:
            _checkpointed(layer)
    if policy.num_layers > 1:
        if model is None:
            raise ValueError("uniform recompute of several layers a unit needs the model (its forward_layers)")
        _checkpointed_runs(model, policy.num_layers)


def _checkpointed_runs(model: nn.Module, size: int) -> None:
    """``model.forward_layers`` over runs of ``size`` consecutive layers of the range it is given, each run a
    checkpoint, in a training forward (a gradient wanted, no cache); as before otherwise (the engine's forwards)."""
    forward_layers = model.forward_layers

    def runs(x_TD, batch, rope, cache, layers: range):
        if cache is not None or not torch.is_grad_enabled():
            return forward_layers(x_TD, batch, rope, cache, layers)
        for start in range(layers.start, layers.stop, size):
            run = range(start, min(start + size, layers.stop))
            x_TD = checkpoint(
                forward_layers, x_TD, batch, rope, None, run, use_reentrant=False, preserve_rng_state=False
            )
        return x_TD

    model.forward_layers = runs
