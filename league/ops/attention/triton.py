"""Triton kernel of ``attention.cached_attention``: causal GQA attention of new query tokens over keys read in
place from the cache's blocks through each sequence's block table (no gather copy). It neither writes the cache nor
decides which sequences share a batch; ``attention.cached_attention_reference`` defines its result.

Imported only when Triton is installed. Runs on CUDA, or on CPU tensors under ``TRITON_INTERPRET=1``.

Legend: T query tokens, N sequences, H query heads, G KV heads, K head dim, P positions per block;
inside the kernel M rows of a tile (query x head of one group), N keys of a block, D padded head dim.
"""

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@triton.jit
def _cached_attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    cu_q_ptr,
    slots_ptr,
    kv_lens_ptr,
    table_ptr,
    scale_log2,
    stride_table,
    page,
    stride_qt,
    stride_qh,
    stride_ks,
    stride_kl,
    stride_kg,
    stride_vs,
    stride_vl,
    stride_vg,
    stride_ot,
    stride_oh,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # one program: one sequence, BLOCK_Q of its queries, one KV head and the GROUP query heads reading it
    seq = tl.program_id(0)
    q_first = tl.program_id(1) * BLOCK_Q
    kv_head = tl.program_id(2)
    q_begin = tl.load(cu_q_ptr + seq)
    q_len = tl.load(cu_q_ptr + seq + 1) - q_begin
    if q_first >= q_len:
        return
    kv_len = tl.load(kv_lens_ptr + seq)
    slot = tl.load(slots_ptr + seq).to(tl.int64)

    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_PAD
    rows_M = tl.arange(0, BLOCK_M)
    q_idx_M = q_first + rows_M // GROUP_PAD
    head_M = kv_head * GROUP + rows_M % GROUP_PAD
    row_ok_M = (q_idx_M < q_len) & (rows_M % GROUP_PAD < GROUP)
    pos_M = kv_len - q_len + q_idx_M  # absolute position: the last key the row may see
    dims_D = tl.arange(0, HEAD_DIM_PAD)
    dim_ok_D = dims_D < HEAD_DIM
    token_M = (q_begin + q_idx_M).to(tl.int64)

    q_MD = tl.load(
        q_ptr + token_M[:, None] * stride_qt + head_M[:, None] * stride_qh + dims_D[None, :],
        mask=row_ok_M[:, None] & dim_ok_D[None, :],
        other=0.0,
    )
    blocks_base = table_ptr + slot * stride_table
    k_base = k_ptr + kv_head * stride_kg
    v_base = v_ptr + kv_head * stride_vg

    m_M = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_M = tl.zeros([BLOCK_M], tl.float32)
    acc_MD = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    # keys past the tile's last query are masked for every row; key 0 is visible to every row (padding rows
    # included), so each row's running max is finite after the first block
    kv_end = tl.minimum(kv_len, kv_len - q_len + q_first + BLOCK_Q)
    for kv_first in range(0, kv_end, BLOCK_N):
        keys_N = kv_first + tl.arange(0, BLOCK_N)
        key_ok_N = keys_N < kv_len
        # each key's block and row in it (a tile of keys may span blocks)
        block_N = tl.load(blocks_base + keys_N // page, mask=key_ok_N, other=0).to(tl.int64)
        k_off_N = block_N * stride_ks + (keys_N % page) * stride_kl
        v_off_N = block_N * stride_vs + (keys_N % page) * stride_vl
        k_DN = tl.load(
            k_base + k_off_N[None, :] + dims_D[:, None],
            mask=key_ok_N[None, :] & dim_ok_D[:, None],
            other=0.0,
        )
        s_MN = tl.dot(q_MD, k_DN, input_precision=PRECISION) * scale_log2
        visible_MN = (keys_N[None, :] <= pos_M[:, None]) & key_ok_N[None, :]
        s_MN = tl.where(visible_MN, s_MN, float("-inf"))
        m_new_M = tl.maximum(m_M, tl.max(s_MN, 1))
        alpha_M = tl.exp2(m_M - m_new_M)
        p_MN = tl.exp2(s_MN - m_new_M[:, None])
        l_M = l_M * alpha_M + tl.sum(p_MN, 1)
        v_ND = tl.load(
            v_base + v_off_N[:, None] + dims_D[None, :],
            mask=key_ok_N[:, None] & dim_ok_D[None, :],
            other=0.0,
        )
        acc_MD = acc_MD * alpha_M[:, None] + tl.dot(p_MN.to(v_ND.dtype), v_ND, input_precision=PRECISION)
        m_M = m_new_M
    out_MD = acc_MD / l_M[:, None]
    tl.store(
        o_ptr + token_M[:, None] * stride_ot + head_M[:, None] * stride_oh + dims_D[None, :],
        out_MD.to(o_ptr.dtype.element_ty),
        mask=row_ok_M[:, None] & dim_ok_D[None, :],
    )


def cached_attention_fwd(
    q_THK: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q_N1: torch.Tensor,
    slots_N: torch.Tensor,
    kv_lens_N: torch.Tensor,
    scale: float,
    max_q: int,
    table: torch.Tensor | None = None,
    page: int | None = None,
) -> torch.Tensor:
    """Launch the kernel over a grid of (N, ceil(max_q / BLOCK_Q), G); reads no device value on the host.

    Tile sizes depend only on the head counts, head dim and dtype, never on the batch, so a query row is
    computed the same way whatever else is in the batch. fp32 inputs use IEEE fp32 dots (not TF32).

    Args:
        q_THK (torch.Tensor): ``[T, H, K]``.
        k_cache, v_cache (torch.Tensor): ``[num_blocks, P, G, K]``, last dim contiguous.
        cu_seqlens_q_N1 (torch.Tensor): ``[N + 1]`` query offsets.
        slots_N, kv_lens_N (torch.Tensor): ``[N]`` slot and key count of each sequence.
        scale (float): score scale.
        max_q (int): upper bound of the per-sequence query counts.
        table (torch.Tensor, Optional): ``[slots, max_blocks]`` block ids: position p of slot s is row ``p % P`` of
            block ``table[s, p // P]``. Default: block s for slot s (a cache laid out by slot).
        page (int, Optional): P, positions per block. Default: the cache's second dim.

    Returns:
        ``[T, H, K]`` in the dtype of q.
    """
    if table is None:
        table = torch.arange(k_cache.shape[0], device=k_cache.device)[:, None]
    page = page or k_cache.shape[1]
    num_tokens, num_heads, head_dim = q_THK.shape
    num_kv_heads = k_cache.shape[2]
    assert num_heads % num_kv_heads == 0 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    assert table.shape[1] == 1 or table.stride(1) == 1
    q_THK = q_THK if q_THK.stride(-1) == 1 else q_THK.contiguous()
    out_THK = torch.empty(q_THK.shape, dtype=q_THK.dtype, device=q_THK.device)
    num_seqs = slots_N.shape[0]
    if num_tokens == 0 or num_seqs == 0 or max_q == 0:
        return out_THK
    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    head_dim_pad = max(16, triton.next_power_of_2(head_dim))
    block_q = max(1, 64 // group_pad)  # about 64 rows of query x head per tile
    block_n = 64 if head_dim_pad <= 128 else 32
    grid = (num_seqs, triton.cdiv(max_q, block_q), num_kv_heads)
    _cached_attention_kernel[grid](
        q_THK,
        k_cache,
        v_cache,
        out_THK,
        cu_seqlens_q_N1,
        slots_N,
        kv_lens_N,
        table,
        scale * _LOG2E,
        table.stride(0),
        page,
        q_THK.stride(0),
        q_THK.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        out_THK.stride(0),
        out_THK.stride(1),
        GROUP=group,
        GROUP_PAD=group_pad,
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=head_dim_pad,
        BLOCK_Q=block_q,
        BLOCK_N=block_n,
        PRECISION="ieee" if q_THK.dtype == torch.float32 else "tf32",
        num_warps=8 if head_dim_pad >= 256 else 4,
        num_stages=2,
    )
    return out_THK
