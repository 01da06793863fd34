"""Activations with a batch-invariant form.

On CPU, torch evaluates elementwise functions with vector code over most of a tensor and scalar code on
the leftover tail, and for sigmoid / SiLU / softplus the two can round differently; which path an
element takes depends on the tensor's size, so a token's value could depend on its batch. The
batch-invariant forms are written with ``exp`` and ``log`` (whose vector and scalar paths agree) and exact
arithmetic.

Two compositions of them, the MoE block's elementwise tail, run as one Triton launch each on CUDA
(``ops.activations.triton``) outside batch-invariant runs, for the trainer and the engine alike: :func:`silu_mul`
and :func:`add_gated`; their gradients come from the torch forms. Not responsible for anything else.
"""

import torch
import torch.nn.functional as F

from league.ops.backends import by_kernel, use_kernel
from league.ops.numerics import FAST, Numerics


def sigmoid(x: torch.Tensor, numerics: Numerics = FAST) -> torch.Tensor:
    return 1.0 / (1.0 + torch.exp(-x)) if numerics.row_by_row else torch.sigmoid(x)


def silu(x: torch.Tensor, numerics: Numerics = FAST) -> torch.Tensor:
    return x * (1.0 / (1.0 + torch.exp(-x))) if numerics.row_by_row else F.silu(x)


def softplus(x: torch.Tensor, numerics: Numerics = FAST) -> torch.Tensor:
    """``log(1 + exp(x))`` (x above 20 passes through, as torch's threshold)."""
    if not numerics.row_by_row:
        return F.softplus(x)
    return torch.where(x > 20.0, x, torch.log(1.0 + torch.exp(x.clamp(max=20.0))))


def silu_mul(gate: torch.Tensor, up: torch.Tensor, numerics: Numerics = FAST) -> torch.Tensor:
    """``silu(gate) * up`` (a SwiGLU's hidden), differentiable."""
    if use_kernel(gate, numerics, op="silu_mul") and up.dtype == gate.dtype:
        from league.ops.activations.triton import silu_mul_fwd

        return by_kernel(silu_mul_fwd, silu_mul_reference, gate, up)
    return silu_mul_reference(gate, up, numerics)


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor, numerics: Numerics = FAST) -> torch.Tensor:
    return silu(gate, numerics) * up


def add_gated(x: torch.Tensor, gate_logit: torch.Tensor, y: torch.Tensor, numerics: Numerics = FAST):
    """``x + sigmoid(gate_logit) * y`` (the MoE block's output: routed experts plus the gated shared expert),
    ``gate_logit`` ``[..., 1]``; differentiable."""
    if use_kernel(x, numerics, op="add_gated") and gate_logit.dtype == y.dtype == x.dtype:
        from league.ops.activations.triton import add_gated_fwd

        return by_kernel(add_gated_fwd, add_gated_reference, x, gate_logit, y)
    return add_gated_reference(x, gate_logit, y, numerics)


def add_gated_reference(x: torch.Tensor, gate_logit: torch.Tensor, y: torch.Tensor, numerics: Numerics = FAST):
    return x + sigmoid(gate_logit, numerics) * y
