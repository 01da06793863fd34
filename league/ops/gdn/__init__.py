"""The gated delta rule (Gated DeltaNet's token mixer) in three forms, each with a backend picked by device.

``naive`` is the recurrent definition and the ground truth; ``chunk`` is the chunked form for training
and prefill; ``recurrent`` steps a batch of requests a few tokens at a time for decode and verify.

The functions of this package pick the backend: on CUDA, for fp32/bf16/fp16 inputs,
``recurrent_gated_delta_rule(_slots)`` run the Triton kernel of ``triton_recurrent.py`` (Triton installed) and
``chunk_gated_delta_rule(_varlen)`` fla's chunked kernels through ``fast.py`` for bf16/fp16 (fla and Triton
installed; fla computes fp32 inputs in tf32, so fp32 keeps the exact reference).
Elsewhere they run the torch references of the same names in ``chunk.py`` and ``recurrent.py``, which define
the results. This package does not decide between the chunked and the recurrent form; the model does.
"""

import torch

from league.ops.backends import by_kernel, use_kernel
from league.ops.gdn import chunk as _chunk
from league.ops.gdn import recurrent as _recurrent
from league.ops.gdn.naive import naive_gated_delta_rule
from league.ops.numerics import Numerics

__all__ = [
    "RECURRENT_MAX_TOKENS",
    "chunk_gated_delta_rule",
    "chunk_gated_delta_rule_padded",
    "chunk_gated_delta_rule_varlen",
    "gdn_path",
    "naive_gated_delta_rule",
    "recurrent_gated_delta_rule",
    "recurrent_gated_delta_rule_slots",
    "states_in_slots",
]


