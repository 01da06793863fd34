"""The gated delta rule stepped for a batch of requests, a few tokens each (decode and verify).

Not responsible for where states live: the caller passes each request's state and decides what to
commit. Reductions are elementwise products summed over K, so a request's numbers do not depend on
the other requests in the batch, nor on how its tokens are split across calls: a verify reads the states without
committing them, and the accepted prefix is committed afterwards by stepping it again from the same state (the
steps past it padded), which reproduces the verify's state at that step.

Legend: B requests, T tokens per request, Hk key heads, Hv value heads, K key dim, V value dim.
"""

import torch

from league.ops.gdn.gates import gdn_gates
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


def recurrent_gated_delta_rule_slots(
    q_BTHK: torch.Tensor,
    k_BTHK: torch.Tensor,
    v_BTHV: torch.Tensor,
    g_BTH: torch.Tensor,
    beta_BTH: torch.Tensor,
    state_cache: torch.Tensor,
    slots_B: torch.Tensor,
    scale: float | None = None,
    fresh_B: torch.Tensor | None = None,
    commit: bool = True,
    gate_params: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Step the recurrence T times for each of B requests whose states live in a slot-indexed cache, in place.

    Request b starts from ``state_cache[slots_B[b]]``, or from zeros where ``fresh_B[b]`` is true (a new
    request) or ``slots_B[b] < 0`` (a padding row, e.g. of a CUDA-graph batch). Then:

    - with ``commit`` (decode, prefill, a verify's commit): the state after its last token is written back to
      ``state_cache[slots_B[b]]``; rows with a negative slot write nothing.
    - without (verify): nothing is written; the caller commits the accepted tokens afterwards by stepping them
      again from the same states (steps past them padded), which gives the verify's state at that step.

    Nothing else is written. Non-negative slots must be distinct. Padding steps (k = v = beta = g = 0) leave a
    state unchanged, so requests of different lengths can share T. Inference only (no autograd). This is the
    reference: it reads ``slots_B`` on the host.

    Args:
        q_BTHK, k_BTHK (torch.Tensor): ``[B, T, Hk, K]`` raw queries and keys.
        v_BTHV (torch.Tensor): ``[B, T, Hv, V]``.
        g_BTH, beta_BTH (torch.Tensor): ``[B, T, Hv]``.
        state_cache (torch.Tensor): ``[num_slots, Hv, K, V]``, contiguous; fp32 (or bf16: the engine's
            ``mamba_ssm_dtype``), computed in fp32.
        slots_B (torch.Tensor): ``[B]`` integer slot of each request, ``-1`` for padding rows.
        scale (float, Optional): query scale. Default: ``K ** -0.5``.
        fresh_B (torch.Tensor, Optional): ``[B]`` bool, rows that start from zeros. Default: none.
        commit (bool): write the final states to their slots. Default: ``True``.
        gate_params (tuple, Optional): ``(A_log_H, dt_bias_H)``: then ``g_BTH`` and ``beta_BTH`` are the raw
            projections ``a`` and ``b``, turned into gates by :func:`league.ops.gdn.gates.gdn_gates`. Default:
            ``None`` (g and beta are the gates).

    Returns:
        ``o_BTHV`` in the dtype of v.
    """
    if gate_params is not None:
        g_BTH, beta_BTH = gdn_gates(g_BTH, beta_BTH, *gate_params)
    slots = slots_B.long()
    zero = slots < 0
    if fresh_B is not None:
        zero = zero | fresh_B.bool()
    state = state_cache[slots.clamp(min=0)].to(torch.float32)
    state = torch.where(zero[:, None, None, None], torch.zeros_like(state), state)
    out, final = recurrent_gated_delta_rule(q_BTHK, k_BTHK, v_BTHV, g_BTH, beta_BTH, state, scale)
    if commit:
        keep = slots >= 0
        state_cache[slots[keep]] = final[keep].to(state_cache.dtype)
    return out
