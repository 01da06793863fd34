"""Causal softmax attention with grouped KV heads, for one sequence whose queries are the last T of S
key positions (S == T in training; S > T when earlier keys come from a cache).

Legend: T query tokens, S key tokens, H query heads, G KV heads, K head dim.
"""

import torch


def causal_attention(
    q_THK: torch.Tensor, k_SGK: torch.Tensor, v_SGK: torch.Tensor, scale: float, batch_invariant: bool = False
) -> torch.Tensor:
    """``softmax(q k^T * scale + causal) v``; query i sits at key position ``S - T + i``.

    Query head h reads KV head ``h // (H / G)``. Scores and softmax are fp32.

    Args:
        q_THK (torch.Tensor): ``[T, H, K]``.
        k_SGK, v_SGK (torch.Tensor): ``[S, G, K]``, S >= T.
        scale (float): score scale, usually ``K ** -0.5``.
        batch_invariant (bool): compute each query row over exactly its own keys, with elementwise sums, so
            its result is the same whatever T is (prefill, decode, verify). Default: ``False``.

    Returns:
        ``[T, H, K]`` in the dtype of q.
    """
    num_q, num_heads, _ = q_THK.shape
    num_k, num_kv_heads, _ = k_SGK.shape
    groups = num_heads // num_kv_heads
    if batch_invariant:
        return _row_by_row(q_THK, k_SGK, v_SGK, scale, groups)
    acc = torch.promote_types(q_THK.dtype, torch.float32)
    k_HSK = k_SGK.repeat_interleave(groups, dim=1).transpose(0, 1).to(acc)
    v_HSK = v_SGK.repeat_interleave(groups, dim=1).transpose(0, 1).to(acc)
    scores_HTS = (q_THK.transpose(0, 1).to(acc) @ k_HSK.transpose(-1, -2)) * scale
    query_pos = torch.arange(num_k - num_q, num_k, device=q_THK.device)
    key_pos = torch.arange(num_k, device=q_THK.device)
    scores_HTS = scores_HTS.masked_fill(key_pos[None, :] > query_pos[:, None], float("-inf"))
    out_HTK = scores_HTS.softmax(-1) @ v_HSK
    return out_HTK.transpose(0, 1).to(q_THK.dtype)


def _row_by_row(q_THK, k_SGK, v_SGK, scale: float, groups: int) -> torch.Tensor:
    acc = torch.promote_types(q_THK.dtype, torch.float32)
    num_q, num_k = q_THK.shape[0], k_SGK.shape[0]
    k_SHK = k_SGK.repeat_interleave(groups, dim=1).to(acc)
    v_SHK = v_SGK.repeat_interleave(groups, dim=1).to(acc)
    rows = []
    for i in range(num_q):
        visible = num_k - num_q + i + 1
        scores_SH = (q_THK[i].to(acc)[None] * k_SHK[:visible]).sum(-1) * scale
        probs_SH = scores_SH.softmax(0)
        rows.append((probs_SH[..., None] * v_SHK[:visible]).sum(0))
    return torch.stack(rows).to(q_THK.dtype) if rows else q_THK.clone()
