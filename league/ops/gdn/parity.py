"""The gated delta rule over whole sequences, computed as the engine's decode step computes it (decode parity).

Values: the recurrent kernel of ``triton_recurrent.py`` run over each whole sequence, with the gates made inside the
kernel from the raw projections, as a decode step makes them. The kernel's result for a token does not depend on
how the sequence's tokens are split across calls, so a whole-sequence forward here equals decoding the same tokens
one at a time, bitwise: a trainer that runs it computes the log-probs the engine sampled with. Gradients: those of
the same function in chunked form (``league.ops.gdn.chunk_gated_delta_rule_padded`` over the gates of
``gates.gdn_gates``, fla's kernels in bf16 on CUDA), recomputed in the backward, so training pays a sequential
forward but no sequential backward. Elsewhere (CPU, fp64, no Triton): the torch recurrent reference under autograd,
which defines the result.

Padding: a sequence shorter than T ends in steps with zero q, k, v and ``-inf`` gate projections (g = 0, beta = 0),
which leave its state unchanged. Not responsible for caches or for the conv before it.

Legend: N sequences padded to T tokens, Hk key heads, Hv value heads, K key dim, V value dim.
"""

import torch

from league.ops.backends import by_kernel, use_kernel
from league.ops.gdn import chunk_gated_delta_rule_padded
from league.ops.gdn.gates import gdn_gates
from league.ops.gdn.recurrent import recurrent_gated_delta_rule


def gated_delta_rule_as_decode(
    q_NTHK: torch.Tensor,
    k_NTHK: torch.Tensor,
    v_NTHV: torch.Tensor,
    a_NTH: torch.Tensor,
    b_NTH: torch.Tensor,
    A_log_H: torch.Tensor,
    dt_bias_H: torch.Tensor,
    state_NHKV: torch.Tensor,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rule over N (padded) sequences from the gates' raw projections; differentiable.

    Args:
        q_NTHK, k_NTHK (torch.Tensor): ``[N, T, Hk, K]`` raw queries and keys.
        v_NTHV (torch.Tensor): ``[N, T, Hv, V]``.
        a_NTH, b_NTH (torch.Tensor): ``[N, T, Hv]`` the projections the gates are made of.
        A_log_H, dt_bias_H (torch.Tensor): ``[Hv]`` the gate parameters.
        state_NHKV (torch.Tensor): ``[N, Hv, K, V]`` the states to start from.
        scale (float, Optional): query scale. Default: ``K ** -0.5``.

    Returns:
        ``(o_NTHV, final_NHKV)``: outputs in the dtype of v, final states in fp32.
    """
    if use_kernel(q_NTHK, op="gated_delta_rule_as_decode"):
        return as_decode_kernel(q_NTHK, k_NTHK, v_NTHV, a_NTH, b_NTH, A_log_H, dt_bias_H, state_NHKV, scale)
    g_NTH, beta_NTH = gdn_gates(a_NTH, b_NTH, A_log_H, dt_bias_H)
    return recurrent_gated_delta_rule(q_NTHK, k_NTHK, v_NTHV, g_NTH, beta_NTH, state_NHKV.float(), scale)


def as_decode_kernel(q, k, v, a, b, A_log, dt_bias, state, scale: float | None = None):
    """The rule by the recurrent kernel (gates made in it), differentiable through the chunked form recomputed
    (:func:`gated_delta_rule_as_decode`'s arguments)."""
    from league.ops.gdn.triton_recurrent import recurrent_gated_delta_rule_fwd

    def chunked(q, k, v, a, b, A_log, dt_bias, state):
        g, beta = gdn_gates(a, b, A_log, dt_bias)
        return chunk_gated_delta_rule_padded(q, k, v, g, beta, state.float(), scale)

    def kernel(q, k, v, a, b, A_log, dt_bias, state):
        return recurrent_gated_delta_rule_fwd(q, k, v, a, b, state, scale, gate_params=(A_log, dt_bias))

    return by_kernel(kernel, chunked, q, k, v, a, b, A_log, dt_bias, state)
