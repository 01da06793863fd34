"""The gated delta rule stepped for a batch of requests, a few tokens each (decode and verify).

Not responsible for where states live: the caller passes each request's state and decides what to
commit. Reductions are elementwise products summed over K, so a request's numbers do not depend on
the other requests in the batch. In verify mode every intermediate state is returned, so a rejected suffix is dropped by
choosing which one to keep, with no recomputation.

Legend: B requests, T tokens per request, Hk key heads, Hv value heads, K key dim, V value dim.
"""

import torch

from league.ops.gdn.naive import prepare_qk


def recurrent_gated_delta_rule(
    q_BTHK: torch.Tensor,
    k_BTHK: torch.Tensor,
    v_BTHV: torch.Tensor,
    g_BTH: torch.Tensor,
    beta_BTH: torch.Tensor,
    state_BHKV: torch.Tensor,
    scale: float | None = None,
    return_all_states: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step the recurrence T times for each of B requests.

    Args:
        q_BTHK, k_BTHK (torch.Tensor): ``[B, T, Hk, K]`` raw queries and keys.
        v_BTHV (torch.Tensor): ``[B, T, Hv, V]``.
        g_BTH, beta_BTH (torch.Tensor): ``[B, T, Hv]``.
        state_BHKV (torch.Tensor): ``[B, Hv, K, V]`` the states to start from (not modified).
        scale (float, Optional): query scale. Default: ``K ** -0.5``.
        return_all_states (bool): return ``[B, T, Hv, K, V]`` (the state after each step) instead of the last.
            Default: ``False``.

    Returns:
        ``(o_BTHV, states)``: outputs in the dtype of v; the final state ``[B, Hv, K, V]`` or all of them, fp32.
    """
    num_tokens = v_BTHV.shape[1]
    q, k = prepare_qk(q_BTHK, k_BTHK, v_BTHV.shape[2], scale)
    v, g, beta, state = (x.to(q.dtype) for x in (v_BTHV, g_BTH, beta_BTH, state_BHKV))
    out = torch.empty_like(v)
    all_states = []
    for t in range(num_tokens):
        state = state * g[:, t].exp()[:, :, None, None]
        predicted = (state * k[:, t][..., None]).sum(-2)
        delta = beta[:, t][:, :, None] * (v[:, t] - predicted)
        state = state + k[:, t][:, :, :, None] * delta[:, :, None, :]
        out[:, t] = (state * q[:, t][..., None]).sum(-2)
        if return_all_states:
            all_states.append(state)
    states = torch.stack(all_states, dim=1) if return_all_states else state
    return out.to(v_BTHV.dtype), states
