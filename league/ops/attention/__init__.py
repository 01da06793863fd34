"""Causal softmax attention with grouped KV heads.

``causal_attention`` is the definition: one sequence whose queries are the last T of S key positions (S == T in
training; S > T when earlier keys come from a cache). The batched forms take many sequences at once and pick a
backend by device: on CPU (or with row-by-row numerics) they loop over ``causal_attention``, which makes them the
reference; on CUDA ``varlen_causal_attention`` runs torch's flash varlen kernel and ``cached_attention`` the Triton
kernel of ``ops/attention/triton.py``. This module does not write caches; callers store new keys first.

Legend: T query tokens, S key tokens, N sequences, H query heads, G KV heads, K head dim, L cache length per slot.
"""

import functools
import inspect

import torch
import torch.nn.functional as F

from league.ops.backends import by_kernel, use_kernel
from league.ops.numerics import FAST, Numerics


def causal_attention(
    q_THK: torch.Tensor, k_SGK: torch.Tensor, v_SGK: torch.Tensor, scale: float, numerics: Numerics = FAST
) -> torch.Tensor:
    """``softmax(q k^T * scale + causal) v``; query i sits at key position ``S - T + i``.

    Query head h reads KV head ``h // (H / G)``. Scores and softmax are fp32.

    Args:
        q_THK (torch.Tensor): ``[T, H, K]``.
        k_SGK, v_SGK (torch.Tensor): ``[S, G, K]``, S >= T.
        scale (float): score scale, usually ``K ** -0.5``.
        numerics (Numerics): row by row: compute each query row over exactly its own keys, with elementwise sums,
            so its result is the same whatever T is (prefill, decode, verify). Default: ``FAST``.

    Returns:
        ``[T, H, K]`` in the dtype of q.
    """
    num_q, num_heads, _ = q_THK.shape
    num_k, num_kv_heads, _ = k_SGK.shape
    groups = num_heads // num_kv_heads
    if numerics.row_by_row:
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
    """Each query row over its visible keys, head by head along the leading dim (scores ``[H, S]``, softmax over
    the last dim), so that a head's numbers are also the same whatever the number of heads (a head-parallel engine
    computes a share of them)."""
    acc = torch.promote_types(q_THK.dtype, torch.float32)
    num_q, num_k = q_THK.shape[0], k_SGK.shape[0]
    k_HSK = k_SGK.repeat_interleave(groups, dim=1).transpose(0, 1).to(acc)
    v_HSK = v_SGK.repeat_interleave(groups, dim=1).transpose(0, 1).to(acc)
    rows = []
    for i in range(num_q):
        visible = num_k - num_q + i + 1
        scores_HS = (q_THK[i].to(acc)[:, None] * k_HSK[:, :visible]).sum(-1) * scale
        probs_HS = scores_HS.softmax(-1)
        rows.append((probs_HS[..., None] * v_HSK[:, :visible]).sum(1))
    return torch.stack(rows).to(q_THK.dtype) if rows else q_THK.clone()


def varlen_causal_attention(
    q_THK: torch.Tensor,
    k_TGK: torch.Tensor,
    v_TGK: torch.Tensor,
    cu_seqlens_N1: torch.Tensor,
    max_seqlen: int,
    scale: float,
    numerics: Numerics = FAST,
) -> torch.Tensor:
    """Causal attention of N packed sequences, each attending only to its own tokens (no cache). Differentiable.

    On CUDA in bf16/fp16: torch's flash varlen kernel. On CUDA in fp32: SDPA per sequence (fp32 math). Elsewhere,
    or with row-by-row numerics: ``varlen_causal_attention_reference``.

    Args:
        q_THK (torch.Tensor): ``[T, H, K]`` queries of all sequences laid end to end.
        k_TGK, v_TGK (torch.Tensor): ``[T, G, K]`` keys and values, packed the same way.
        cu_seqlens_N1 (torch.Tensor): ``[N + 1]`` integer offsets of the sequences, on q's device.
        max_seqlen (int): the longest sequence (host int, so that no device value is read).
        scale (float): score scale, usually ``K ** -0.5``.
        numerics (Numerics): row by row: the reference, row by row (see ``causal_attention``). Default: ``FAST``.

    Returns:
        ``[T, H, K]`` in the dtype of q.
    """
    if use_kernel(q_THK, numerics, dtypes=None, package=None):
        return _varlen_cuda(q_THK, k_TGK, v_TGK, cu_seqlens_N1, max_seqlen, scale)
    return varlen_causal_attention_reference(q_THK, k_TGK, v_TGK, cu_seqlens_N1, max_seqlen, scale, numerics)


