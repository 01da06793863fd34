"""Causal depthwise conv1d with SiLU, over sequences that continue from cached windows.

A window holds the last ``W - 1`` *pre-conv* inputs of each channel. Not responsible for where windows
are stored.

Legend: N sequences, T tokens, C channels, W kernel width.
"""

import torch
import torch.nn.functional as F

from league.ops.activations import silu


def causal_conv1d_batched(
    x_NTC: torch.Tensor, weight_CW: torch.Tensor, window_NCW1: torch.Tensor, batch_invariant: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``y_t[c] = silu(sum_j w[c, j] * x_{t - W + 1 + j}[c])``, the window supplying the left context.

    Args:
        x_NTC (torch.Tensor): ``[N, T, C]`` pre-conv inputs (sequences padded on the right).
        weight_CW (torch.Tensor): ``[C, W]`` depthwise kernel.
        window_NCW1 (torch.Tensor): ``[N, C, W - 1]`` previous inputs (zeros for a fresh sequence).
        batch_invariant (bool): sum the W taps in a fixed order with elementwise ops, so a token's value does
            not depend on T or N. Default: ``False``.

    Returns:
        ``(y_NTC, full_NCL)``: activated outputs, and the window followed by the inputs (``L = W - 1 + T``),
        from which the window after any token can be read.
    """
    num_tokens, width = x_NTC.shape[1], weight_CW.shape[1]
    full_NCL = torch.cat([window_NCW1.to(x_NTC.dtype), x_NTC.transpose(1, 2)], dim=-1)
    weight_CW = weight_CW.to(x_NTC.dtype)
    if batch_invariant:
        y_NCT = full_NCL[..., 0:num_tokens] * weight_CW[:, 0:1]
        for j in range(1, width):
            y_NCT = y_NCT + full_NCL[..., j : j + num_tokens] * weight_CW[:, j : j + 1]
    else:
        y_NCT = F.conv1d(full_NCL, weight_CW[:, None, :], groups=weight_CW.shape[0])
    return silu(y_NCT, batch_invariant).transpose(1, 2), full_NCL


def causal_conv1d(
    x_TC: torch.Tensor,
    weight_CW: torch.Tensor,
    window_CW1: torch.Tensor | None = None,
    batch_invariant: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence: ``(y_TC, new_window_CW1)`` (zeros as the window when omitted)."""
    width = weight_CW.shape[1]
    if window_CW1 is None:
        window_CW1 = x_TC.new_zeros(weight_CW.shape[0], width - 1)
    y, full = causal_conv1d_batched(x_TC[None], weight_CW, window_CW1[None], batch_invariant)
    return y[0], full[0, :, full.shape[-1] - (width - 1) :]


def causal_conv1d_windows(x_TC: torch.Tensor, window_CW1: torch.Tensor) -> torch.Tensor:
    """The conv window after each of the T inputs: ``[T, C, W - 1]`` (for speculative verify)."""
    width1 = window_CW1.shape[-1]
    full_CL = torch.cat([window_CW1.to(x_TC.dtype), x_TC.t()], dim=-1)
    return full_CL.unfold(1, width1, 1)[:, 1:].permute(1, 0, 2)
