"""The Triton routing, pair sort and combine of ``ops.triton_route`` against the torch code of ``ops.moe``.

Runs on CUDA, or on CPU under ``TRITON_INTERPRET=1`` (``PYTHONPATH`` holding a Triton install); skipped otherwise.
The interpreter truncates fp32 to bf16 where torch rounds to nearest, so bf16 results are held to one ulp.
"""

import importlib.util
import os

import numpy as np
import pytest
import torch

from league.ops.moe import _combine, route_topk, sort_pairs

HAS_TRITON = importlib.util.find_spec("triton") is not None
CAN_RUN_TRITON = HAS_TRITON and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = pytest.mark.skipif(not CAN_RUN_TRITON, reason="needs triton and CUDA or TRITON_INTERPRET=1")


def ulps(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``|x - ref|`` in units of the last place of ``ref`` in its dtype."""
    mantissa_bits = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}[ref.dtype]
    exponent = torch.frexp(ref.double().abs().clamp_min(1e-30)).exponent - 1
    return (x.double() - ref.double()).abs() / torch.exp2((exponent - mantissa_bits).double())


def distinct_logits(num_tokens: int, num_experts: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Each row a permutation of ``(i - E/2) * 8/E``: exact in bf16, no two probabilities within 3% of each other."""
    gen = torch.Generator().manual_seed(seed)
    steps = torch.stack([torch.randperm(num_experts, generator=gen) for _ in range(num_tokens)])
    return ((steps - num_experts // 2) * (8.0 / num_experts)).to(dtype).to(DEVICE)


def inverse_of(order_N: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(order_N).scatter_(0, order_N, torch.arange(order_N.numel(), device=order_N.device))


@pytest.mark.parametrize(
    "num_tokens, num_experts, top_k",
    [(1, 256, 8), (5, 256, 2), (64, 256, 8), (64, 8, 2), (5, 8, 8), (3, 200, 8), (2, 512, 8)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_route_topk_matches_torch(num_tokens, num_experts, top_k, dtype):
    from league.ops.triton_route import route_topk_triton

    logits = distinct_logits(num_tokens, num_experts, dtype, seed=num_tokens + num_experts)
    weights, experts = route_topk_triton(logits, top_k)
    ref_weights, ref_experts = route_topk(logits, top_k)
    assert experts.dtype == torch.int64 and weights.dtype == dtype
    assert torch.equal(experts, ref_experts)
    # fp32: numpy's exp and torch's vectorised CPU softmax sum each land within an ulp of the truth
    bound = 1 if dtype == torch.bfloat16 else 4
    differing = (weights != ref_weights).sum().item()
    print(f"{dtype} T={num_tokens} E={num_experts} A={top_k}: {differing}/{weights.numel()} weights differ")
    assert ulps(weights, ref_weights).max() <= bound


def cuda_softmax_route(logits_TE: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``route_topk`` with the softmax summed as torch's CUDA warp kernel sums it (W lanes adding elements
    ``lane, lane + W, ...``, then a butterfly), and numpy's exp (the interpreter's)."""
    num_experts = logits_TE.shape[-1]
    padded = 1 << (num_experts - 1).bit_length()
    lanes = min(padded, 32)
    x_TE = torch.nn.functional.pad(logits_TE.float(), (0, padded - num_experts), value=float("-inf"))
    e_TE = torch.from_numpy(np.exp((x_TE - x_TE.max(-1, keepdim=True).values).numpy()))
    e_TIW = e_TE.view(-1, padded // lanes, lanes)
    s_TW = e_TIW[:, 0]
    for it in range(1, padded // lanes):
        s_TW = s_TW + e_TIW[:, it]
    while s_TW.shape[-1] > 1:
        half = s_TW.shape[-1] // 2
        s_TW = s_TW[:, :half] + s_TW[:, half:]
    weights_TA, experts_TA = (e_TE[:, :num_experts] / s_TW).topk(top_k, dim=-1)
    total_T1 = weights_TA[:, :1]
    for a in range(1, top_k):
        total_T1 = total_T1 + weights_TA[:, a : a + 1]
    return weights_TA / total_T1, experts_TA


@pytest.mark.skipif(DEVICE == "cuda", reason="the interpreter's exp is numpy's (tests/gpu compares with torch on CUDA)")
@pytest.mark.parametrize("num_tokens, num_experts, top_k", [(64, 256, 8), (5, 8, 2), (3, 200, 8), (2, 512, 8)])
def test_route_topk_sums_as_torch_cuda(num_tokens, num_experts, top_k):
    from league.ops.triton_route import route_topk_triton

    logits = distinct_logits(num_tokens, num_experts, torch.float32, seed=1) + 0.1 * torch.randn(num_tokens, 1)
    weights, experts = route_topk_triton(logits, top_k)
    ref_weights, ref_experts = cuda_softmax_route(logits, top_k)
    assert torch.equal(experts, ref_experts) and torch.equal(weights, ref_weights)


def test_route_topk_ties_take_the_lower_expert_first():
    from league.ops.triton_route import route_topk_triton

    logits = torch.zeros(3, 256, device=DEVICE)
    logits[1, [7, 100, 200]] = 1.0  # three tied winners, then 253 tied losers
    weights, experts = route_topk_triton(logits, 8)
    assert experts[0].tolist() == list(range(8)) and torch.all(weights[0] == 0.125)
    assert experts[1].tolist() == [7, 100, 200, 0, 1, 2, 3, 4]
    assert torch.allclose(weights.sum(-1), torch.ones(3, device=DEVICE))


@pytest.mark.parametrize(
    "case", ["random", "one_token", "unused_experts", "one_expert_takes_all", "multi_block", "empty"]
)
def test_sort_pairs_matches_torch(case, monkeypatch):
    import league.ops.triton_route as triton_route

    num_tokens, top_k, num_experts = {"one_token": (1, 8, 256), "multi_block": (20, 4, 16), "empty": (0, 8, 8)}.get(
        case, (64, 8, 256)
    )
    gen = torch.Generator().manual_seed(0)
    experts = torch.rand(num_tokens, num_experts, generator=gen).topk(top_k).indices
    if case == "unused_experts":  # experts 0, 17 and 200..255 receive no pair
        experts = torch.rand(num_tokens, 199, generator=gen).topk(top_k).indices + 1
        experts[experts == 17] = 199
    if case == "one_expert_takes_all":
        experts = torch.full((num_tokens, top_k), 3)
    if case == "multi_block":  # each program loops over 5 blocks of pairs
        monkeypatch.setattr(triton_route, "_SORT_BLOCK", 16)
    experts = experts.to(DEVICE)
    order, offs, inverse = triton_route.sort_pairs_triton(experts, num_experts)
    ref_order, ref_offs = sort_pairs(experts, num_experts)
    assert order.dtype == torch.int64 and offs.dtype == torch.int32 and inverse.dtype == torch.int64
    assert torch.equal(order, ref_order)
    assert torch.equal(offs, ref_offs)
    assert torch.equal(inverse, inverse_of(ref_order))


def sequential_combine(y_ND: torch.Tensor, inverse_N: torch.Tensor, num_topk: int) -> torch.Tensor:
    """The sum over a = 0..A-1 in fp32, in that order, rounded once."""
    rows_TAD = y_ND.float().index_select(0, inverse_N).view(-1, num_topk, y_ND.shape[-1])
    acc_TD = rows_TAD[:, 0]
    for a in range(1, num_topk):
        acc_TD = acc_TD + rows_TAD[:, a]
    return acc_TD.to(y_ND.dtype)


@pytest.mark.parametrize("num_tokens, top_k, dim", [(1, 8, 2048), (5, 8, 96), (64, 2, 200)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_combine_matches_torch(num_tokens, top_k, dim, dtype):
    from league.ops.triton_route import combine_triton

    gen = torch.Generator().manual_seed(num_tokens)
    y = torch.randn(num_tokens * top_k, dim, generator=gen).to(dtype).to(DEVICE)
    inverse = torch.randperm(num_tokens * top_k, generator=gen).to(DEVICE)
    residual = torch.randn(num_tokens, dim, generator=gen).to(dtype).to(DEVICE)
    out = combine_triton(y, inverse, top_k)
    with_residual = combine_triton(y, inverse, top_k, residual)
    ref = _combine(y, inverse, top_k)
    if dtype == torch.float32:
        assert torch.equal(out, sequential_combine(y, inverse, top_k))
        assert torch.equal(with_residual, out + residual)
        if DEVICE == "cpu":  # torch's CPU reduction over dim 1 adds in order: bitwise
            assert torch.equal(out, ref)
        return
    assert ulps(out, ref).max() <= 1
    # the residual is added to the rounded sum, in fp32, and rounded again: torch's ``out + residual``
    assert ulps(with_residual, out + residual).max() <= (0 if DEVICE == "cuda" else 1)
