"""Causal depthwise conv1d with SiLU, over one sequence, continuing from a cached window.

The cached window holds the last ``kernel - 1`` *pre-conv* inputs of each channel. Not responsible
for where the window is stored.

Legend: T tokens, C channels, W kernel width.
"""

import torch
import torch.nn.functional as F

from league.ops.activations import silu


def causal_conv1d(
    x_TC: torch.Tensor,
    weight_CW: torch.Tensor,
    window_CW1: torch.Tensor | None = None,
    batch_invariant: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``y_t[c] = silu(sum_j w[c, j] * x_{t - W + 1 + j}[c])`` with the window (or zeros) as left context.

    Args:
        x_TC (torch.Tensor): ``[T, C]`` the pre-conv inputs of one sequence.
        weight_CW (torch.Tensor): ``[C, W]`` depthwise kernel.
        window_CW1 (torch.Tensor, Optional): ``[C, W - 1]`` previous inputs; zeros when omitted.
        batch_invariant (bool): sum the W taps in a fixed order (the same numbers for any T). Default: ``False``.

    Returns:
        ``(y_TC, new_window_CW1)``: the activated outputs and the last ``W - 1`` inputs (window included).
    """
    num_channels, width = weight_CW.shape
    if window_CW1 is None:
        window_CW1 = x_TC.new_zeros(num_channels, width - 1)
    full_CL = torch.cat([window_CW1.to(x_TC.dtype), x_TC.t()], dim=-1)
    weight_CW = weight_CW.to(x_TC.dtype)
    if batch_invariant:
        num_tokens = x_TC.shape[0]
        y_CT = full_CL[:, 0:num_tokens] * weight_CW[:, 0:1]
        for j in range(1, width):
            y_CT = y_CT + full_CL[:, j : j + num_tokens] * weight_CW[:, j : j + 1]
    else:
        y_CT = F.conv1d(full_CL[None], weight_CW[:, None, :], groups=num_channels)[0]
    return silu(y_CT, batch_invariant).t(), full_CL[:, full_CL.shape[1] - (width - 1) :]


def causal_conv1d_windows(x_TC: torch.Tensor, window_CW1: torch.Tensor) -> torch.Tensor:
    """The conv window after each of the T inputs: ``[T, C, W - 1]`` (for speculative verify)."""
    width1 = window_CW1.shape[-1]
    full_CL = torch.cat([window_CW1.to(x_TC.dtype), x_TC.t()], dim=-1)
    return full_CL.unfold(1, width1, 1)[:, 1:].permute(1, 0, 2)
