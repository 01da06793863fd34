"""Triton kernels of the MoE bookkeeping around the experts, for decode and verify: the top-k routing, the sort of
the token-expert pairs by expert, and the combine of each token's A expert outputs. One launch each, where torch
takes ~6, ~9 and 2 small kernels; forward only.

Each computes what the torch code of ``moe`` computes, in the same arithmetic where that is known:

- :func:`route_topk_triton` is ``moe.route_topk``. The softmax follows torch's CUDA kernel for rows of up to 1024
  (``softmax_warp_forward``): the row's max, ``exp(x - max)`` by libdevice's ``expf`` (CUDA's ``expf``, at most 2
  ulp from the exact value; ``tl.exp`` would be ``ex2.approx`` of ``x * log2(e)``, several ulp off at large
  ``|x|``), the sum as torch's warp forms it (each of W lanes adds elements ``lane, lane + W, ...`` in order, then
  a butterfly over the lanes), and an IEEE division (``div_rn``; ``/`` is ``div.full``, 2 ulp): bitwise torch's
  probabilities, but that Triton links libdevice's flush-to-zero variant (it differs below 2**-126). The top-k
  probabilities are added in order a = 0..A-1 (the order of torch's ``sum(-1)`` on CPU; on CUDA torch's reduction
  of a row of 8 may differ, and then a renormalised weight can differ in its last fp32 bit, which a bf16 result
  absorbs but at rounding ties). Under the interpreter ``exp`` is numpy's.
- :func:`sort_pairs_triton` is ``moe.sort_pairs`` plus the inverse permutation, bitwise (integers).
- :func:`combine_triton` is ``moe._combine``: the A rows of a token summed in fp32 in order a = 0..A-1 and rounded
  once, as torch sums on CPU (bitwise there; on CUDA torch's reduction order over dim 1 is its own, and the fp32
  sums differ in the last bits, so a bf16 result differs where that moves a rounding).

Ties among the probabilities (equal bf16 logits are common: 256 draws share 8 bits of mantissa) go to the lower
expert index first. torch's CUDA topk does the same for rows this short: it gathers the top k in index order and
sorts them with a stable sort. Its CPU topk does not (the top 4 of five equal values at 1, 2, 4, 6, 7 came back as
4, 7, 6, 1), so on CPU the experts equal torch's only where the k + 1 largest probabilities of a row are distinct.
NaN logits are not supported.

Not responsible for choosing when to run (``moe`` does), for gradients, or for the expert compute
(``triton_moe``). Imported only when Triton is installed. Runs on CUDA, or on CPU tensors under
``TRITON_INTERPRET=1``. Launches read no device value on the host, so they can be captured in CUDA graphs.

Legend: T tokens, E experts, A experts per token (top-k), N = T * A token-expert pairs, D model dim; inside the
kernels BE experts padded to a power of two as W lanes of BE // W, BN pairs per block, BD columns.
"""

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

MAX_EXPERTS = 1024  # torch's one-warp softmax covers rows up to 1024; longer rows take another summation order
_SORT_BLOCK = 2048  # expert ids each program of the sort reads per step of its loops
_COMBINE_BLOCK = 1024  # columns per program of the combine
_NEG_INF = tl.constexpr(float("-inf"))  # a global a kernel can read must be a constexpr


@triton.jit
def _exp(x, ACCURATE: tl.constexpr):
    if ACCURATE:
        y = libdevice.exp(x)
    else:
        y = tl.exp(x)
    return y


