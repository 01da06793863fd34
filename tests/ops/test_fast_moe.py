"""The grouped-GEMM experts against the reference loop on CPU in fp32: forward and gradients.

``torch._grouped_mm`` runs on CPU (its per-group fallback) when rows are a multiple of 16 bytes, so the shapes
here keep D and I multiples of 4 fp32 values.
"""

import pytest
import torch

from league.ops.moe import grouped_mm_fits, grouped_swiglu_experts, route_topk, swiglu_experts, swiglu_experts_reference
from league.ops.numerics import BATCH_INVARIANT

pytestmark = pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch has no _grouped_mm")


def make_inputs(num_tokens, dim, num_experts, inter, top_k, used_experts, seed=0):
    """Random fp32 leaves; routing only to the first ``used_experts`` experts, so the others get no tokens."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, dim, generator=gen)
    w_gate_up = torch.randn(num_experts, 2 * inter, dim, generator=gen) / dim**0.5
    w_down = torch.randn(num_experts, dim, inter, generator=gen) / inter**0.5
    logits = torch.randn(num_tokens, num_experts, generator=gen)
    logits[:, used_experts:] = float("-inf")
    weights, experts = route_topk(logits, top_k)
    return [t.requires_grad_() for t in (x, w_gate_up, w_down, weights.detach())] + [experts]


def run(fn, inputs, seed=1):
    """Output and the gradients of x, both weights and the routing weights under a random cotangent."""
    x, w_gate_up, w_down, weights, experts = (t.detach().clone().requires_grad_(t.requires_grad) for t in inputs)
    out = fn(x, w_gate_up, w_down, weights, experts)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    if out.numel():
        out.backward(grad_out)
    return out.detach(), [t.grad for t in (x, w_gate_up, w_down, weights)]


@pytest.mark.parametrize(
    "num_tokens,dim,num_experts,inter,top_k,used_experts",
    [
        (37, 128, 8, 64, 2, 8),
        (37, 128, 8, 64, 2, 5),  # experts 5..7 receive no tokens
        (50, 96, 13, 40, 4, 9),  # non-powers of two, empty experts in the middle of the sort too
        (1, 128, 8, 64, 2, 8),
        (3, 32, 6, 8, 6, 6),  # every token on every expert
    ],
)
def test_grouped_equals_loop_forward_and_grads(num_tokens, dim, num_experts, inter, top_k, used_experts):
    inputs = make_inputs(num_tokens, dim, num_experts, inter, top_k, used_experts)
    out_ref, grads_ref = run(swiglu_experts_reference, inputs)
    out, grads = run(grouped_swiglu_experts, inputs)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    for name, g, g_ref in zip(["x", "w_gate_up", "w_down", "weights"], grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"grad of {name}: {m}")
    if used_experts < num_experts:
        assert torch.count_nonzero(grads[1][used_experts:]) == 0 and torch.count_nonzero(grads[2][used_experts:]) == 0


def test_no_tokens():
    x, w_gate_up, w_down, weights, experts = make_inputs(0, 128, 8, 64, 2, 8)
    out = grouped_swiglu_experts(x, w_gate_up, w_down, weights, experts)
    assert out.shape == (0, 128) and out.dtype == torch.float32


def test_grouped_is_deterministic():
    inputs = make_inputs(64, 128, 8, 64, 3, 8)
    first, second = run(grouped_swiglu_experts, inputs), run(grouped_swiglu_experts, inputs)
    assert torch.equal(first[0], second[0]) and all(torch.equal(a, b) for a, b in zip(first[1], second[1]))


def test_dispatch_on_cpu_and_in_batch_invariant_mode():
    """On CPU a few experts run densely (close to the reference; ``test_moe_dense``); batch-invariant numerics keep
    the reference."""
    x, w_gate_up, w_down, weights, experts = (t.detach() for t in make_inputs(9, 24, 4, 8, 2, 4))
    ref = swiglu_experts_reference(x, w_gate_up, w_down, weights, experts)
    torch.testing.assert_close(swiglu_experts(x, w_gate_up, w_down, weights, experts), ref, atol=1e-6, rtol=1e-5)
    assert torch.equal(
        swiglu_experts_reference(x, w_gate_up, w_down, weights, experts, BATCH_INVARIANT),
        swiglu_experts(x, w_gate_up, w_down, weights, experts, BATCH_INVARIANT),
    )


def test_grouped_mm_fits_alignment():
    x, w_gate_up, w_down = torch.zeros(2, 24), torch.zeros(4, 16, 24), torch.zeros(4, 24, 8)
    assert grouped_mm_fits(x, w_gate_up, w_down)
    assert grouped_mm_fits(x.bfloat16(), w_gate_up.bfloat16(), w_down.bfloat16())
    assert not grouped_mm_fits(x.bfloat16(), torch.zeros(4, 8, 24).bfloat16(), torch.zeros(4, 24, 4).bfloat16())
    assert not grouped_mm_fits(torch.zeros(2, 6), torch.zeros(4, 16, 6), torch.zeros(4, 6, 8))
    assert not grouped_mm_fits(x, w_gate_up.bfloat16(), w_down)
    assert not grouped_mm_fits(x.double(), w_gate_up.double(), w_down.double())
