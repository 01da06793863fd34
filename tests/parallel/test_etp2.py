"""etp2: each routed expert's intermediate dim split over 2 ranks (which hold different samples) gives the
one-process training step; in one process, the experts' outputs summed over their intermediate shares equal the whole
experts' (fp64)."""

import pytest
import torch

from league.ops.moe import route_topk, swiglu_experts
from league.parallel.expert import INTERMEDIATE_DIMS, intermediate_share
from tests.parallel.expect import step_equals_one_process


@pytest.mark.xdist_group("world2")
def test_one_step_equals_one_process(world2):
    step_equals_one_process(world2, "etp2_train_step")


@pytest.mark.parametrize("etp", [1, 2, 4, 12])
def test_partial_outputs_of_the_shares_add_up_to_the_experts(etp):
    """Share r of ``w_gate_up`` holds the same units' gate and up rows (rows ``[r I/etp, (r+1) I/etp)`` of each
    half), share r of ``w_down`` the same units' columns; 12 shares of I = 36 leave 3 units each."""
    gen = torch.Generator().manual_seed(0)
    num_experts, dim, intermediate, num_tokens, top_k = 6, 16, 36, 20, 2
    weights = {
        "w_gate_up": torch.randn(num_experts, 2 * intermediate, dim, generator=gen, dtype=torch.float64),
        "w_down": torch.randn(num_experts, dim, intermediate, generator=gen, dtype=torch.float64),
    }
    x_TD = torch.randn(num_tokens, dim, generator=gen, dtype=torch.float64)
    weights_TA, experts_TA = route_topk(torch.randn(num_tokens, num_experts, generator=gen, dtype=torch.float64), top_k)
    whole = swiglu_experts(x_TD, weights["w_gate_up"], weights["w_down"], weights_TA, experts_TA)
    shares = [
        {name: intermediate_share(w, *INTERMEDIATE_DIMS[name], r, etp) for name, w in weights.items()}
        for r in range(etp)
    ]
    assert all(s["w_gate_up"].shape == (num_experts, 2 * intermediate // etp, dim) for s in shares)
    assert torch.equal(
        torch.cat([s["w_gate_up"][:, : intermediate // etp] for s in shares], 1), weights["w_gate_up"][:, :intermediate]
    )
    partials = [swiglu_experts(x_TD, s["w_gate_up"], s["w_down"], weights_TA, experts_TA) for s in shares]
    torch.testing.assert_close(sum(partials), whole, rtol=1e-12, atol=1e-12)