def varlen_causal_attention_reference(
    q_THK: torch.Tensor,
    k_TGK: torch.Tensor,
    v_TGK: torch.Tensor,
    cu_seqlens_N1: torch.Tensor,
    max_seqlen: int,
    scale: float,
    numerics: Numerics = FAST,
) -> torch.Tensor:
    """``varlen_causal_attention`` as a loop of ``causal_attention``, one call per sequence (reads
    ``cu_seqlens_N1`` on the host). Same arguments."""
    bounds = cu_seqlens_N1.tolist()
    outs = [
        causal_attention(q_THK[start:end], k_TGK[start:end], v_TGK[start:end], scale, numerics)
        for start, end in zip(bounds[:-1], bounds[1:])
        if end > start
    ]
    return torch.cat(outs) if outs else q_THK[:0].clone()


def cached_attention(
    q_THK: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q_N1: torch.Tensor,
    slots_N: torch.Tensor,
    kv_lens_N: torch.Tensor,
    scale: float,
    max_q: int,
    max_kv: int,
    numerics: Numerics = FAST,
    pages=None,
) -> torch.Tensor:
    """Causal attention of the new tokens of N sequences over the keys in their cache slots. Inference only.

    Sequence i has ``q_len_i = cu[i+1] - cu[i]`` new tokens, the last ``q_len_i`` of its ``kv_lens_N[i]``
    positions, whose keys and values (new ones included) are at positions ``0 .. kv_lens_N[i] - 1`` of slot
    ``slots_N[i]``: in blocks of ``pages.size`` positions, position p in block ``pages.table[slot, p // size]``
    (``models.qwen3_5_moe.Pages``; without ``pages``, the cache is laid out by slot: ``k_cache[slot, p]``). One
    call covers chunked prefill, decode (q_len 1) and speculative verify (q_len 2..8), mixed in a batch. A
    sequence with q_len 0 (padding) is skipped.

    On CUDA in bf16/fp16/fp32 with Triton installed: ``ops.attention.triton.cached_attention_fwd``, which reads no
    device value on the host (CUDA-graph safe) and computes each sequence in its own programs, so a row's result
    does not depend on the rest of the batch. Elsewhere, or with row-by-row numerics:
    ``cached_attention_reference``.

    Args:
        q_THK (torch.Tensor): ``[T, H, K]`` queries of the new tokens, packed.
        k_cache, v_cache (torch.Tensor): ``[num_blocks, page, G, K]`` (``[num_slots, L, G, K]`` without ``pages``).
        cu_seqlens_q_N1 (torch.Tensor): ``[N + 1]`` integer offsets of each sequence's queries in q.
        slots_N (torch.Tensor): ``[N]`` integer cache slot of each sequence.
        kv_lens_N (torch.Tensor): ``[N]`` integer key count of each sequence (cached + new), ``<= L``.
        scale (float): score scale, usually ``K ** -0.5``.
        max_q (int): upper bound of the q_len_i (host int; sizes the kernel grid, rows beyond it are not
            computed).
        max_kv (int): upper bound of the kv_lens_N (host int). The kernels here loop to each sequence's own
            length and do not need it; it is part of the signature for backends that size work from it.
        numerics (Numerics): row by row: the reference, row by row (see ``causal_attention``). Default: ``FAST``.
        pages (Pages, Optional): the block table and page size. Default: laid out by slot.

    Returns:
        ``[T, H, K]`` in the dtype of q.
    """
    table, page = (None, None) if pages is None else (pages.table, pages.size)
    if padded_fits(q_THK, numerics):
        # on the host here: the batch's own bounds (a continuing batch's host lengths are placeholders)
        max_q, max_kv = int((cu_seqlens_q_N1[1:] - cu_seqlens_q_N1[:-1]).max()), int(kv_lens_N.max())
        if len(slots_N) * q_THK.shape[1] * max_q * max_kv <= PADDED_MAX_SCORES:
            return cached_attention_padded(
                q_THK, k_cache, v_cache, cu_seqlens_q_N1, slots_N, kv_lens_N, scale, max_q, max_kv, table, page
            )
    if use_kernel(q_THK, numerics, op="cached_attention"):
        from league.ops.attention.triton import cached_attention_fwd

        return cached_attention_fwd(
            q_THK, k_cache, v_cache, cu_seqlens_q_N1, slots_N, kv_lens_N, scale, max_q, table, page
        )
    return cached_attention_reference(
        q_THK, k_cache, v_cache, cu_seqlens_q_N1, slots_N, kv_lens_N, scale, max_q, max_kv, numerics, table, page
    )