@triton.jit
def _butterfly_sum(s, LOG_W: tl.constexpr):
    """The sum of the 2**LOG_W lane values ``s`` as ``__shfl_xor`` halves them: lane l adds lane ``l ^ W/2``, ..."""
    for _ in tl.static_range(LOG_W):
        s = tl.sum(tl.reshape(s, [2, s.shape[0] // 2]), axis=0)  # a sum of two values: one rounding, any order
    return tl.sum(s, axis=0)


@triton.jit
def _route_topk_kernel(
    logits_ptr,
    weights_ptr,
    experts_ptr,
    E,
    stride_l,
    TOPK: tl.constexpr,
    BE: tl.constexpr,
    W: tl.constexpr,
    LOG_W: tl.constexpr,
    ACCURATE_EXP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    its = tl.arange(0, BE // W)[:, None]
    cols = its * W + tl.arange(0, W)[None, :]  # element it * W + lane, held by lane as torch's warp holds it
    x = tl.load(logits_ptr + row * stride_l + cols, mask=cols < E, other=_NEG_INF).to(tl.float32)
    e = _exp(x - tl.max(x), ACCURATE_EXP)
    lanes = tl.zeros([W], dtype=tl.float32)
    for it in tl.static_range(BE // W):
        lanes += tl.sum(tl.where(its == it, e, 0.0), axis=0)  # picks row it: adding zeros is exact
    probs = tl.where(cols < E, tl.math.div_rn(e, tl.zeros_like(e) + _butterfly_sum(lanes, LOG_W)), _NEG_INF)
    ks = tl.arange(0, TOPK)
    top_w = tl.zeros([TOPK], dtype=tl.float32)
    top_e = tl.zeros([TOPK], dtype=tl.int32)
    total = 0.0  # 0 + p is p: the sum is p_0 + p_1 + ... in order
    for a in tl.static_range(TOPK):
        p = tl.max(probs)
        expert = tl.min(tl.where(probs == p, cols, BE))
        probs = tl.where(cols == expert, _NEG_INF, probs)
        top_w = tl.where(ks == a, p, top_w)
        top_e = tl.where(ks == a, expert, top_e)
        total += p
    weights = tl.math.div_rn(top_w, tl.zeros([TOPK], dtype=tl.float32) + total)
    tl.store(weights_ptr + row * TOPK + ks, weights.to(weights_ptr.dtype.element_ty))
    tl.store(experts_ptr + row * TOPK + ks, top_e.to(tl.int64))


def route_topk_triton(router_logits_TE: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``moe.route_topk`` in one launch: softmax over all experts in fp32, the top-k, renormalised to sum to one.

    Args:
        router_logits_TE (torch.Tensor): ``[T, E]`` in fp32, bf16 or fp16, last dim contiguous; E up to
            :data:`MAX_EXPERTS`.
        top_k (int): A, at most E and a power of two.

    Returns:
        ``(weights_TA, experts_TA)``: weights in the logits' dtype, experts int64, in descending probability.
    """
    num_tokens, num_experts = router_logits_TE.shape
    assert router_logits_TE.stride(-1) == 1 and top_k & (top_k - 1) == 0 and top_k <= num_experts <= MAX_EXPERTS
    device = router_logits_TE.device
    weights_TA = torch.empty(num_tokens, top_k, dtype=router_logits_TE.dtype, device=device)
    experts_TA = torch.empty(num_tokens, top_k, dtype=torch.int64, device=device)
    if num_tokens == 0:
        return weights_TA, experts_TA
    block_e = triton.next_power_of_2(num_experts)
    lanes = min(block_e, 32)
    _route_topk_kernel[(num_tokens,)](
        router_logits_TE,
        weights_TA,
        experts_TA,
        num_experts,
        router_logits_TE.stride(0),
        TOPK=top_k,
        BE=block_e,
        W=lanes,
        LOG_W=lanes.bit_length() - 1,
        ACCURATE_EXP=router_logits_TE.is_cuda,
        num_warps=1 if block_e <= 256 else 2,
    )
    return weights_TA, experts_TA


@triton.jit
def _sort_pairs_kernel(experts_ptr, order_ptr, offs_ptr, inverse_ptr, N, BN: tl.constexpr):
    expert = tl.program_id(0)
    lanes = tl.arange(0, BN)
    before = 0  # pairs of the experts below this one: where its group starts
    # a while loop, not range(): the interpreter cannot turn a runtime scalar into a Python int
    start = 0
    while start < N:
        experts = tl.load(experts_ptr + start + lanes, mask=start + lanes < N, other=expert).to(tl.int32)
        before += tl.sum((experts < expert).to(tl.int32), axis=0)
        start += BN
    slot = before
    start = 0
    while start < N:
        pairs = start + lanes
        mine = (tl.load(experts_ptr + pairs, mask=pairs < N, other=-1).to(tl.int32) == expert).to(tl.int32)
        # the pairs of this expert in pair order: stable
        slots = slot + tl.cumsum(mine, 0) - mine
        tl.store(order_ptr + slots, pairs.to(tl.int64), mask=mine == 1)
        tl.store(inverse_ptr + pairs, slots.to(tl.int64), mask=mine == 1)
        slot += tl.sum(mine, axis=0)
        start += BN
    tl.store(offs_ptr + expert, slot)


def sort_pairs_triton(experts_TA: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``moe.sort_pairs`` and the inverse permutation in one launch (bitwise the torch results).

    A counting sort with one program per expert: each reads all N expert ids twice (from L2), counting the pairs
    of lower experts, then placing its own pairs in pair order (stable) at that offset. The work is E * N
    comparisons spread over E programs: a few microseconds at decode and verify (N up to ~8k); prefill's tens of
    thousands of pairs are better sorted by torch.

    Args:
        experts_TA (torch.Tensor): ``[T, A]`` expert ids in ``[0, E)``, any integer dtype, contiguous.
        num_experts (int): E.

    Returns:
        ``(order_N, offs_E, inverse_N)``: the pair index ``t * A + a`` at each sorted position (int64), the group
        ends (int32, cumulative: expert ``e`` owns sorted positions ``[offs_E[e-1], offs_E[e])``), and each pair's
        sorted position (int64: ``inverse_N[order_N[i]] == i``).
    """
    assert experts_TA.is_contiguous()
    num_pairs = experts_TA.numel()
    device = experts_TA.device
    order_N = torch.empty(num_pairs, dtype=torch.int64, device=device)
    inverse_N = torch.empty(num_pairs, dtype=torch.int64, device=device)
    offs_E = torch.empty(num_experts, dtype=torch.int32, device=device)
    block_n = min(_SORT_BLOCK, triton.next_power_of_2(max(num_pairs, 1)))
    _sort_pairs_kernel[(num_experts,)](
        experts_TA, order_N, offs_E, inverse_N, num_pairs, BN=block_n, num_warps=8 if block_n >= 2048 else 4
    )
    return order_N, offs_E, inverse_N


@triton.jit
def _combine_kernel(
    y_ptr,
    inverse_ptr,
    residual_ptr,
    out_ptr,
    D,
    stride_y,
    stride_r,
    stride_o,
    TOPK: tl.constexpr,
    BD: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    mask = cols < D
    acc = tl.zeros([BD], dtype=tl.float32)
    for a in tl.static_range(TOPK):
        row = tl.load(inverse_ptr + token * TOPK + a)
        acc += tl.load(y_ptr + row * stride_y + cols, mask=mask, other=0.0).to(tl.float32)
    out = acc.to(out_ptr.dtype.element_ty)
    if HAS_RESIDUAL:  # torch's ``combined + residual``: both rounded to the dtype, added in fp32
        residual = tl.load(residual_ptr + token * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        out = (out.to(tl.float32) + residual).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + token * stride_o + cols, out, mask=mask)


def combine_triton(
    y_ND: torch.Tensor, inverse_N: torch.Tensor, num_topk: int, residual_TD: torch.Tensor | None = None
) -> torch.Tensor:
    """``moe._combine`` in one launch: the sum of each token's A rows of ``y_ND``, plus ``residual_TD`` if given.

    Args:
        y_ND (torch.Tensor): ``[N, D]`` rows in expert order, last dim contiguous.
        inverse_N (torch.Tensor): sorted position of pair ``t * A + a`` (from :func:`sort_pairs_triton`).
        num_topk (int): A.
        residual_TD (torch.Tensor, Optional): ``[T, D]`` in y's dtype, last dim contiguous, added to the rounded
            sum (as ``_combine(...) + residual_TD``). Default: ``None``.

    Returns:
        ``[T, D]`` in y's dtype.
    """
    num_pairs, dim = y_ND.shape
    num_tokens = num_pairs // num_topk
    assert y_ND.stride(-1) == 1 and (residual_TD is None or residual_TD.stride(-1) == 1)
    out_TD = torch.empty(num_tokens, dim, dtype=y_ND.dtype, device=y_ND.device)
    if num_tokens == 0:
        return out_TD
    block_d = min(_COMBINE_BLOCK, triton.next_power_of_2(dim))
    _combine_kernel[(num_tokens, triton.cdiv(dim, block_d))](
        y_ND,
        inverse_N,
        out_TD if residual_TD is None else residual_TD,
        out_TD,
        dim,
        y_ND.stride(0),
        0 if residual_TD is None else residual_TD.stride(0),
        out_TD.stride(0),
        TOPK=num_topk,
        BD=block_d,
        HAS_RESIDUAL=residual_TD is not None,
        num_warps=4,
    )
    return out_TD
