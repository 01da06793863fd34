"""The Triton router (softmax, top-k, renormalised weights in one launch) against ``route_topk_reference``: by hand,
on ties, on random logits of the model's shapes, and the gradient of its weights.

Runs on CUDA, or on CPU under ``TRITON_INTERPRET=1`` (``PYTHONPATH`` holding a Triton install); skipped otherwise.
"""

import importlib.util
import math
import os

import pytest
import torch

from league.ops import moe
from league.ops.moe import route_topk_reference

HAS_TRITON = importlib.util.find_spec("triton") is not None
CAN_RUN_TRITON = HAS_TRITON and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = pytest.mark.skipif(not CAN_RUN_TRITON, reason="needs triton and CUDA or TRITON_INTERPRET=1")


def kernel(logits, top_k):
    from league.ops.moe.triton_router import route_topk_fwd

    return route_topk_fwd(logits, top_k)


def test_by_hand():
    # softmax of log(1..4) is (0.1, 0.2, 0.3, 0.4): top 2 are experts 3 and 2, weights 0.4 / 0.7 and 0.3 / 0.7
    logits = torch.tensor([[math.log(1), math.log(2), math.log(3), math.log(4)]], device=DEVICE)
    weights, experts = kernel(logits, 2)
    assert experts.tolist() == [[3, 2]] and experts.dtype == torch.long
    torch.testing.assert_close(weights, torch.tensor([[4 / 7, 3 / 7]], device=DEVICE), rtol=0, atol=1e-6)


def test_ties_pick_the_lowest_expert_first():
    logits = torch.tensor([[0.0, 1.0, 1.0, 0.5, 1.0]], device=DEVICE)
    weights, experts = kernel(logits, 2)
    assert experts.tolist() == [[1, 2]]
    torch.testing.assert_close(weights, torch.tensor([[0.5, 0.5]], device=DEVICE), rtol=0, atol=0)


@pytest.mark.parametrize("num_rows,num_experts,top_k", [(37, 256, 8), (13, 5, 3), (4, 256, 8), (1, 8, 8), (0, 8, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(num_rows, num_experts, top_k, dtype):
    gen = torch.Generator().manual_seed(num_rows + num_experts)
    # a column slice of a wider tensor, as the joined projections hand the router its logits
    wide = (torch.randn(num_rows, num_experts + 7, generator=gen) * 2).to(dtype).to(DEVICE)
    logits = wide[:, 3 : 3 + num_experts]
    weights, experts = kernel(logits, top_k)
    ref_weights, ref_experts = route_topk_reference(logits, top_k)
    assert weights.dtype == dtype and weights.shape == experts.shape == (num_rows, top_k)
    # equal probabilities may come in another order (bf16 logits tie often): compare the probabilities picked
    probs = logits.float().softmax(-1)
    torch.testing.assert_close(probs.gather(-1, experts), probs.gather(-1, ref_experts), rtol=1e-6, atol=0)
    if dtype == torch.float32:  # random fp32 logits do not tie: the very experts, in the same order
        assert torch.equal(experts, ref_experts)
    tol = dict(rtol=0, atol=1e-6) if dtype == torch.float32 else dict(rtol=8e-3, atol=0)  # bf16: one rounding
    torch.testing.assert_close(weights.float(), ref_weights.float(), **tol)
    assert torch.equal(weights[:3], kernel(logits[:3], top_k)[0])  # a row does not depend on the others


def test_gradient_of_the_weights_given_the_experts():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(9, 16, generator=gen).to(DEVICE)
    grad_out = torch.randn(9, 4, generator=gen).to(DEVICE)
    grads = []
    for fn in (moe._RouteTopk.apply, route_topk_reference):
        z = logits.clone().requires_grad_()
        weights, experts = fn(z, 4)
        weights.backward(grad_out)
        grads.append(z.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-6)
    # the weights sum to one, so a cotangent constant over a row's picks has no gradient
    z = logits.clone().requires_grad_()
    moe._RouteTopk.apply(z, 4)[0].sum().backward()
    torch.testing.assert_close(z.grad, torch.zeros_like(z), rtol=0, atol=1e-6)
