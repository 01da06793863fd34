"""Causal depthwise conv1d with SiLU, over sequences that continue from cached windows.

A window holds the last ``W - 1`` *pre-conv* inputs of each channel. The slot form
(:func:`causal_conv1d_slots`) reads and writes windows in a slot-indexed cache; which request owns a slot is
not decided here.

Legend: N sequences, T tokens, C channels, W kernel width.
"""

import torch
import torch.nn.functional as F

from league.ops.activations import silu
from league.ops.backends import use_kernel
from league.ops.numerics import FAST, Numerics


def causal_conv1d_batched(
    x_NTC: torch.Tensor, weight_CW: torch.Tensor, window_NCW1: torch.Tensor, numerics: Numerics = FAST
) -> tuple[torch.Tensor, torch.Tensor]:
    """``y_t[c] = silu(sum_j w[c, j] * x_{t - W + 1 + j}[c])``, the window supplying the left context.

    Args:
        x_NTC (torch.Tensor): ``[N, T, C]`` pre-conv inputs (sequences padded on the right).
        weight_CW (torch.Tensor): ``[C, W]`` depthwise kernel.
        window_NCW1 (torch.Tensor): ``[N, C, W - 1]`` previous inputs (zeros for a fresh sequence).
        numerics (Numerics): row by row: sum the W taps in a fixed order with elementwise ops, so a token's value
            does not depend on T or N. Default: ``FAST``.

    Returns:
        ``(y_NTC, full_NCL)``: activated outputs, and the window followed by the inputs (``L = W - 1 + T``),
        from which the window after any token can be read.
    """
    num_tokens, width = x_NTC.shape[1], weight_CW.shape[1]
    full_NCL = torch.cat([window_NCW1.to(x_NTC.dtype), x_NTC.transpose(1, 2)], dim=-1)
    weight_CW = weight_CW.to(x_NTC.dtype)
    if numerics.row_by_row:
        y_NCT = full_NCL[..., 0:num_tokens] * weight_CW[:, 0:1]
        for j in range(1, width):
            y_NCT = y_NCT + full_NCL[..., j : j + num_tokens] * weight_CW[:, j : j + 1]
    else:
        y_NCT = F.conv1d(full_NCL, weight_CW[:, None, :], groups=weight_CW.shape[0])
    return silu(y_NCT, numerics).transpose(1, 2), full_NCL


