"""The gated delta rule in chunked (parallel) form, for one sequence: training and prefill.

Within a chunk of C tokens with cumulative log-decay gamma and entering state S (q already normalised
and scaled), the recurrence equals:
    L_ij = beta_i (k_i . k_j) exp(gamma_i - gamma_j) for i > j, else 0
    (I + L) U = diag(beta) V,   (I + L) W = diag(beta exp(gamma)) K
    V' = U - W S
    O  = diag(exp(gamma)) Q S + (M o Q K^T) V',   M_ij = exp(gamma_i - gamma_j) for i >= j, else 0
    S <- exp(gamma_C) S + (diag(exp(gamma_C - gamma)) K)^T V'
Everything but the state hand-off between chunks is batched over chunks and heads.

Legend: T tokens, N chunks, C chunk size, H value heads, K key dim, V value dim.
"""

import torch
import torch.nn.functional as F

from league.ops.gdn.naive import prepare_qk


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
    """Same contract as :func:`league.ops.gdn.naive.naive_gated_delta_rule`; differentiable.

    Args:
        chunk_size (int): most tokens per chunk; a shorter sequence is one chunk of the next power of two (the
            same result: chunk padding only costs time). Default: ``64``.
    """
    num_tokens, num_heads, v_dim = v_THV.shape
    chunk_size = min(chunk_size, 1 << max(num_tokens - 1, 0).bit_length())
    q, k = prepare_qk(q_THK, k_THK, num_heads, scale)
    v, g, beta = (x.to(q.dtype) for x in (v_THV, g_TH, beta_TH))
    k_dim = q.shape[-1]
    pad = (-num_tokens) % chunk_size
    # padded steps have k = v = beta = g = 0: they write nothing and do not decay
    q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
    g, beta = (F.pad(x, (0, 0, 0, pad)) for x in (g, beta))
    num_chunks = (num_tokens + pad) // chunk_size

    def to_chunks(x: torch.Tensor) -> torch.Tensor:  # [T, H, ...] -> [H, N, C, ...]
        return x.reshape(num_chunks, chunk_size, num_heads, *x.shape[2:]).movedim(2, 0)

    q_HNCK, k_HNCK, v_HNCV = to_chunks(q), to_chunks(k), to_chunks(v)
    beta_HNC = to_chunks(beta)
    gamma_HNC = to_chunks(g).cumsum(-1)

    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    decay_HNCC = (gamma_HNC[..., :, None] - gamma_HNC[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    strictly_lower = decay_HNCC.tril(-1)
    lower_HNCC = beta_HNC[..., None] * (k_HNCK @ k_HNCK.transpose(-1, -2)) * strictly_lower
    system = lower_HNCC + torch.eye(chunk_size, dtype=q.dtype, device=q.device)
    u_HNCV = torch.linalg.solve_triangular(system, beta_HNC[..., None] * v_HNCV, upper=False, unitriangular=True)
    w_HNCK = torch.linalg.solve_triangular(
        system, (beta_HNC * gamma_HNC.exp())[..., None] * k_HNCK, upper=False, unitriangular=True
    )
    attn_HNCC = (q_HNCK @ k_HNCK.transpose(-1, -2)) * decay_HNCC
    q_decayed = q_HNCK * gamma_HNC.exp()[..., None]
    k_to_end = k_HNCK * (gamma_HNC[..., -1:] - gamma_HNC).exp()[..., None]
    chunk_decay_HN = gamma_HNC[..., -1].exp()

    if initial_state_HKV is None:
        state = q.new_zeros(num_heads, k_dim, v_dim)
    else:
        state = initial_state_HKV.to(q.dtype)
    outs = []
    for n in range(num_chunks):
        v_new = u_HNCV[:, n] - w_HNCK[:, n] @ state
        outs.append(q_decayed[:, n] @ state + attn_HNCC[:, n] @ v_new)
        state = chunk_decay_HN[:, n, None, None] * state + k_to_end[:, n].transpose(-1, -2) @ v_new
    o_HTV = torch.cat(outs, dim=1)[:, :num_tokens]
    return o_HTV.transpose(0, 1).to(v_THV.dtype), state


def chunk_gated_delta_rule_varlen(
    q_THK: torch.Tensor,
    k_THK: torch.Tensor,
    v_THV: torch.Tensor,
    g_TH: torch.Tensor,
    beta_TH: torch.Tensor,
    cu_seqlens: torch.Tensor,
    initial_state_NHKV: torch.Tensor | None = None,
    scale: float | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`chunk_gated_delta_rule` over N sequences packed along T, each with its own state; differentiable.

    Sequences of similar length are padded to the longest of their group (padding steps leave a state unchanged)
    and folded into the head dim, so one chunked pass serves a group and padding at most doubles the work.
    Reads ``cu_seqlens`` on the host.

    Args:
        q_THK, k_THK (torch.Tensor): ``[T, Hk, K]`` raw queries and keys of all sequences, packed.
        v_THV (torch.Tensor): ``[T, Hv, V]``.
        g_TH, beta_TH (torch.Tensor): ``[T, Hv]``.
        cu_seqlens (torch.Tensor): ``[N + 1]`` integer offsets of the sequences in T.
        initial_state_NHKV (torch.Tensor, Optional): ``[N, Hv, K, V]``. Default: zeros.
        scale (float, Optional): query scale. Default: ``K ** -0.5``.
        chunk_size (int): tokens per chunk. Default: ``64``.

    Returns:
        ``(o_THV, final_state_NHKV)``; o in the dtype of v, the states in fp32.
    """
    bounds = cu_seqlens.tolist()
    num_v_heads, k_dim, v_dim = v_THV.shape[1], q_THK.shape[-1], v_THV.shape[-1]
    if initial_state_NHKV is None:
        initial_state_NHKV = q_THK.new_zeros(len(bounds) - 1, num_v_heads, k_dim, v_dim, dtype=torch.float32)
    o_THV = v_THV.new_empty(v_THV.shape)
    finals, order = [], []
    for group in _length_groups([end - start for start, end in zip(bounds[:-1], bounds[1:])]):
        lens = [bounds[i + 1] - bounds[i] for i in group]
        tokens = torch.cat([torch.arange(bounds[i], bounds[i + 1]) for i in group]).to(v_THV.device)
        o, final = _folded(
            *(x[tokens] for x in (q_THK, k_THK, v_THV, g_TH, beta_TH)),
            lens,
            initial_state_NHKV[group],
            scale,
            chunk_size,
        )
        o_THV[tokens] = o
        finals.append(final)
        order += group
    final_NHKV = torch.cat(finals)[torch.tensor(order).argsort().to(v_THV.device)]
    return o_THV, final_NHKV


def _length_groups(lens: list[int], max_padding: float = 2.0) -> list[list[int]]:
    """Indices of the sequences in groups, longest first, each padded to its longest at most ``max_padding``x."""
    groups, tokens = [], 0
    for i in sorted(range(len(lens)), key=lambda i: -lens[i]):
        if groups and (len(groups[-1]) + 1) * lens[groups[-1][0]] <= max_padding * (tokens + lens[i]):
            groups[-1].append(i)
            tokens += lens[i]
        else:
            groups.append([i])
            tokens = lens[i]
    return groups


def _folded(q_THK, k_THK, v_THV, g_TH, beta_TH, lens: list[int], initial_state_NHKV, scale, chunk_size):
    """The sequences of one group (packed, of lengths ``lens``) padded to the longest and folded into the heads."""
    num_seqs, longest = len(lens), max(max(lens), 1)
    num_v_heads, k_dim, v_dim = v_THV.shape[1], q_THK.shape[-1], v_THV.shape[-1]
    rows = torch.cat([torch.arange(n) + i * longest for i, n in enumerate(lens)]).to(v_THV.device)

    def fold(x_T: torch.Tensor) -> torch.Tensor:  # packed [T, H, ...] -> [longest, N*H, ...], zero-padded
        padded = x_T.new_zeros(num_seqs * longest, *x_T.shape[1:])
        padded[rows] = x_T
        padded = padded.view(num_seqs, longest, *x_T.shape[1:]).transpose(0, 1)
        return padded.reshape(longest, num_seqs * x_T.shape[1], *x_T.shape[2:])

    o, final = chunk_gated_delta_rule(
        fold(q_THK),
        fold(k_THK),
        fold(v_THV),
        fold(g_TH[..., None])[..., 0],
        fold(beta_TH[..., None])[..., 0],
        initial_state_NHKV.reshape(num_seqs * num_v_heads, k_dim, v_dim),
        scale,
        chunk_size,
    )
    o = o.view(longest, num_seqs, num_v_heads, v_dim).transpose(0, 1).reshape(num_seqs * longest, num_v_heads, v_dim)
    return o[rows], final.view(num_seqs, num_v_heads, k_dim, v_dim)
