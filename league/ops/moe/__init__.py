"""Mixture-of-experts routing and expert compute. Not responsible for placing experts on devices.

:func:`swiglu_experts` picks the form: the reference loop over experts (CPU, row-by-row numerics, and the ground
truth of the tests) or, on CUDA, one of two forms over the token-expert pairs sorted by expert:

- :func:`grouped_swiglu_experts`, two grouped GEMMs (``torch._grouped_mm``), differentiable: training and prefill.
- ``ops.moe.triton.grouped_swiglu_experts_triton``, a one-launch Triton sort of the pairs (bitwise :func:`sort_pairs`)
  and two Triton kernels that stream each expert's weights once, forward only: decode and verify. With few rows
  per expert the step is bound by reading the weights, and cutlass' grouped GEMM runs such skinny groups at 2-3
  TB/s of an H200's 4.8 (19.4 ms of a decode step at batch 256 over 40 layers, where the weights alone need 13.4
  ms). Chosen on CUDA in bf16 when Triton is installed, no gradient is needed,
  and the mean rows per expert ``N / E`` is at most :data:`TRITON_MAX_ROWS_PER_EXPERT`.

Neither reads a value back to the host, so a CUDA graph can capture them (the grouped GEMMs when
``torch._grouped_mm`` takes its native path: bf16 on sm90/sm100; other dtypes run torch's per-group loop).

Legend: T tokens, D model dim, E experts, I expert intermediate dim, A experts per token (top-k),
N = T * A token-expert pairs.
"""

import torch

from league.ops.activations import silu
from league.ops.backends import installed, use_kernel
from league.ops.linear import linear
from league.ops.numerics import FAST, Numerics

# mean token-expert pairs per expert (N / E) up to which the Triton kernels run rather than the grouped GEMMs (256
# experts, top-8: 32 is a batch of 1024 tokens); a first guess, to be set from benchmarks/kernels_gpu.py --only moe
TRITON_MAX_ROWS_PER_EXPERT = 32


