"""RMS norms of the Qwen3.5 family.

``rms_norm_reference`` defines the (1 + w) norm and ``gated_rms_norm_reference`` the GDN's gated norm; they run on
CPU (and with row-by-row numerics). On CUDA ``rms_norm`` and ``gated_rms_norm`` run the Triton kernels of
``ops.norm.triton`` (same formulas, fp32 inside, each row reduced on its own), imported only when Triton is
installed. Not responsible for where the weights live.

Legend: T tokens, D feature dim.
"""

import torch

from league.ops.activations import silu
from league.ops.backends import by_kernel, use_kernel
from league.ops.numerics import FAST, Numerics


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Zero-centred RMSNorm: ``x / rms(x) * (1 + w)``, all in fp32, cast back at the end.

    On CUDA in fp32/bf16/fp16 with Triton installed: ``ops.norm.triton.triton_rms_norm``; elsewhere
    :func:`rms_norm_reference`.

    Args:
        x (torch.Tensor): ``[..., D]`` input.
        weight (torch.Tensor): ``[D]``, initialised to zeros.
        eps (float): added to the mean square.
    """
    if use_kernel(x, op="rms_norm"):
        from league.ops.norm.triton import triton_rms_norm

        return triton_rms_norm(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """:func:`rms_norm` in plain torch (the definition). Same arguments."""
    acc = torch.promote_types(x.dtype, torch.float32)
    x32 = x.to(acc)
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (y * (1.0 + weight.to(acc))).to(x.dtype)


def gated_rms_norm(
    x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float, numerics: Numerics = FAST
) -> torch.Tensor:
    """The GDN output norm: ``w * (x / rms(x)) * silu(gate)``, with a plain (not 1+w) weight.

    On CUDA in fp32/bf16/fp16 with Triton installed (numerics not row by row):
    :func:`gated_rms_norm_kernel`; elsewhere :func:`gated_rms_norm_reference`.

    Args:
        x (torch.Tensor): ``[..., D]`` the GDN read-out of one value head.
        gate (torch.Tensor): ``[..., D]`` the ``z`` projection for the same head.
        weight (torch.Tensor): ``[D]``, initialised to ones.
        eps (float): added to the mean square.
        numerics (Numerics): row by row: the reference with the fixed-order SiLU (see ``ops.activations``).
            Default: ``FAST``.
    """
    if use_kernel(x, numerics, op="gated_rms_norm") and gate.dtype == x.dtype:
        return gated_rms_norm_kernel(x, gate, weight, eps)
    return gated_rms_norm_reference(x, gate, weight, eps, numerics)


def gated_rms_norm_kernel(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """:func:`gated_rms_norm` by the Triton kernel (``ops.norm.triton.gated_rms_norm_forward``), differentiable by the
    reference's gradients."""
    from league.ops.norm.triton import gated_rms_norm_forward

    return by_kernel(
        lambda *t: gated_rms_norm_forward(*t, eps), lambda *t: gated_rms_norm_reference(*t, eps), x, gate, weight
    )


def gated_rms_norm_reference(
    x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float, numerics: Numerics = FAST
) -> torch.Tensor:
    """:func:`gated_rms_norm` in plain torch (the definition). The normalised value is cast back to the input
    dtype before the weight multiplies it, and the SiLU gate is applied in fp32, as the published model does.
    Same arguments."""
    acc = torch.promote_types(x.dtype, torch.float32)
    x32 = x.to(acc)
    y = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    y = weight * y
    return (y * silu(gate.to(acc), numerics)).to(x.dtype)
