"""The CPU's dense expert form (every expert for every token, weighted by the routing) against the reference loop,
and where the dispatcher uses it."""

import pytest
import torch

from league.ops.moe import dense_experts_fit, route_topk, swiglu_experts, swiglu_experts_dense, swiglu_experts_reference
from league.ops.numerics import BATCH_INVARIANT, FAST


def operands(num_tokens, num_experts, top_k, dim=32, inter=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, dim, generator=gen)
    w_gate_up = torch.randn(num_experts, 2 * inter, dim, generator=gen) * 0.2
    w_down = torch.randn(num_experts, dim, inter, generator=gen) * 0.2
    weights, experts = route_topk(torch.randn(num_tokens, num_experts, generator=gen), top_k)
    return x, w_gate_up, w_down, weights, experts


@pytest.mark.parametrize(("num_tokens", "num_experts", "top_k"), [(1, 8, 2), (16, 8, 2), (37, 4, 1), (5, 8, 8)])
def test_dense_experts_equal_the_reference(num_tokens, num_experts, top_k):
    args = operands(num_tokens, num_experts, top_k)
    torch.testing.assert_close(swiglu_experts_dense(*args), swiglu_experts_reference(*args), atol=1e-6, rtol=1e-5)


def test_the_dispatcher_runs_dense_only_where_it_is_cheap_and_exact_modes_keep_the_reference():
    small = operands(16, 8, 2)  # 8 experts for 2 chosen: 4x the work, in a few matmuls
    large = operands(16, 64, 2)  # 32x: the loop
    with torch.no_grad():
        assert dense_experts_fit(*small) and not dense_experts_fit(*large)
        assert not dense_experts_fit(*small, BATCH_INVARIANT)
        assert torch.equal(swiglu_experts(*small, FAST), swiglu_experts_dense(*small))
        assert torch.equal(swiglu_experts(*small, BATCH_INVARIANT), swiglu_experts_reference(*small, BATCH_INVARIANT))
    x, *rest = small
    x = x.clone().requires_grad_()
    assert not dense_experts_fit(x, *rest)  # a training forward keeps the differentiable reference
