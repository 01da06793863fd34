"""RMS norms of the Qwen3.5 family.

``rms_norm_reference`` defines the (1 + w) norm and ``gated_rms_norm_reference`` the GDN's gated norm; they run on
CPU (and with ``batch_invariant``). On CUDA ``rms_norm`` and ``gated_rms_norm`` run the Triton kernels of
``ops.triton_norm`` (same formulas, fp32 inside, each row reduced on its own), imported only when Triton is
installed. Not responsible for where the weights live.

Legend: T tokens, D feature dim.
"""

import warnings

import torch

from league.ops.activations import silu
from league.ops.backends import by_kernel, installed

_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Zero-centred RMSNorm: ``x / rms(x) * (1 + w)``, all in fp32, cast back at the end.

    On CUDA in fp32/bf16/fp16 with Triton installed: ``triton_norm.triton_rms_norm``; elsewhere
    :func:`rms_norm_reference`.

    Args:
        x (torch.Tensor): ``[..., D]`` input.
        weight (torch.Tensor): ``[D]``, initialised to zeros.
        eps (float): added to the mean square.
    """
    if x.is_cuda and x.dtype in _TRITON_DTYPES:
        if installed("triton"):
            from league.ops.triton_norm import triton_rms_norm

            return triton_rms_norm(x, weight, eps)
        warnings.warn(
            "rms_norm: triton is not installed; falling back to its reference PyTorch implementation", stacklevel=2
        )
    return rms_norm_reference(x, weight, eps)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """:func:`rms_norm` in plain torch (the definition). Same arguments."""
    acc = torch.promote_types(x.dtype, torch.float32)
    x32 = x.to(acc)
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (y * (1.0 + weight.to(acc))).to(x.dtype)


def gated_rms_norm(
    x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float, batch_invariant: bool = False
) -> torch.Tensor:
    """The GDN output norm: ``w * (x / rms(x)) * silu(gate)``, with a plain (not 1+w) weight.

    On CUDA in fp32/bf16/fp16 with Triton installed (and not ``batch_invariant``):
    :func:`gated_rms_norm_kernel`; elsewhere :func:`gated_rms_norm_reference`.

    Args:
        x (torch.Tensor): ``[..., D]`` the GDN read-out of one value head.
        gate (torch.Tensor): ``[..., D]`` the ``z`` projection for the same head.
        weight (torch.Tensor): ``[D]``, initialised to ones.
        eps (float): added to the mean square.
        batch_invariant (bool): the reference with the fixed-order SiLU (see ``ops.activations``).
    """
    if x.is_cuda and x.dtype in _TRITON_DTYPES and gate.dtype == x.dtype and not batch_invariant:
        if installed("triton"):
            return gated_rms_norm_kernel(x, gate, weight, eps)
        warnings.warn(
            "gated_rms_norm: triton is not installed; falling back to its reference PyTorch implementation",
            stacklevel=2,
        )
    return gated_rms_norm_reference(x, gate, weight, eps, batch_invariant)


def gated_rms_norm_kernel(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """:func:`gated_rms_norm` by the Triton kernel (``triton_norm.gated_rms_norm_forward``), differentiable by the
    reference's gradients."""
    from league.ops.triton_norm import gated_rms_norm_forward

    return by_kernel(
        lambda *t: gated_rms_norm_forward(*t, eps), lambda *t: gated_rms_norm_reference(*t, eps), x, gate, weight
    )


def gated_rms_norm_reference(
    x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float, batch_invariant: bool = False
) -> torch.Tensor:
    """:func:`gated_rms_norm` in plain torch (the definition). The normalised value is cast back to the input
    dtype before the weight multiplies it, and the SiLU gate is applied in fp32, as the published model does.
    Same arguments."""
    acc = torch.promote_types(x.dtype, torch.float32)
    x32 = x.to(acc)
    y = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    y = weight * y
    return (y * silu(gate.to(acc), batch_invariant)).to(x.dtype)
