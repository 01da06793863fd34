"""Activations with a batch-invariant form.

On CPU, torch evaluates elementwise functions with vector code over most of a tensor and scalar code on
the leftover tail, and for sigmoid / SiLU / softplus the two can round differently; which path an
element takes depends on the tensor's size, so a token's value could depend on its batch. The
batch-invariant forms are written with ``exp`` and ``log`` (whose vector and scalar paths agree) and exact
arithmetic. Not responsible for anything else.
"""

import torch
import torch.nn.functional as F


def sigmoid(x: torch.Tensor, batch_invariant: bool = False) -> torch.Tensor:
    return 1.0 / (1.0 + torch.exp(-x)) if batch_invariant else torch.sigmoid(x)


def silu(x: torch.Tensor, batch_invariant: bool = False) -> torch.Tensor:
    return x * (1.0 / (1.0 + torch.exp(-x))) if batch_invariant else F.silu(x)


def softplus(x: torch.Tensor, batch_invariant: bool = False) -> torch.Tensor:
    """``log(1 + exp(x))`` (x above 20 passes through, as torch's threshold)."""
    if not batch_invariant:
        return F.softplus(x)
    return torch.where(x > 20.0, x, torch.log(1.0 + torch.exp(x.clamp(max=20.0))))
