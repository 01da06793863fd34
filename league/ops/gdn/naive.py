"""The gated delta rule by its definition, one token at a time, for one sequence. Plain torch, fp32.

Legend: T tokens, Hk key heads, Hv value heads, K key dim, V value dim.

Per value head, with state S in R^{K x V}:
    S <- exp(g_t) S;  u = beta_t (v_t - S^T k_t);  S <- S + k_t u^T;  o_t = S^T q_t
Value head j reads key head ``j // (Hv / Hk)``. q and k are L2-normalised (eps 1e-6) and q is scaled by
``K ** -0.5`` before the recurrence.
"""

import torch


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 inputs, fp64 for fp64 (used by precision tests)."""
    return torch.promote_types(x.dtype, torch.float32)


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(sum(x^2) + eps)`` over the last dim."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def prepare_qk(
    q: torch.Tensor, k: torch.Tensor, num_value_heads: int, scale: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32, L2-normalised, q scaled, and key heads repeated to serve consecutive value heads.

    Args:
        q, k (torch.Tensor): ``[..., Hk, K]``.
        num_value_heads (int): Hv, a multiple of Hk.
        scale (float, Optional): query scale. Default: ``K ** -0.5``.
    """
    groups = num_value_heads // q.shape[-2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    acc = compute_dtype(q)
    # contiguous first: a reduction's rounding depends on the memory layout of the reduced dim
    q = l2norm(q.to(acc).contiguous()) * scale
    k = l2norm(k.to(acc).contiguous())
    if groups > 1:
        q = q.repeat_interleave(groups, dim=-2)
        k = k.repeat_interleave(groups, dim=-2)
    return q, k


def naive_gated_delta_rule(
    q_THK: torch.Tensor,
    k_THK: torch.Tensor,
    v_THV: torch.Tensor,
    g_TH: torch.Tensor,
    beta_TH: torch.Tensor,
    initial_state_HKV: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the recurrence over one sequence.

    Args:
        q_THK, k_THK (torch.Tensor): ``[T, Hk, K]`` raw (un-normalised) queries and keys.
        v_THV (torch.Tensor): ``[T, Hv, V]``.
        g_TH (torch.Tensor): ``[T, Hv]`` log-decay (<= 0).
        beta_TH (torch.Tensor): ``[T, Hv]`` write strength in (0, 1).
        initial_state_HKV (torch.Tensor, Optional): ``[Hv, K, V]``. Default: zeros.
        scale (float, Optional): query scale. Default: ``K ** -0.5``.

    Returns:
        ``(o_THV, final_state_HKV)``; o in the dtype of v, the state in fp32.
    """
    num_tokens, num_v_heads, v_dim = v_THV.shape
    q, k = prepare_qk(q_THK, k_THK, num_v_heads, scale)
    v, g, beta = (x.to(q.dtype) for x in (v_THV, g_TH, beta_TH))
    if initial_state_HKV is None:
        state = v.new_zeros(num_v_heads, q.shape[-1], v_dim)
    else:
        state = initial_state_HKV.to(q.dtype).clone()
    out = v.new_empty(num_tokens, num_v_heads, v_dim)
    for t in range(num_tokens):
        state = state * g[t].exp()[:, None, None]
        predicted = (state * k[t][:, :, None]).sum(-2)
        delta = beta[t][:, None] * (v[t] - predicted)
        state = state + k[t][:, :, None] * delta[:, None, :]
        out[t] = (state * q[t][:, :, None]).sum(-2)
    return out.to(v_THV.dtype), state
