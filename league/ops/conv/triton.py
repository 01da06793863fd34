"""Triton kernel of the causal depthwise conv1d + SiLU over sequences whose windows live in a slot-indexed cache.

Computes what ``conv.causal_conv1d_slots_reference`` defines (fp32 accumulation, the sum rounded to the input's
dtype before the SiLU, as the reference's conv in that dtype), in one launch: each program reads its sequence's
window from the cache, convolves its T tokens for a block of channels, and writes the new window back to the slot
(decode, prefill) or the window after every token to the verify scratch. No gathered copies, and no device value
read on the host, so it can be captured in a CUDA graph. It does not choose when to run (``conv`` does).

Imported only when Triton is installed. Runs on CUDA, or on CPU tensors under ``TRITON_INTERPRET=1``.

Legend: N sequences, T tokens, C channels, W kernel width; inside the kernel BC channels per program.
"""

import torch
import triton
import triton.language as tl

_BLOCK_C = 256


@triton.jit
def _tap(x_row_ptr, win_ptr, p, stride_xt, cols, cmask, zero_window, W1: tl.constexpr):
    """Input ``p`` of a sequence (``p < 0``: column ``W1 + p`` of its old window), fp32, in x's dtype first."""
    from_x = tl.load(x_row_ptr + p * stride_xt + cols, mask=cmask & (p >= 0), other=0.0)
    from_window = tl.load(win_ptr + cols * W1 + (W1 + p), mask=cmask & (p < 0) & (zero_window == 0), other=0.0)
    return from_x.to(tl.float32) + from_window.to(from_x.dtype).to(tl.float32)


@triton.jit(do_not_specialize=["T"])
def _causal_conv1d_slots_kernel(
    x_ptr,
    w_ptr,
    cache_ptr,
    y_ptr,
    steps_ptr,
    slots_ptr,
    fresh_ptr,
    lens_ptr,
    T,
    C,
    stride_xn,
    stride_xt,
    stride_yn,
    stride_yt,
    stride_cache,
    stride_sn,
    stride_st,
    W: tl.constexpr,
    BC: tl.constexpr,
    HAS_FRESH: tl.constexpr,
    HAS_LENS: tl.constexpr,
    RECORD: tl.constexpr,
):
    W1: tl.constexpr = W - 1
    n = tl.program_id(0)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    cmask = cols < C
    slot = tl.load(slots_ptr + n).to(tl.int64)
    zero_window = slot < 0
    if HAS_FRESH:
        zero_window = zero_window | (tl.load(fresh_ptr + n) != 0)
    win_ptr = cache_ptr + tl.maximum(slot, 0) * stride_cache
    x_row_ptr = x_ptr + n.to(tl.int64) * stride_xn
    y_row_ptr = y_ptr + n.to(tl.int64) * stride_yn
    # a while loop, not range(T): the interpreter cannot turn a runtime scalar into a Python int
    t = 0
    while t < T:
        acc = tl.zeros([BC], dtype=tl.float32)
        for j in tl.static_range(W):
            w = tl.load(w_ptr + cols * W + j, mask=cmask, other=0.0).to(x_ptr.dtype.element_ty).to(tl.float32)
            acc += w * _tap(x_row_ptr, win_ptr, t - W1 + j, stride_xt, cols, cmask, zero_window, W1)
        acc = acc.to(y_ptr.dtype.element_ty).to(tl.float32)
        out = acc / (1.0 + tl.exp(-acc))
        tl.store(y_row_ptr + t * stride_yt + cols, out.to(y_ptr.dtype.element_ty), mask=cmask)
        if RECORD:  # the window after token t
            step_ptr = steps_ptr + n.to(tl.int64) * stride_sn + t * stride_st + cols * W1
            for j in tl.static_range(W1):
                value = _tap(x_row_ptr, win_ptr, t + 1 - W1 + j, stride_xt, cols, cmask, zero_window, W1)
                tl.store(step_ptr + j, value.to(steps_ptr.dtype.element_ty), mask=cmask)
        t += 1
    if not RECORD:
        length = T
        if HAS_LENS:
            length = tl.load(lens_ptr + n).to(tl.int32)
        # column j of the new window reads column j + length > j of the old one, which is written later (or never)
        for j in tl.static_range(W1):
            value = _tap(x_row_ptr, win_ptr, length - W1 + j, stride_xt, cols, cmask, zero_window, W1)
            tl.store(win_ptr + cols * W1 + j, value.to(cache_ptr.dtype.element_ty), mask=cmask & (slot >= 0))


def causal_conv1d_slots_triton(
    x_NTC: torch.Tensor,
    weight_CW: torch.Tensor,
    window_cache: torch.Tensor,
    slots_N: torch.Tensor,
    fresh_N: torch.Tensor | None = None,
    seq_lens_N: torch.Tensor | None = None,
    window_steps: torch.Tensor | None = None,
) -> torch.Tensor:
    """Contract of :func:`league.ops.conv.causal_conv1d_slots`."""
    num_seqs, num_tokens, channels = x_NTC.shape
    width = weight_CW.shape[1]
    if x_NTC.stride(-1) != 1:
        x_NTC = x_NTC.contiguous()
    assert window_cache.is_contiguous() and window_cache.shape[1:] == (channels, width - 1)
    weight_CW = weight_CW.contiguous()
    y_NTC = torch.empty_like(x_NTC, memory_format=torch.contiguous_format)
    record = window_steps is not None
    if record:
        assert window_steps.stride(-1) == 1 and window_steps.stride(-2) == width - 1
        assert window_steps.stride(-3) == channels * (width - 1)
    steps = window_steps if record else window_cache
    grid = (num_seqs, triton.cdiv(channels, _BLOCK_C))
    _causal_conv1d_slots_kernel[grid](
        x_NTC,
        weight_CW,
        window_cache,
        y_NTC,
        steps,
        slots_N,
        slots_N if fresh_N is None else fresh_N,
        slots_N if seq_lens_N is None else seq_lens_N,
        num_tokens,
        channels,
        x_NTC.stride(0),
        x_NTC.stride(1),
        y_NTC.stride(0),
        y_NTC.stride(1),
        window_cache.stride(0),
        steps.stride(0),
        steps.stride(1),
        W=width,
        BC=_BLOCK_C,
        HAS_FRESH=fresh_N is not None,
        HAS_LENS=seq_lens_N is not None,
        RECORD=record,
    )
    return y_NTC