def chunk_gated_delta_rule(
    q_THK: torch.Tensor,
    k_THK: torch.Tensor,
    v_THV: torch.Tensor,
    g_TH: torch.Tensor,
    beta_TH: torch.Tensor,
    initial_state_HKV: torch.Tensor | None = None,
    scale: float | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence in chunked form; differentiable. Contract of :func:`league.ops.gdn.chunk.chunk_gated_delta_rule`.

    On CUDA with fla (and ``chunk_size`` 64): ``fast.chunk_gated_delta_rule_fla``.
    """
    if chunk_size == 64 and _use_fast(q_THK, "chunk_gated_delta_rule", "fla"):
        from league.ops.gdn.fast import chunk_gated_delta_rule_fla

        state = None if initial_state_HKV is None else initial_state_HKV[None]
        o, final = chunk_gated_delta_rule_fla(
            q_THK[None], k_THK[None], v_THV[None], g_TH[None], beta_TH[None], state, scale
        )
        return o[0], final[0]
    return _chunk.chunk_gated_delta_rule(q_THK, k_THK, v_THV, g_TH, beta_TH, initial_state_HKV, scale, chunk_size)


def chunk_gated_delta_rule_padded(
    q_NTHK: torch.Tensor,
    k_NTHK: torch.Tensor,
    v_NTHV: torch.Tensor,
    g_NTH: torch.Tensor,
    beta_NTH: torch.Tensor,
    state_NHKV: torch.Tensor,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunked rule over N padded sequences ``[N, T, ...]`` at once (:func:`chunk_gated_delta_rule`, each
    sequence from its own state ``[N, Hv, K, V]``), the sequences folded into the head dim (value head
    ``n * Hv + j`` reads key head ``n * Hk + j // (Hv / Hk)``, as head j of sequence n does); differentiable.
    Returns ``(o_NTHV, final_NHKV)``."""
    num_seqs, num_tokens = q_NTHK.shape[:2]

    def fold(x):  # [N, T, H, ...] -> [T, N*H, ...]
        return x.transpose(0, 1).reshape(num_tokens, num_seqs * x.shape[2], *x.shape[3:])

    num_v_heads, k_dim, v_dim = state_NHKV.shape[1:]
    o, final = chunk_gated_delta_rule(
        fold(q_NTHK),
        fold(k_NTHK),
        fold(v_NTHV),
        fold(g_NTH[..., None])[..., 0],
        fold(beta_NTH[..., None])[..., 0],
        state_NHKV.reshape(num_seqs * num_v_heads, k_dim, v_dim),
        scale,
    )
    o = o.view(num_tokens, num_seqs, num_v_heads, v_dim).transpose(0, 1)
    return o, final.view(num_seqs, num_v_heads, k_dim, v_dim)


def chunk_gated_delta_rule_varlen(
    q_THK: torch.Tensor,
    k_THK: torch.Tensor,
    v_THV: torch.Tensor,
    g_TH: torch.Tensor,
    beta_TH: torch.Tensor,
    cu_seqlens: torch.Tensor,
    initial_state_NHKV: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """N sequences packed along T; differentiable. Contract of
    :func:`league.ops.gdn.chunk.chunk_gated_delta_rule_varlen`.

    On CUDA with fla: ``fast.chunk_gated_delta_rule_fla`` with ``cu_seqlens`` (no padding).
    """
    if _use_fast(q_THK, "chunk_gated_delta_rule_varlen", "fla"):
        from league.ops.gdn.fast import chunk_gated_delta_rule_fla

        o, final = chunk_gated_delta_rule_fla(
            q_THK[None],
            k_THK[None],
            v_THV[None],
            g_TH[None],
            beta_TH[None],
            initial_state_NHKV,
            scale,
            cu_seqlens=cu_seqlens.long(),
        )
        return o[0], final
    return _chunk.chunk_gated_delta_rule_varlen(
        q_THK, k_THK, v_THV, g_TH, beta_TH, cu_seqlens, initial_state_NHKV, scale
    )


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
    """Contract of :func:`league.ops.gdn.recurrent.recurrent_gated_delta_rule`; differentiable.

    On CUDA with Triton: :func:`recurrent_gated_delta_rule_kernel`.
    """
    args = (q_BTHK, k_BTHK, v_BTHV, g_BTH, beta_BTH, state_BHKV, scale, return_all_states)
    if _use_fast(q_BTHK, "recurrent_gated_delta_rule", "triton"):
        return recurrent_gated_delta_rule_kernel(*args)
    return _recurrent.recurrent_gated_delta_rule(*args)


def recurrent_gated_delta_rule_kernel(
    q_BTHK: torch.Tensor,
    k_BTHK: torch.Tensor,
    v_BTHV: torch.Tensor,
    g_BTH: torch.Tensor,
    beta_BTH: torch.Tensor,
    state_BHKV: torch.Tensor,
    scale: float | None = None,
    return_all_states: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``triton_recurrent.recurrent_gated_delta_rule_fwd``, differentiable: the values come from the kernel (so a
    trainer and an engine that both run it agree bitwise), the gradients from the torch reference."""
    from league.ops.gdn.triton_recurrent import recurrent_gated_delta_rule_fwd

    return by_kernel(
        lambda *a: recurrent_gated_delta_rule_fwd(*a, scale, return_all_states),
        lambda *a: _recurrent.recurrent_gated_delta_rule(*a, scale, return_all_states),
        q_BTHK,
        k_BTHK,
        v_BTHV,
        g_BTH,
        beta_BTH,
        state_BHKV,
    )


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
    """States read from and written to a slot-indexed cache in place; inference only. Contract of
    :func:`league.ops.gdn.recurrent.recurrent_gated_delta_rule_slots`.

    On CUDA with Triton: ``triton_recurrent.recurrent_gated_delta_rule_slots_fwd``, which reads no device value
    on the host (CUDA-graph safe).
    """
    if _use_fast(q_BTHK, "recurrent_gated_delta_rule_slots", "triton"):
        from league.ops.gdn.triton_recurrent import recurrent_gated_delta_rule_slots_fwd

        return recurrent_gated_delta_rule_slots_fwd(
            q_BTHK, k_BTHK, v_BTHV, g_BTH, beta_BTH, state_cache, slots_B, scale, fresh_B, commit, gate_params
        )
    return _recurrent.recurrent_gated_delta_rule_slots(
        q_BTHK, k_BTHK, v_BTHV, g_BTH, beta_BTH, state_cache, slots_B, scale, fresh_B, commit, gate_params
    )


RECURRENT_MAX_TOKENS = 16
"""With a cache, runs of at most this many new tokens step the recurrence; longer ones use the chunked form."""


def gdn_path(numerics: Numerics, verify: bool, cached: bool, longest: int, x: torch.Tensor) -> str:
    """Which form of the rule a Gated DeltaNet forward runs, in one place:

    - ``slots``: step by step in the slots' states, read and written in place (decode, verify and short
      continuations, on the GPU: :func:`states_in_slots`);
    - ``as_decode``: whole sequences computed as decode computes them (decode parity's training and prefill);
    - ``recurrent``: step by step over states gathered from the slots (or zeros): row-by-row numerics, verify and
      short continuations elsewhere;
    - ``chunk_packed`` / ``chunk_padded``: the chunked form (training and long prefill) on packed sequences (the GPU:
      fla's kernels, one head count for autotuning) or on sequences padded and folded into heads (the exact CPU
      reference).

    Args:
        numerics (Numerics): the forward's numerics.
        verify (bool): the forward verifies drafts (``ForwardBatch.record_states``).
        cached (bool): the sequences continue in cache slots.
        longest (int): the longest sequence's new tokens.
        x (torch.Tensor): an input of the rule (its device decides).
    """
    step_by_step = numerics.step_by_step or verify or (cached and longest <= RECURRENT_MAX_TOKENS)
    if cached and step_by_step and states_in_slots(x):
        return "slots"
    if numerics.as_decode and not verify:
        return "as_decode"
    if step_by_step:
        return "recurrent"
    return "chunk_packed" if x.is_cuda else "chunk_padded"


def states_in_slots(x: torch.Tensor) -> bool:
    """Whether the recurrence reads and writes the states in their cache slots (the GPU: no gathered copies)."""
    return x.is_cuda


def _use_fast(x: torch.Tensor, op: str, package: str) -> bool:
    """``backends.use_kernel`` for the GDN kernels; fla's chunk kernels compute fp32 input in tf32, so fp32 runs the
    exact reference there."""
    if package == "fla" and x.dtype == torch.float32:
        return False
    return use_kernel(x, None, op=op, package=package)
