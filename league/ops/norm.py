"""RMS norms of the Qwen3.5 family. Not responsible for choosing a kernel per device.

Legend: T tokens, D feature dim.
"""

import torch

from league.ops.activations import silu


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Zero-centred RMSNorm: ``x / rms(x) * (1 + w)``, all in fp32, cast back at the end.

    Args:
        x (torch.Tensor): ``[..., D]`` input.
        weight (torch.Tensor): ``[D]``, initialised to zeros.
        eps (float): added to the mean square.
    """
    acc = torch.promote_types(x.dtype, torch.float32)
    x32 = x.to(acc)
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (y * (1.0 + weight.to(acc))).to(x.dtype)


def gated_rms_norm(
    x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float, batch_invariant: bool = False
) -> torch.Tensor:
    """The GDN output norm: ``w * (x / rms(x)) * silu(gate)``, with a plain (not 1+w) weight.

    The normalised value is cast back to the input dtype before the weight multiplies it, and the
    SiLU gate is applied in fp32, as the published model does.

    Args:
        x (torch.Tensor): ``[..., D]`` the GDN read-out of one value head.
        gate (torch.Tensor): ``[..., D]`` the ``z`` projection for the same head.
        weight (torch.Tensor): ``[D]``, initialised to ones.
        eps (float): added to the mean square.
    """
    acc = torch.promote_types(x.dtype, torch.float32)
    x32 = x.to(acc)
    y = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    y = weight * y
    return (y * silu(gate.to(acc), batch_invariant)).to(x.dtype)