def route_topk(router_logits_TE: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts in fp32, keep the top-k, renormalise them to sum to one.

    On CUDA with Triton (fp32/bf16/fp16 logits): ``moe.triton_router``'s one-launch kernel, for the trainer and the
    engine alike (so they route alike); its weights are differentiated, given the experts it chose, by
    :func:`renormalised_weights`. Elsewhere :func:`route_topk_reference`.

    Returns:
        ``(weights_TA, experts_TA)``: weights in the dtype of the logits, expert indices (int64), in descending
        order of probability.
    """
    if use_kernel(router_logits_TE, op="route_topk"):
        if torch.is_grad_enabled() and router_logits_TE.requires_grad:
            return _RouteTopk.apply(router_logits_TE, top_k)
        from league.ops.moe.triton_router import route_topk_fwd

        return route_topk_fwd(router_logits_TE, top_k)
    return route_topk_reference(router_logits_TE, top_k)


def renormalised_weights(router_logits_TE: torch.Tensor, experts_TA: torch.Tensor) -> torch.Tensor:
    """The weights of the chosen experts: their fp32 softmax probabilities over all experts divided by their sum,
    in the dtype of the logits (differentiable in the logits)."""
    probs_TE = router_logits_TE.to(torch.promote_types(router_logits_TE.dtype, torch.float32)).softmax(-1)
    chosen_TA = probs_TE.gather(-1, experts_TA)
    return (chosen_TA / chosen_TA.sum(-1, keepdim=True)).to(router_logits_TE.dtype)


class _RouteTopk(torch.autograd.Function):
    """:func:`route_topk` by the kernel, the gradient of its weights by :func:`renormalised_weights` of the experts
    it chose."""

    @staticmethod
    def forward(ctx, router_logits_TE: torch.Tensor, top_k: int):
        from league.ops.moe.triton_router import route_topk_fwd

        weights_TA, experts_TA = route_topk_fwd(router_logits_TE, top_k)
        ctx.save_for_backward(router_logits_TE, experts_TA)
        ctx.mark_non_differentiable(experts_TA)
        return weights_TA, experts_TA

    @staticmethod
    def backward(ctx, grad_weights_TA: torch.Tensor, _grad_experts):
        router_logits_TE, experts_TA = ctx.saved_tensors
        with torch.enable_grad():
            logits = router_logits_TE.detach().requires_grad_()
            (grad,) = torch.autograd.grad(renormalised_weights(logits, experts_TA), logits, grad_weights_TA)
        return grad, None


def route_topk_reference(router_logits_TE: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`route_topk` in torch."""
    probs_TE = router_logits_TE.to(torch.promote_types(router_logits_TE.dtype, torch.float32)).softmax(-1)
    weights_TA, experts_TA = probs_TE.topk(top_k, dim=-1)
    weights_TA = weights_TA / weights_TA.sum(-1, keepdim=True)
    return weights_TA.to(router_logits_TE.dtype), experts_TA


def swiglu_experts(
    x_TD: torch.Tensor,
    w_gate_up_E2ID: torch.Tensor,
    w_down_EDI: torch.Tensor,
    weights_TA: torch.Tensor,
    experts_TA: torch.Tensor,
    numerics: Numerics = FAST,
) -> torch.Tensor:
    """``sum_a w_a * down_e(silu(gate_e x) * up_e x)`` over each token's chosen experts.

    On CUDA (numerics not row by row) runs ``ops.moe.triton.grouped_swiglu_experts_triton`` where
    :func:`triton_experts_fit`, else :func:`grouped_swiglu_experts` where :func:`grouped_mm_fits`; elsewhere
    :func:`swiglu_experts_reference`.

    Args:
        x_TD (torch.Tensor): ``[T, D]``.
        w_gate_up_E2ID (torch.Tensor): ``[E, 2I, D]``; rows ``[:I]`` are the gate, ``[I:]`` the up projection.
        w_down_EDI (torch.Tensor): ``[E, D, I]``.
        weights_TA, experts_TA (torch.Tensor): from :func:`route_topk`.
        numerics (Numerics): row by row: row-independent matmuls (see ``ops.linear``). Default: ``FAST``.
    """
    args = (x_TD, w_gate_up_E2ID, w_down_EDI, weights_TA, experts_TA)
    fast = use_kernel(x_TD, numerics, dtypes=None, package=None)
    if fast and triton_experts_fit(*args):
        from league.ops.moe.triton import SORT_MAX_PAIRS, grouped_swiglu_experts_triton

        large = experts_TA.numel() > SORT_MAX_PAIRS  # past the Triton sort's size: torch's
        return grouped_swiglu_experts_triton(*args, sort_pairs(experts_TA, w_gate_up_E2ID.shape[0]) if large else None)
    if fast and grouped_mm_fits(x_TD, w_gate_up_E2ID, w_down_EDI):
        return grouped_swiglu_experts(*args)
    if dense_experts_fit(*args, numerics):
        return swiglu_experts_dense(*args)
    return swiglu_experts_reference(x_TD, w_gate_up_E2ID, w_down_EDI, weights_TA, experts_TA, numerics)


DENSE_MAX_OVERHEAD = 4
"""The most experts a token runs in :func:`swiglu_experts_dense` for each one it chose (E / A)."""


def dense_experts_fit(
    x_TD: torch.Tensor,
    w_gate_up_E2ID: torch.Tensor,
    w_down_EDI: torch.Tensor,
    weights_TA: torch.Tensor,
    experts_TA: torch.Tensor,
    numerics: Numerics = FAST,
) -> bool:
    """Whether the CPU runs :func:`swiglu_experts_dense`: not on CUDA, numerics not row by row, no gradient wanted,
    and few enough experts that running every one for every token costs at most :data:`DENSE_MAX_OVERHEAD` times
    the chosen ones' work (a tiny model's handful of experts: a few large matmuls instead of a loop of small ones)."""
    if x_TD.is_cuda or numerics.row_by_row or (torch.is_grad_enabled() and x_TD.requires_grad):
        return False
    return w_gate_up_E2ID.shape[0] <= DENSE_MAX_OVERHEAD * experts_TA.shape[1]


def swiglu_experts_dense(
    x_TD: torch.Tensor,
    w_gate_up_E2ID: torch.Tensor,
    w_down_EDI: torch.Tensor,
    weights_TA: torch.Tensor,
    experts_TA: torch.Tensor,
) -> torch.Tensor:
    """:func:`swiglu_experts` with every expert run for every token (batched matmuls), each token's output the sum of
    its chosen experts' weighted outputs (the others weighted 0); equal to :func:`swiglu_experts_reference` to
    rounding. Forward only."""
    num_experts, two_i = w_gate_up_E2ID.shape[0], w_gate_up_E2ID.shape[1]
    gate_up_ETI = torch.matmul(x_TD[None], w_gate_up_E2ID.transpose(1, 2))
    gate, up = gate_up_ETI.split(two_i // 2, dim=-1)
    y_ETD = torch.matmul(silu(gate) * up, w_down_EDI.transpose(1, 2))
    weights_TE = x_TD.new_zeros(x_TD.shape[0], num_experts).scatter_(1, experts_TA, weights_TA.to(x_TD.dtype))
    return torch.einsum("etd,te->td", y_ETD, weights_TE)


def swiglu_experts_reference(
    x_TD: torch.Tensor,
    w_gate_up_E2ID: torch.Tensor,
    w_down_EDI: torch.Tensor,
    weights_TA: torch.Tensor,
    experts_TA: torch.Tensor,
    numerics: Numerics = FAST,
) -> torch.Tensor:
    """The reference: a loop over the experts that received tokens (arguments as :func:`swiglu_experts`)."""
    numerics = numerics.plain_gemm()
    out_TD = torch.zeros_like(x_TD)
    flat_experts = experts_TA.reshape(-1)
    order = flat_experts.argsort(stable=True)
    counts = torch.bincount(flat_experts, minlength=w_gate_up_E2ID.shape[0]).tolist()
    token_of = order // experts_TA.shape[1]
    weight_of = weights_TA.reshape(-1)[order]
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        rows = token_of[start : start + count]
        gate, up = linear(x_TD[rows], w_gate_up_E2ID[expert], numerics).chunk(2, dim=-1)
        hidden = silu(gate, numerics) * up
        y = linear(hidden, w_down_EDI[expert], numerics) * weight_of[start : start + count, None]
        out_TD.index_add_(0, rows, y.to(out_TD.dtype))
        start += count
    return out_TD


def grouped_mm_fits(x_TD: torch.Tensor, w_gate_up_E2ID: torch.Tensor, w_down_EDI: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` takes these operands: one float dtype, rows of D and I a multiple of 16 bytes."""
    if not hasattr(torch, "_grouped_mm") or x_TD.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    if w_gate_up_E2ID.dtype != x_TD.dtype or w_down_EDI.dtype != x_TD.dtype:
        return False
    align = 16 // x_TD.element_size()
    return x_TD.shape[-1] % align == 0 and w_down_EDI.shape[-1] % align == 0


def triton_experts_fit(
    x_TD: torch.Tensor,
    w_gate_up_E2ID: torch.Tensor,
    w_down_EDI: torch.Tensor,
    weights_TA: torch.Tensor,
    experts_TA: torch.Tensor,
) -> bool:
    """Whether the Triton experts serve this call: bf16 operands, Triton installed, no gradient wanted, and at most
    :data:`TRITON_MAX_ROWS_PER_EXPERT` pairs per expert on average (decided on the host from the shapes alone)."""
    if not all(t.dtype == torch.bfloat16 for t in (x_TD, w_gate_up_E2ID, w_down_EDI)) or not installed("triton"):
        return False
    operands = (x_TD, w_gate_up_E2ID, w_down_EDI, weights_TA)
    if torch.is_grad_enabled() and any(t.requires_grad for t in operands):
        return False
    return experts_TA.numel() <= TRITON_MAX_ROWS_PER_EXPERT * w_gate_up_E2ID.shape[0]


def grouped_mm_is_native(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``torch._grouped_mm`` runs its own kernel here (bf16 on Hopper or Blackwell); elsewhere torch falls
    back to a per-group loop that reads the group offsets on the host, which a CUDA graph cannot capture."""
    if device.type != "cuda" or dtype != torch.bfloat16 or not hasattr(torch, "_grouped_mm"):
        return False
    return torch.cuda.get_device_capability(device)[0] in (9, 10)


def grouped_swiglu_experts(
    x_TD: torch.Tensor,
    w_gate_up_E2ID: torch.Tensor,
    w_down_EDI: torch.Tensor,
    weights_TA: torch.Tensor,
    experts_TA: torch.Tensor,
) -> torch.Tensor:
    """:func:`swiglu_experts` as two grouped GEMMs over the token-expert pairs sorted by expert.

    The pairs are sorted by expert (stable), the group ends are found by a binary search in the sorted expert
    ids, and each pair's output is read back through the inverse permutation and summed over the token's A
    experts: no host synchronisation, and no scatter-add onto shared rows (deterministic), in forward or
    backward. Differentiable in ``x``, both
    weights and ``weights_TA``. Arguments as :func:`swiglu_experts`; needs :func:`grouped_mm_fits`.
    """
    num_topk = experts_TA.shape[1]
    order_N, offs_E = sort_pairs(experts_TA, w_gate_up_E2ID.shape[0])
    inverse_N = torch.empty_like(order_N).scatter_(0, order_N, torch.arange(order_N.numel(), device=x_TD.device))
    token_N = order_N // num_topk
    x_ND = _Dispatch.apply(x_TD, token_N, inverse_N, num_topk)
    gate_NI, up_NI = torch._grouped_mm(x_ND, w_gate_up_E2ID.transpose(-2, -1), offs=offs_E).chunk(2, dim=-1)
    y_ND = torch._grouped_mm(silu(gate_NI) * up_NI, w_down_EDI.transpose(-2, -1), offs=offs_E)
    y_ND = (y_ND * weights_TA.reshape(-1).index_select(0, order_N)[:, None]).to(x_TD.dtype)
    return _Combine.apply(y_ND, token_N, inverse_N, num_topk)


def sort_pairs(experts_TA: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The token-expert pairs sorted by expert (stable), without a host synchronisation.

    Returns:
        ``(order_N, offs_E)``: the pair index ``t * A + a`` at each sorted position (int64), and the group ends
        (int32, cumulative: expert ``e`` owns sorted positions ``[offs_E[e-1], offs_E[e])``).
    """
    # the narrowest key type: a radix sort of 8-bit keys makes one pass where int64 keys make eight
    key_dtype = torch.uint8 if num_experts <= 256 else torch.int16 if num_experts <= 2**15 else torch.int32
    sorted_experts_N, order_N = experts_TA.reshape(-1).to(key_dtype).sort(stable=True)
    # group ends by binary search: bincount on CUDA reads its input's max back to the host
    expert_ids_E = torch.arange(num_experts, device=experts_TA.device, dtype=sorted_experts_N.dtype)
    offs_E = torch.searchsorted(sorted_experts_N, expert_ids_E, right=True).to(torch.int32)
    return order_N, offs_E


def _dispatch(x_TD: torch.Tensor, token_N: torch.Tensor) -> torch.Tensor:
    """Row ``i`` of the result is the token of pair ``i`` (pairs in expert order)."""
    return x_TD.index_select(0, token_N)


def _combine(y_ND: torch.Tensor, inverse_N: torch.Tensor, num_topk: int) -> torch.Tensor:
    """Sum of each token's A pair rows: pair ``t * A + a`` sits at row ``inverse_N[t * A + a]`` of ``y_ND``."""
    num_tokens = y_ND.shape[0] // num_topk
    return y_ND.index_select(0, inverse_N).view(num_tokens, num_topk, y_ND.shape[-1]).sum(1)


class _Dispatch(torch.autograd.Function):
    """:func:`_dispatch`, whose backward is :func:`_combine` (a gather and a sum, where autograd would scatter-add)."""

    @staticmethod
    def forward(ctx, x_TD: torch.Tensor, token_N: torch.Tensor, inverse_N: torch.Tensor, num_topk: int):
        ctx.save_for_backward(token_N, inverse_N)
        ctx.num_topk = num_topk
        return _dispatch(x_TD, token_N)

    @staticmethod
    def backward(ctx, grad_ND: torch.Tensor):
        token_N, inverse_N = ctx.saved_tensors
        return _combine(grad_ND, inverse_N, ctx.num_topk), None, None, None


class _Combine(torch.autograd.Function):
    """:func:`_combine`, whose backward is :func:`_dispatch`."""

    @staticmethod
    def forward(ctx, y_ND: torch.Tensor, token_N: torch.Tensor, inverse_N: torch.Tensor, num_topk: int):
        ctx.save_for_backward(token_N, inverse_N)
        return _combine(y_ND, inverse_N, num_topk)

    @staticmethod
    def backward(ctx, grad_TD: torch.Tensor):
        token_N, inverse_N = ctx.saved_tensors
        return _dispatch(grad_TD, token_N), None, None, None
