"""The Triton routing, pair sort and combine of ``ops.triton_route`` against the torch code of ``ops.moe`` on CUDA,
at the real model's sizes (skipped without CUDA or Triton), and their capture in a CUDA graph.

Exact where the module claims it: the experts (ties included: broken by index as torch's CUDA topk does), the
sort and its inverse, and the combine against an fp32 sum in order a = 0..A-1. The weights and torch's own combine
are held to one ulp (fp32 weights to two); the counts of differing values are printed (``-s``). Run on the GPU
machine with ``python -m pytest tests/gpu/test_fast_route.py -q -s``.
"""

import importlib.util

import pytest
import torch

from league.ops.moe import _combine, route_topk, sort_pairs

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("triton") is None, reason="needs CUDA and triton"
)

# Qwen3.6-35B-A3B: hidden 2048, 256 experts, top-8
DIM, NUM_EXPERTS, TOP_K = 2048, 256, 8
NUM_TOKENS = [1, 64, 256, 2048]


def ulps(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``|x - ref|`` in units of the last place of ``ref`` in its dtype."""
    mantissa_bits = {torch.float32: 23, torch.bfloat16: 7}[ref.dtype]
    exponent = torch.frexp(ref.double().abs().clamp_min(1e-30)).exponent - 1
    return (x.double() - ref.double()).abs() / torch.exp2((exponent - mantissa_bits).double())


def router_logits(num_tokens: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """fp32: normal draws (a tie has probability ~0). bf16: each row a permutation of the 256 distinct bf16 values
    ``(i - 128) / 32``, so no two probabilities of a row are within 3%."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    if dtype == torch.float32:
        return torch.randn(num_tokens, NUM_EXPERTS, generator=gen, device="cuda") * 2
    keys = torch.rand(num_tokens, NUM_EXPERTS, generator=gen, device="cuda")
    steps = keys.argsort(-1) - NUM_EXPERTS // 2
    return (steps / 32).to(dtype)


@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_route_topk_matches_torch(num_tokens, dtype):
    from league.ops.triton_route import route_topk_triton

    logits = router_logits(num_tokens, dtype)
    weights, experts = route_topk_triton(logits, TOP_K)
    ref_weights, ref_experts = route_topk(logits, TOP_K)
    assert torch.equal(experts, ref_experts)
    differing = (weights != ref_weights).sum().item()
    print(f"route {dtype} T={num_tokens}: {differing}/{weights.numel()} weights differ from torch")
    # fp32: one ulp in torch's sum of the top-k (its CUDA reduction order) can move a quotient by two
    assert ulps(weights, ref_weights).max() <= (1 if dtype == torch.bfloat16 else 2)


@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_route_topk_softmax_is_torchs_bitwise(num_tokens, dtype):
    """torch's own softmax and topk, the top-k then added in order a = 0..A-1 as the kernel adds them: equal bit for
    bit if the kernel's probabilities are torch's (libdevice's expf, torch's warp summation order, IEEE division)."""
    from league.ops.triton_route import route_topk_triton

    logits = router_logits(num_tokens, dtype, seed=6)
    top_TA = logits.float().softmax(-1).topk(TOP_K)
    total_T1 = top_TA.values[:, :1]
    for a in range(1, TOP_K):
        total_T1 = total_T1 + top_TA.values[:, a : a + 1]
    weights, experts = route_topk_triton(logits, TOP_K)
    assert torch.equal(experts, top_TA.indices)
    assert torch.equal(weights, (top_TA.values / total_T1).to(dtype))


@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
def test_route_topk_breaks_ties_as_torch_cuda(num_tokens):
    """Plain bf16 normal logits: most rows hold equal values among their top 9 (8 bits of mantissa)."""
    from league.ops.triton_route import route_topk_triton

    gen = torch.Generator(device="cuda").manual_seed(5)
    logits = torch.randn(num_tokens, NUM_EXPERTS, generator=gen, device="cuda").bfloat16()
    weights, experts = route_topk_triton(logits, TOP_K)
    ref_weights, ref_experts = route_topk(logits, TOP_K)
    assert torch.equal(experts, ref_experts)
    assert ulps(weights, ref_weights).max() <= 1


@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
@pytest.mark.parametrize("case", ["routed", "unused_experts", "one_expert_takes_all"])
def test_sort_pairs_matches_torch(num_tokens, case):
    from league.ops.triton_route import sort_pairs_triton

    experts = route_topk(router_logits(num_tokens, torch.float32, seed=1), TOP_K)[1]
    if case == "unused_experts":  # experts 0..127 receive no pair
        experts = experts // 2 + 128
    if case == "one_expert_takes_all":
        experts = torch.full_like(experts, 5)
    order, offs, inverse = sort_pairs_triton(experts, NUM_EXPERTS)
    ref_order, ref_offs = sort_pairs(experts, NUM_EXPERTS)
    ref_inverse = torch.empty_like(ref_order).scatter_(0, ref_order, torch.arange(ref_order.numel(), device="cuda"))
    assert torch.equal(order, ref_order) and torch.equal(offs, ref_offs) and torch.equal(inverse, ref_inverse)


@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
def test_combine_matches_torch(num_tokens):
    from league.ops.triton_route import combine_triton, sort_pairs_triton

    gen = torch.Generator(device="cuda").manual_seed(2)
    experts = route_topk(router_logits(num_tokens, torch.float32, seed=2), TOP_K)[1]
    inverse = sort_pairs_triton(experts, NUM_EXPERTS)[2]
    y = torch.randn(num_tokens * TOP_K, DIM, generator=gen, device="cuda").bfloat16()
    residual = torch.randn(num_tokens, DIM, generator=gen, device="cuda").bfloat16()
    out = combine_triton(y, inverse, TOP_K)
    rows = y.float().index_select(0, inverse).view(num_tokens, TOP_K, DIM)
    in_order = rows[:, 0]
    for a in range(1, TOP_K):
        in_order = in_order + rows[:, a]
    assert torch.equal(out, in_order.bfloat16())
    assert torch.equal(combine_triton(y, inverse, TOP_K, residual), out + residual)
    ref = _combine(y, inverse, TOP_K)
    print(f"combine T={num_tokens}: {(out != ref).sum().item()}/{out.numel()} values differ from torch")
    assert ulps(out, ref).max() <= 1


def test_route_sort_combine_replay_in_a_cuda_graph():
    from league.ops.triton_route import combine_triton, route_topk_triton, sort_pairs_triton

    num_tokens = 256
    logits = router_logits(num_tokens, torch.bfloat16, seed=3)
    y = torch.randn(num_tokens * TOP_K, DIM, device="cuda").bfloat16()

    def step():
        weights, experts = route_topk_triton(logits, TOP_K)
        order, offs, inverse = sort_pairs_triton(experts, NUM_EXPERTS)
        return weights, experts, order, offs, inverse, combine_triton(y, inverse, TOP_K)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    logits.copy_(router_logits(num_tokens, torch.bfloat16, seed=4))
    y.normal_()
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(captured, step()):
        assert torch.equal(got, want)
