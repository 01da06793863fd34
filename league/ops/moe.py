"""Mixture-of-experts routing and expert compute. Not responsible for placing experts on devices.

Legend: T tokens, D model dim, E experts, I expert intermediate dim, A experts per token (top-k).
"""

import torch

from league.ops.activations import silu
from league.ops.linear import linear


def route_topk(router_logits_TE: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts in fp32, keep the top-k, renormalise them to sum to one.

    Returns:
        ``(weights_TA, experts_TA)``: weights in the dtype of the logits, expert indices (int64).
    """
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
    batch_invariant: bool = False,
) -> torch.Tensor:
    """``sum_a w_a * down_e(silu(gate_e x) * up_e x)`` over each token's chosen experts.

    The reference loops over the experts that received tokens.

    Args:
        x_TD (torch.Tensor): ``[T, D]``.
        w_gate_up_E2ID (torch.Tensor): ``[E, 2I, D]``; rows ``[:I]`` are the gate, ``[I:]`` the up projection.
        w_down_EDI (torch.Tensor): ``[E, D, I]``.
        weights_TA, experts_TA (torch.Tensor): from :func:`route_topk`.
        batch_invariant (bool): row-independent matmuls (see ``ops.linear``). Default: ``False``.
    """
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
        gate, up = linear(x_TD[rows], w_gate_up_E2ID[expert], batch_invariant).chunk(2, dim=-1)
        hidden = silu(gate, batch_invariant) * up
        y = linear(hidden, w_down_EDI[expert], batch_invariant) * weight_of[start : start + count, None]
        out_TD.index_add_(0, rows, y.to(out_TD.dtype))
        start += count
    return out_TD