def causal_conv1d(
    x_TC: torch.Tensor,
    weight_CW: torch.Tensor,
    window_CW1: torch.Tensor | None = None,
    numerics: Numerics = FAST,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence: ``(y_TC, new_window_CW1)`` (zeros as the window when omitted)."""
    width = weight_CW.shape[1]
    if window_CW1 is None:
        window_CW1 = x_TC.new_zeros(weight_CW.shape[0], width - 1)
    y, full = causal_conv1d_batched(x_TC[None], weight_CW, window_CW1[None], numerics)
    return y[0], full[0, :, full.shape[-1] - (width - 1) :]


def causal_conv1d_windows(x_TC: torch.Tensor, window_CW1: torch.Tensor) -> torch.Tensor:
    """The conv window after each of the T inputs: ``[T, C, W - 1]`` (for speculative verify)."""
    width1 = window_CW1.shape[-1]
    full_CL = torch.cat([window_CW1.to(x_TC.dtype), x_TC.t()], dim=-1)
    return full_CL.unfold(1, width1, 1)[:, 1:].permute(1, 0, 2)


def causal_conv1d_slots(
    x_NTC: torch.Tensor,
    weight_CW: torch.Tensor,
    window_cache: torch.Tensor,
    slots_N: torch.Tensor,
    fresh_N: torch.Tensor | None = None,
    seq_lens_N: torch.Tensor | None = None,
    window_steps: torch.Tensor | None = None,
) -> torch.Tensor:
    """The conv of N sequences continuing from windows kept in a slot-indexed cache, updating them in place.

    Sequence n starts from ``window_cache[slots_N[n]]``, or from zeros where ``fresh_N[n]`` (a new request) or
    ``slots_N[n] < 0`` (a padding row). Then:

    - without ``window_steps`` (decode, prefill): the last ``W - 1`` inputs of its first ``seq_lens_N[n]`` tokens
      (with the old window before them) are written back to ``window_cache[slots_N[n]]``; negative slots write
      nothing;
    - with ``window_steps`` (verify): the window after token t is written to ``window_steps[n, t]`` for every row
      and t < T, and ``window_cache`` is left untouched (the caller commits the accepted step).

    On CUDA with Triton: ``ops.conv.triton.causal_conv1d_slots_triton`` (one kernel: no gathered windows, no host
    synchronisation, so it can be captured in a CUDA graph). Elsewhere the torch reference below, which reads
    the slots on the host.

    Args:
        x_NTC (torch.Tensor): ``[N, T, C]`` pre-conv inputs, sequences padded on the right with zeros.
        weight_CW (torch.Tensor): ``[C, W]`` depthwise kernel.
        window_cache (torch.Tensor): ``[num_slots, C, W - 1]``, contiguous.
        slots_N (torch.Tensor): ``[N]`` integer slots, ``-1`` for padding rows; non-negative ones distinct.
        fresh_N (torch.Tensor, Optional): ``[N]`` bool, rows that start from zeros. Default: none.
        seq_lens_N (torch.Tensor, Optional): ``[N]`` real tokens of each row. Default: all T.
        window_steps (torch.Tensor, Optional): ``[rows >= N, steps >= T, C, W - 1]`` scratch for verify.

    Returns:
        ``y_NTC``: activated outputs in the dtype of x (also for padding tokens, as :func:`causal_conv1d_batched`).
    """
    if use_kernel(x_NTC, None, None, op="causal_conv1d_slots"):
        from league.ops.conv.triton import causal_conv1d_slots_triton

        return causal_conv1d_slots_triton(x_NTC, weight_CW, window_cache, slots_N, fresh_N, seq_lens_N, window_steps)
    return causal_conv1d_slots_reference(x_NTC, weight_CW, window_cache, slots_N, fresh_N, seq_lens_N, window_steps)


def causal_conv1d_slots_reference(
    x_NTC: torch.Tensor,
    weight_CW: torch.Tensor,
    window_cache: torch.Tensor,
    slots_N: torch.Tensor,
    fresh_N: torch.Tensor | None = None,
    seq_lens_N: torch.Tensor | None = None,
    window_steps: torch.Tensor | None = None,
) -> torch.Tensor:
    """The reference of :func:`causal_conv1d_slots` (same arguments): gather, :func:`causal_conv1d_batched`, scatter."""
    num_seqs, num_tokens = x_NTC.shape[:2]
    width1 = weight_CW.shape[1] - 1
    slots = slots_N.long()
    zero = slots < 0
    if fresh_N is not None:
        zero = zero | fresh_N.bool()
    windows = window_cache[slots.clamp(min=0)].to(x_NTC.dtype)
    windows = torch.where(zero[:, None, None], torch.zeros_like(windows), windows)
    y_NTC, full_NCL = causal_conv1d_batched(x_NTC, weight_CW, windows)
    if window_steps is not None:
        after_NTCW1 = full_NCL.unfold(2, width1, 1)[:, :, 1:].transpose(1, 2)
        window_steps[:num_seqs, :num_tokens] = after_NTCW1.to(window_steps.dtype)
        return y_NTC
    lens = torch.full_like(slots, num_tokens) if seq_lens_N is None else seq_lens_N.long()
    index = lens[:, None] + torch.arange(width1, device=x_NTC.device)[None]
    new_NCW1 = full_NCL.gather(2, index[:, None, :].expand(-1, full_NCL.shape[1], -1))
    keep = slots >= 0
    window_cache[slots[keep]] = new_NCW1[keep].to(window_cache.dtype)
    return y_NTC
