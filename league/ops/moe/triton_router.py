"""Triton kernel of ``moe.route_topk``: the router's fp32 softmax over all experts, the top-k and their
renormalised weights, in one launch.

In torch the same takes about six launches a layer (the fp32 copy of the logits, softmax, top-k's gather and sort,
the sum and the division); a decode step of 40 MoE layers spent ~0.9 ms in them at batch 256 on an H200. Each
program takes ``_BLOCK_T`` whole rows (every expert of a row in one block, so a row's numbers do not depend on the
other rows): the softmax of the row, then ``top_k`` rounds of picking the largest probability (the lowest expert
index among equal ones) and striking it out, then the picked probabilities divided by their sum. Experts come out
in descending order of probability, as ``torch.topk`` gives them. It does not decide when to run (``moe`` does)
and has no backward (``moe`` differentiates the weights given the chosen experts).

Imported only when Triton is installed. Runs on CUDA, or on CPU tensors under ``TRITON_INTERPRET=1``.

Legend: T rows (tokens), E experts, A chosen experts per row; inside the kernel BT rows per program, BE the padded
E, BA the padded A.
"""

import torch
import triton
import triton.language as tl

# one row a program, one warp: 2.7 us a call at batch 256 on an H200, 5.3 with 4 rows and 4 warps (torch: 24 us),
# benchmarks/results/kernels_gpu_router.json
_BLOCK_T = 1
_NUM_WARPS = 1
_NEG_INF = tl.constexpr(float("-inf"))  # a global a kernel can read must be a constexpr


@triton.jit(do_not_specialize=["T"])
def _route_topk_kernel(
    logits_ptr,
    weights_ptr,
    experts_ptr,
    T,
    stride_t,
    E: tl.constexpr,
    TOP_K: tl.constexpr,
    BT: tl.constexpr,
    BE: tl.constexpr,
    BA: tl.constexpr,
):
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.arange(0, BE)
    picks = tl.arange(0, BA)
    m_rows = rows < T
    m_cols = cols < E
    x = tl.load(
        logits_ptr + rows.to(tl.int64)[:, None] * stride_t + cols[None, :],
        mask=m_rows[:, None] & m_cols[None, :],
        other=0.0,
    ).to(tl.float32)
    x = tl.where(m_cols[None, :], x, _NEG_INF)  # padding experts get probability 0
    e = tl.exp(x - tl.max(x, 1)[:, None])
    p = e / tl.sum(e, 1)[:, None]
    chosen_p = tl.zeros([BT, BA], tl.float32)
    chosen_e = tl.zeros([BT, BA], tl.int32)
    for a in tl.static_range(TOP_K):
        best = tl.max(p, 1)
        index = tl.min(tl.where(p == best[:, None], cols[None, :], BE), 1)
        chosen_p = tl.where(picks[None, :] == a, best[:, None], chosen_p)
        chosen_e = tl.where(picks[None, :] == a, index[:, None], chosen_e)
        p = tl.where(cols[None, :] == index[:, None], -1.0, p)  # probabilities are >= 0: never picked again
    weights = chosen_p / tl.sum(chosen_p, 1)[:, None]
    out = rows.to(tl.int64)[:, None] * TOP_K + picks[None, :]
    m_out = m_rows[:, None] & (picks[None, :] < TOP_K)
    tl.store(weights_ptr + out, weights.to(weights_ptr.dtype.element_ty), mask=m_out)
    tl.store(experts_ptr + out, chosen_e.to(tl.int64), mask=m_out)


def route_topk_fwd(router_logits_TE: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``moe.route_topk`` by the kernel: ``(weights_TA in the logits' dtype, experts_TA int64)``; no autograd.
    The logits may be a column slice of a wider tensor (their last dim contiguous)."""
    num_rows, num_experts = router_logits_TE.shape
    assert 0 < top_k <= num_experts
    if router_logits_TE.stride(-1) != 1:
        router_logits_TE = router_logits_TE.contiguous()
    weights = router_logits_TE.new_empty(num_rows, top_k)
    experts = torch.empty(num_rows, top_k, dtype=torch.long, device=router_logits_TE.device)
    if num_rows:
        _route_topk_kernel[(triton.cdiv(num_rows, _BLOCK_T),)](
            router_logits_TE,
            weights,
            experts,
            num_rows,
            router_logits_TE.stride(0),
            E=num_experts,
            TOP_K=top_k,
            BT=_BLOCK_T,
            BE=triton.next_power_of_2(num_experts),
            BA=triton.next_power_of_2(top_k),
            num_warps=_NUM_WARPS,
        )
    return weights, experts