def cached_attention_reference(
    q_THK: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q_N1: torch.Tensor,
    slots_N: torch.Tensor,
    kv_lens_N: torch.Tensor,
    scale: float,
    max_q: int,
    max_kv: int,
    numerics: Numerics = FAST,
    table: torch.Tensor | None = None,
    page: int | None = None,
) -> torch.Tensor:
    """``cached_attention`` as a loop of ``causal_attention`` over each sequence's keys, gathered from its blocks
    (reads the index tensors on the host). Same arguments, the pages as their ``[slots, max_blocks]`` block
    ``table`` and ``page`` size (default: one block per slot)."""
    bounds, slots, kv_lens = cu_seqlens_q_N1.tolist(), slots_N.tolist(), kv_lens_N.tolist()
    page = page or k_cache.shape[1]
    out_THK = torch.empty_like(q_THK)
    for start, end, slot, kv_len in zip(bounds[:-1], bounds[1:], slots, kv_lens):
        if end > start:
            blocks = table[slot, : -(-kv_len // page)] if table is not None else torch.tensor([slot])
            blocks = blocks.to(k_cache.device)
            keys, values = k_cache[blocks].flatten(0, 1)[:kv_len], v_cache[blocks].flatten(0, 1)[:kv_len]
            out_THK[start:end] = causal_attention(q_THK[start:end], keys, values, scale, numerics)
    return out_THK


PADDED_MAX_SCORES = 1 << 22
"""Most scores (sequences x heads x queries x keys) :func:`cached_attention_padded` computes at once."""


def padded_fits(q_THK: torch.Tensor, numerics: Numerics) -> bool:
    """Whether :func:`cached_attention` may run :func:`cached_attention_padded`: on CPU (no kernel there, and the
    batch's bounds are read on the host), numerics not row by row, no gradient; it then does where the batch's padded
    scores stay under :data:`PADDED_MAX_SCORES`."""
    return not (q_THK.is_cuda or numerics.row_by_row or (torch.is_grad_enabled() and q_THK.requires_grad))


def cached_attention_padded(
    q_THK: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q_N1: torch.Tensor,
    slots_N: torch.Tensor,
    kv_lens_N: torch.Tensor,
    scale: float,
    max_q: int,
    max_kv: int,
    table: torch.Tensor | None = None,
    page: int | None = None,
) -> torch.Tensor:
    """:func:`cached_attention` of all N sequences at once: each sequence's keys gathered from its blocks and padded to
    ``max_kv``, its queries padded to ``max_q``, one batched softmax attention with the causal and length masks (fp32
    scores, as :func:`causal_attention`). Reads no device value on the host: ``max_q`` and ``max_kv`` must be the
    batch's true bounds. Same arguments as :func:`cached_attention_reference`; equal to it to fp32 rounding (the sums
    are batched)."""
    num_seqs, (num_tokens, num_heads, dim) = slots_N.shape[0], q_THK.shape
    num_kv_heads, device = k_cache.shape[2], q_THK.device
    page = page or k_cache.shape[1]
    if table is None:
        table = torch.arange(k_cache.shape[0], device=device)[:, None]
    acc = torch.promote_types(q_THK.dtype, torch.float32)
    keys_L = torch.arange(max_kv, device=device)
    blocks_NL = table[slots_N][:, keys_L // page]  # each key's block (keys past a sequence's length are masked)
    rows_NL = blocks_NL * page + keys_L % page
    k_NLGK, v_NLGK = k_cache.flatten(0, 1)[rows_NL], v_cache.flatten(0, 1)[rows_NL]
    q_lens_N = cu_seqlens_q_N1[1:] - cu_seqlens_q_N1[:-1]
    # the packed queries in [N, max_q] rows: query i of sequence n is packed row cu[n] + i
    queries_Q = torch.arange(max_q, device=device)
    valid_NQ = queries_Q[None] < q_lens_N[:, None]
    rows_NQ = torch.where(valid_NQ, cu_seqlens_q_N1[:-1, None] + queries_Q[None], 0)
    q_NQHK = q_THK[rows_NQ]
    groups = num_heads // num_kv_heads
    q_NGHQK = q_NQHK.view(num_seqs, max_q, num_kv_heads, groups, dim).permute(0, 2, 3, 1, 4).to(acc)
    k_NGKL = k_NLGK.permute(0, 2, 3, 1).to(acc)[:, :, None]
    scores = (q_NGHQK @ k_NGKL) * scale  # [N, G, groups, Q, L]
    last_NQ = kv_lens_N[:, None] - q_lens_N[:, None] + queries_Q[None]  # the last key each query sees
    visible_NQL = keys_L[None, None] <= last_NQ[:, :, None]
    scores = scores.masked_fill(~visible_NQL[:, None, None], float("-inf"))
    probs = scores.softmax(-1).nan_to_num_(0.0)  # padding queries see no key
    out_NGHQK = probs @ v_NLGK.permute(0, 2, 1, 3).to(acc)[:, :, None]
    out_NQHK = out_NGHQK.permute(0, 3, 1, 2, 4).reshape(num_seqs, max_q, num_heads, dim)
    out_THK = q_THK.new_empty(num_tokens, num_heads, dim)
    out_THK[rows_NQ[valid_NQ]] = out_NQHK[valid_NQ].to(q_THK.dtype)
    return out_THK


def varlen_causal_attention_as_decode(
    q_THK: torch.Tensor,
    k_TGK: torch.Tensor,
    v_TGK: torch.Tensor,
    cu_seqlens_N1: torch.Tensor,
    max_seqlen: int,
    scale: float,
) -> torch.Tensor:
    """:func:`varlen_causal_attention` computed as a decode step computes each row (decode parity); differentiable.

    On CUDA with Triton: the values come from the kernel of :func:`cached_attention`, which reads the packed keys
    in place as if each sequence's keys filled a cache slot (sequence i's "slot" starts at row ``cu[i]``): a query
    row loops over its keys in the same blocks as when it is decoded, so its result is bitwise the decode's. The
    gradients are those of :func:`varlen_causal_attention` (flash), recomputed in the backward. Elsewhere:
    :func:`varlen_causal_attention_reference`. Arguments as :func:`varlen_causal_attention`.
    """
    if use_kernel(q_THK, op="varlen_causal_attention_as_decode"):
        return attention_as_decode_kernel(q_THK, k_TGK, v_TGK, cu_seqlens_N1, max_seqlen, scale)
    return varlen_causal_attention_reference(q_THK, k_TGK, v_TGK, cu_seqlens_N1, max_seqlen, scale)


def _as_slots(x_TGK: torch.Tensor, max_seqlen: int) -> torch.Tensor:
    """``[T, G, K]`` viewed as a cache of ``max_seqlen`` rows a slot whose slot s starts at row s (no copy). The view
    declares the slots whose rows all lie in ``x``; the kernel also reads the first rows of later slots (a
    sequence's start plus its length never passes T), which are in the same storage."""
    x_TGK = x_TGK.contiguous()
    num_tokens, num_groups, dim = x_TGK.shape
    row = num_groups * dim
    return x_TGK.as_strided((num_tokens - max_seqlen + 1, max_seqlen, num_groups, dim), (row, row, dim, 1))


def attention_as_decode_kernel(
    q_THK: torch.Tensor,
    k_TGK: torch.Tensor,
    v_TGK: torch.Tensor,
    cu_seqlens_N1: torch.Tensor,
    max_seqlen: int,
    scale: float,
) -> torch.Tensor:
    """Whole sequences by the decode attention kernel (``ops.attention.triton.cached_attention_fwd``), differentiable
    through :func:`varlen_causal_attention` recomputed."""
    from league.ops.attention.triton import cached_attention_fwd

    def kernel(q, k, v):
        starts_N, lens_N = cu_seqlens_N1[:-1], cu_seqlens_N1[1:] - cu_seqlens_N1[:-1]
        k_cache, v_cache = _as_slots(k, max_seqlen), _as_slots(v, max_seqlen)
        seqs_N = torch.arange(starts_N.shape[0], device=q.device)  # sequence i's one block starts at row cu[i]
        return cached_attention_fwd(
            q, k_cache, v_cache, cu_seqlens_N1, seqs_N, lens_N, scale, max_seqlen, starts_N[:, None], max_seqlen
        )

    def reference(q, k, v):
        return varlen_causal_attention(q, k, v, cu_seqlens_N1, max_seqlen, scale)

    return by_kernel(kernel, reference, q_THK, k_TGK, v_TGK)


@functools.cache
def _torch_varlen_attn():
    """torch's ``varlen_attn`` (torch >= 2.10) and its keyword names, which changed between releases; ``None``
    when this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, frozenset()
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def _varlen_cuda(q_THK, k_TGK, v_TGK, cu_seqlens_N1, max_seqlen: int, scale: float) -> torch.Tensor:
    varlen_attn, params = _torch_varlen_attn()
    default_scale = scale == q_THK.shape[-1] ** -0.5
    if (
        varlen_attn is None
        or q_THK.dtype not in (torch.bfloat16, torch.float16)
        or not ("scale" in params or default_scale)
    ):
        return _varlen_sdpa(q_THK, k_TGK, v_TGK, cu_seqlens_N1, scale)
    kwargs = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if "scale" in params:
        kwargs["scale"] = scale
    groups = q_THK.shape[1] // k_TGK.shape[1]
    if groups > 1 and "enable_gqa" in params:
        kwargs["enable_gqa"] = True
    elif groups > 1:
        k_TGK, v_TGK = k_TGK.repeat_interleave(groups, dim=1), v_TGK.repeat_interleave(groups, dim=1)
    cu_N1 = cu_seqlens_N1.to(torch.int32)
    q_THK, k_TGK, v_TGK = q_THK.contiguous(), k_TGK.contiguous(), v_TGK.contiguous()
    return varlen_attn(q_THK, k_TGK, v_TGK, cu_N1, cu_N1, max_seqlen, max_seqlen, **kwargs)


def _varlen_sdpa(q_THK, k_TGK, v_TGK, cu_seqlens_N1, scale: float) -> torch.Tensor:
    """One SDPA call per sequence; KV heads repeated so that the fused fp32 kernel (not the math one) serves GQA."""
    groups = q_THK.shape[1] // k_TGK.shape[1]
    k_THK, v_THK = k_TGK.repeat_interleave(groups, dim=1), v_TGK.repeat_interleave(groups, dim=1)
    bounds = cu_seqlens_N1.tolist()
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            q, k, v = (x[start:end].transpose(0, 1)[None] for x in (q_THK, k_THK, v_THK))
            outs.append(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)[0].transpose(0, 1))
    return torch.cat(outs) if outs else q_THK[:0].clone()
