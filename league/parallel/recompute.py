"""Activation recompute as Megatron names it: which activations a training forward drops and recomputes in the
backward. Not responsible for anything else of a layout (``parallelize``).

- ``full`` / ``uniform`` / N = 1: every decoder layer is a checkpoint (its input kept, the rest recomputed).
- ``full`` / ``block`` / N: the first N decoder layers this rank holds are checkpoints, the others keep their
  activations (less recompute where memory allows).
- ``selective``: only each layer's token mixer (attention or Gated DeltaNet: projections, core, gate and output
  projection) is a checkpoint; the MoE keeps its activations.

Checkpointing wraps a module's ``forward`` in place (parameter names do not change) with non-reentrant
``torch.utils.checkpoint``; values and gradients are those of the run without recompute.
"""

import functools
from dataclasses import dataclass

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
        if self.granularity == "full" and self.method == "uniform" and self.num_layers > 1:
            raise ValueError(
                f"`--recompute-num-layers` {self.num_layers} with the uniform method (several layers recomputed as "
                "one unit) is not available; use 1 (each layer its own unit, the reference's setting) or "
                "`--recompute-method block`"
            )

    @property
    def every_layer(self) -> bool:
        """Whether every decoder layer is a checkpoint (what the dry run's memory plan models)."""
        return self.granularity == "full" and self.method == "uniform"


def _checkpointed(module: nn.Module) -> None:
    module.forward = functools.partial(checkpoint, module.forward, use_reentrant=False, preserve_rng_state=False)


def apply_recompute(layers: list[nn.Module], policy: Recompute) -> None:
    """Wrap the checkpoints ``policy`` asks for among ``layers`` (the decoder layers this rank holds, in order)."""
    if policy.granularity == "selective":
        for layer in layers:
            _checkpointed(layer.attn if layer.layer_type == "full_attention" else layer.gdn)
        return
    chosen = layers if policy.method == "uniform" else layers[: policy.num_layers]
    for layer in chosen:
        _checkpointed(layer)
