"""Triton kernels of the SwiGLU experts for decode and verify: few token-expert pairs per expert, forward only.

Computes what ``moe.grouped_swiglu_experts`` computes, for the case where each expert receives a handful of rows
(at decode, 256 experts and top-8 give ~8 rows per expert at batch 256). There the step is bound by reading the
experts' weights, and the grouped GEMM of ``torch._grouped_mm`` runs such skinny groups well below the memory
bandwidth. Each program here owns one expert and one block of output columns: it streams that block of the
expert's weights once per BM rows (once in all at decode) and exits at once when the expert has no rows. Routing
is nearly even at decode (in a batch of 256 on random weights, the busiest expert of a layer gets ~18 rows where the
mean is 8: ``benchmarks/results/profile_decode.json``); ``TileConfig.row_splits`` programs can share one expert's
row tiles when it is not (no gain at decode: ``benchmarks/results/moe_skew_gpu.json``).

Three launches, none reading a value back to the host, so a CUDA graph can capture them:

1. sort: the pairs sorted by expert as ``moe.sort_pairs`` sorts them (bitwise: integers), in one launch where
   torch takes ~5 small kernels (3.8 against 19.2 µs a call in a CUDA graph at 256 tokens on an H200,
   ``benchmarks/results/moe_sort_gpu.json``): a counting sort with one program per expert
   (:func:`sort_pairs_triton`).
   Past :data:`SORT_MAX_PAIRS` pairs torch's sort runs instead.
2. gate-up, over a static grid ``(E, column blocks, row splits)`` as the down kernel, each program reading its row
   range from the group ends ``offs_E`` on the device: the rows of x are gathered by token inside the kernel (no
   dispatched copy of x), gate and up accumulate in fp32, and the epilogue rounds where the reference does: gate
   and up to the weights' dtype (the grouped GEMM's output), SiLU in fp32 of the rounded gate, rounded, times the
   rounded up, rounded.
3. down: the fp32 sum is rounded (the grouped GEMM's output), multiplied in fp32 by the pair's routing weight and
   rounded, as ``(y * w).to(dtype)`` does; each row is stored at its pair's index ``t * A + a``, so the combine
   over a token's A experts is a plain ``view(T, A, D).sum(1)`` (the same sum as ``moe._combine``).

So the result differs from the grouped GEMM's only where a different summation order in fp32 moves a value across
a rounding boundary (and by ``exp``'s last fp32 bits in the SiLU). Not responsible for choosing when to run
(``moe.swiglu_experts`` does), for gradients, or for placing experts on devices.

Imported only when Triton is installed. Runs on CUDA, or on CPU tensors under ``TRITON_INTERPRET=1``.

Legend: T tokens, D model dim, E experts, I expert intermediate dim, A experts per token (top-k), N = T * A
token-expert pairs; inside the kernels BM rows, BN output columns and BK input columns per tile (BN pairs per
step in the sort).
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True, slots=True)
class TileConfig:
    """Tile sizes and launch settings of one kernel."""

    block_m: int
    """Rows per tile (16 is ``tl.dot``'s minimum); an expert with more rows loops over row tiles."""
    block_n: int
    """Output columns per program."""
    block_k: int
    """Input columns per step of the inner loop."""
    num_warps: int
    """Warps per program."""
    num_stages: int
    """Depth of the software pipeline over K (tiles in flight)."""
    row_splits: int = 1
    """Programs that share an expert's row tiles (program r takes tiles r, r + splits, ...): a hot expert's tiles
    then run side by side instead of one after another."""


# (mean rows per expert up to, gate-up config, down config), first match wins. On an H200
# (benchmarks/results/kernels_gpu_moe.json) these are within 1-2% of the fastest swept configs at batches 16-256;
# at batch 1 a down tile of 128 columns and BK 64 ran 20% faster, not adopted yet: the bitwise agreement with the
# grouped GEMMs was measured with these
CONFIGS = (
    (1.0, TileConfig(16, 32, 128, 4, 4), TileConfig(16, 64, 128, 4, 4)),
    (16.0, TileConfig(16, 64, 128, 4, 4), TileConfig(16, 64, 128, 4, 4)),
    (float("inf"), TileConfig(32, 64, 128, 4, 4), TileConfig(32, 64, 128, 4, 4)),
)
# pairs up to which the Triton sort runs: its work is E * N comparisons (8,192 pairs is a batch of 1024 tokens,
# TRITON_MAX_ROWS_PER_EXPERT at 256 experts; bitwise torch's on an H200 up to 16,384, timed up to 2,048)
SORT_MAX_PAIRS = 16384
_SORT_BLOCK = 2048  # expert ids each program of the sort reads per step of its loops


@triton.jit
def _sort_pairs_kernel(experts_ptr, order_ptr, offs_ptr, inverse_ptr, N, BN: tl.constexpr, WITH_INVERSE: tl.constexpr):
    expert = tl.program_id(0)
    lanes = tl.arange(0, BN)
    before = 0  # pairs of the experts below this one: where its group starts
    # a while loop, not range(): the interpreter cannot turn a runtime scalar into a Python int
    start = 0
    while start < N:
        experts = tl.load(experts_ptr + start + lanes, mask=start + lanes < N, other=expert).to(tl.int32)
        before += tl.sum((experts < expert).to(tl.int32), axis=0)
        start += BN
    slot = before
    start = 0
    while start < N:
        pairs = start + lanes
        mine = (tl.load(experts_ptr + pairs, mask=pairs < N, other=-1).to(tl.int32) == expert).to(tl.int32)
        # the pairs of this expert in pair order: stable
        slots = slot + tl.cumsum(mine, 0) - mine
        tl.store(order_ptr + slots, pairs.to(tl.int64), mask=mine == 1)
        if WITH_INVERSE:
            tl.store(inverse_ptr + pairs, slots.to(tl.int64), mask=mine == 1)
        slot += tl.sum(mine, axis=0)
        start += BN
    tl.store(offs_ptr + expert, slot)


def sort_pairs_triton(
    experts_TA: torch.Tensor, num_experts: int, with_inverse: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``moe.sort_pairs`` in one launch (bitwise the torch results), and the inverse permutation if asked for.

    A counting sort with one program per expert: each reads all N expert ids twice (from L2), counting the pairs
    of lower experts, then placing its own pairs in pair order (stable) at that offset. The work is E * N
    comparisons spread over E programs: a few microseconds at decode and verify (N up to ~8k); prefill's tens of
    thousands of pairs are better sorted by torch.

    Args:
        experts_TA (torch.Tensor): ``[T, A]`` expert ids in ``[0, E)``, any integer dtype, contiguous.
        num_experts (int): E.
        with_inverse (bool): also write each pair's sorted position. Default: ``False``.

    Returns:
        ``(order_N, offs_E, inverse_N)``: the pair index ``t * A + a`` at each sorted position (int64), the group
        ends (int32, cumulative: expert ``e`` owns sorted positions ``[offs_E[e-1], offs_E[e])``), and each pair's
        sorted position (int64: ``inverse_N[order_N[i]] == i``), or ``None`` without ``with_inverse``.
    """
    assert experts_TA.is_contiguous()
    num_pairs = experts_TA.numel()
    device = experts_TA.device
    order_N = torch.empty(num_pairs, dtype=torch.int64, device=device)
    inverse_N = torch.empty(num_pairs, dtype=torch.int64, device=device) if with_inverse else None
    offs_E = torch.empty(num_experts, dtype=torch.int32, device=device)
    block_n = min(_SORT_BLOCK, triton.next_power_of_2(max(num_pairs, 1)))
    _sort_pairs_kernel[(num_experts,)](
        experts_TA,
        order_N,
        offs_E,
        order_N if inverse_N is None else inverse_N,
        num_pairs,
        BN=block_n,
        WITH_INVERSE=with_inverse,
        num_warps=8 if block_n >= 2048 else 4,
    )
    return order_N, offs_E, inverse_N


@triton.jit
def _swiglu(gate, up, dtype: tl.constexpr):
    """``silu(gate) * up`` of fp32 sums, rounded to ``dtype`` at each step where the reference rounds."""
    gate = gate.to(dtype).to(tl.float32)
    up = up.to(dtype).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    return (act * up).to(dtype)


@triton.jit
def _program_block(offs_ptr, NUM_COLS: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr):
    """This program's expert, its block of output columns and their mask, the first row of its first row tile and
    the expert's end row (its tiles are every ``num_programs(2)``-th from that one)."""
    expert = tl.program_id(0)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    start = tl.load(offs_ptr + expert - 1, mask=expert > 0, other=0)
    end = tl.load(offs_ptr + expert)
    return expert, cols, cols < NUM_COLS, start + tl.program_id(2) * BM, end


@triton.jit
def _gate_up_swiglu_kernel(
    x_ptr,
    order_ptr,
    offs_ptr,
    w_ptr,
    h_ptr,
    stride_x,
    stride_we,
    stride_wn,
    stride_h,
    TOPK: tl.constexpr,
    K: tl.constexpr,
    NUM_COLS: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    expert, cols, col_mask, start, end = _program_block(offs_ptr, NUM_COLS, BN, BM)
    ks = tl.arange(0, BK)
    w_gate_ptr = w_ptr + expert.to(tl.int64) * stride_we + cols[:, None] * stride_wn
    w_up_ptr = w_gate_ptr + NUM_COLS * stride_wn
    # a while loop, not range(): the interpreter cannot turn a runtime scalar into a Python int
    row0 = start
    while row0 < end:
        rows = row0 + tl.arange(0, BM)
        row_mask = rows < end
        tokens = tl.load(order_ptr + rows, mask=row_mask, other=0).to(tl.int64) // TOPK
        x_row_ptr = x_ptr + tokens[:, None] * stride_x
        gate = tl.zeros([BM, BN], dtype=tl.float32)
        up = tl.zeros([BM, BN], dtype=tl.float32)
        for k in range(0, K, BK):
            k_mask = (k + ks < K)[None, :]
            x = tl.load(x_row_ptr + (k + ks)[None, :], mask=row_mask[:, None] & k_mask, other=0.0)
            w_mask = col_mask[:, None] & k_mask
            w_gate = tl.load(w_gate_ptr + (k + ks)[None, :], mask=w_mask, other=0.0)
            w_up = tl.load(w_up_ptr + (k + ks)[None, :], mask=w_mask, other=0.0)
            gate = tl.dot(x, tl.trans(w_gate), gate)
            up = tl.dot(x, tl.trans(w_up), up)
        h = _swiglu(gate, up, h_ptr.dtype.element_ty)
        h_row_ptr = h_ptr + rows.to(tl.int64)[:, None] * stride_h
        tl.store(h_row_ptr + cols[None, :], h, mask=row_mask[:, None] & col_mask[None, :])
        row0 += BM * tl.num_programs(2)


@triton.jit
def _down_kernel(
    h_ptr,
    order_ptr,
    offs_ptr,
    w_ptr,
    pair_weights_ptr,
    y_ptr,
    stride_h,
    stride_we,
    stride_wn,
    stride_y,
    K: tl.constexpr,
    NUM_COLS: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    expert, cols, col_mask, start, end = _program_block(offs_ptr, NUM_COLS, BN, BM)
    ks = tl.arange(0, BK)
    w_row_ptr = w_ptr + expert.to(tl.int64) * stride_we + cols[:, None] * stride_wn
    row0 = start
    while row0 < end:
        rows = row0 + tl.arange(0, BM)
        row_mask = rows < end
        h_row_ptr = h_ptr + rows.to(tl.int64)[:, None] * stride_h
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        for k in range(0, K, BK):
            k_mask = (k + ks < K)[None, :]
            h = tl.load(h_row_ptr + (k + ks)[None, :], mask=row_mask[:, None] & k_mask, other=0.0)
            w = tl.load(w_row_ptr + (k + ks)[None, :], mask=col_mask[:, None] & k_mask, other=0.0)
            acc = tl.dot(h, tl.trans(w), acc)
        pairs = tl.load(order_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        pair_weight = tl.load(pair_weights_ptr + pairs, mask=row_mask, other=0.0).to(tl.float32)
        dtype = y_ptr.dtype.element_ty
        y = acc.to(dtype).to(tl.float32) * pair_weight[:, None]
        y_row_ptr = y_ptr + pairs[:, None] * stride_y
        tl.store(y_row_ptr + cols[None, :], y.to(dtype), mask=row_mask[:, None] & col_mask[None, :])
        row0 += BM * tl.num_programs(2)


def _launch_options(config: TileConfig) -> dict:
    return dict(
        BM=config.block_m,
        BN=config.block_n,
        BK=config.block_k,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )


def tile_configs(num_pairs: int, num_experts: int) -> tuple[TileConfig, TileConfig]:
    """The (gate-up, down) configs of :data:`CONFIGS` for ``num_pairs / num_experts`` mean rows per expert."""
    mean_rows = num_pairs / num_experts
    return next((gate_up, down) for bound, gate_up, down in CONFIGS if mean_rows <= bound)


def gate_up_swiglu_fwd(
    x_TD: torch.Tensor,
    order_N: torch.Tensor,
    offs_E: torch.Tensor,
    w_gate_up_E2ID: torch.Tensor,
    num_topk: int,
    config: TileConfig,
) -> torch.Tensor:
    """``h_NI = silu(gate) * up`` of each pair, rows in expert order (row ``i`` is pair ``order_N[i]``).

    Args:
        x_TD (torch.Tensor): ``[T, D]``, last dim contiguous.
        order_N (torch.Tensor): pair index ``t * A + a`` at each sorted position (from :func:`sort_pairs_triton`
            or ``moe.sort_pairs``).
        offs_E (torch.Tensor): group ends, int32 cumulative (from the same sort).
        w_gate_up_E2ID (torch.Tensor): ``[E, 2I, D]`` in x's dtype, last dim contiguous; rows ``[:I]`` the gate.
        num_topk (int): A.
        config (TileConfig): tiles and launch settings.
    """
    num_experts, two_inter, dim = w_gate_up_E2ID.shape
    assert x_TD.stride(-1) == 1 and w_gate_up_E2ID.stride(-1) == 1 and x_TD.dtype == w_gate_up_E2ID.dtype
    h_NI = torch.empty(order_N.numel(), two_inter // 2, dtype=x_TD.dtype, device=x_TD.device)
    grid = (num_experts, triton.cdiv(two_inter // 2, config.block_n), config.row_splits)
    _gate_up_swiglu_kernel[grid](
        x_TD,
        order_N,
        offs_E,
        w_gate_up_E2ID,
        h_NI,
        x_TD.stride(0),
        w_gate_up_E2ID.stride(0),
        w_gate_up_E2ID.stride(1),
        h_NI.stride(0),
        TOPK=num_topk,
        K=dim,
        NUM_COLS=two_inter // 2,
        **_launch_options(config),
    )
    return h_NI


def down_fwd(
    h_NI: torch.Tensor,
    order_N: torch.Tensor,
    offs_E: torch.Tensor,
    w_down_EDI: torch.Tensor,
    pair_weights_N: torch.Tensor,
    config: TileConfig,
) -> torch.Tensor:
    """``y = w * down(h)`` of each pair, stored at row ``order_N[i]`` for row ``i`` of ``h_NI`` (token-major order).

    Args:
        h_NI (torch.Tensor): from :func:`gate_up_swiglu_fwd` (rows in expert order).
        order_N, offs_E (torch.Tensor): as :func:`gate_up_swiglu_fwd`.
        w_down_EDI (torch.Tensor): ``[E, D, I]`` in h's dtype, last dim contiguous.
        pair_weights_N (torch.Tensor): routing weight of pair ``t * A + a`` (``weights_TA`` flattened), any float
            dtype.
        config (TileConfig): tiles and launch settings.
    """
    num_experts, dim, inter = w_down_EDI.shape
    assert h_NI.stride(-1) == 1 and w_down_EDI.stride(-1) == 1 and h_NI.dtype == w_down_EDI.dtype
    y_ND = torch.empty(h_NI.shape[0], dim, dtype=h_NI.dtype, device=h_NI.device)
    grid = (num_experts, triton.cdiv(dim, config.block_n), config.row_splits)
    _down_kernel[grid](
        h_NI,
        order_N,
        offs_E,
        w_down_EDI,
        pair_weights_N,
        y_ND,
        h_NI.stride(0),
        w_down_EDI.stride(0),
        w_down_EDI.stride(1),
        y_ND.stride(0),
        K=inter,
        NUM_COLS=dim,
        **_launch_options(config),
    )
    return y_ND


def grouped_swiglu_experts_triton(
    x_TD: torch.Tensor,
    w_gate_up_E2ID: torch.Tensor,
    w_down_EDI: torch.Tensor,
    weights_TA: torch.Tensor,
    experts_TA: torch.Tensor,
    sorted_pairs: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``moe.grouped_swiglu_experts`` by the Triton sort and expert kernels: forward only (decode and verify under
    no_grad).

    Arguments as ``moe.swiglu_experts``; x and both expert weights in one dtype (bf16 is what it is meant for).
    The tile configs are picked on the host from the mean rows per expert, ``N / E`` (:func:`tile_configs`).
    ``sorted_pairs``, ``moe.sort_pairs``' result, replaces the Triton sort (which takes at most
    :data:`SORT_MAX_PAIRS` pairs).
    """
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x_TD, w_gate_up_E2ID, w_down_EDI, weights_TA)):
        raise ValueError(
            "grouped_swiglu_experts_triton has no backward: call it under torch.no_grad(), or use "
            "moe.grouped_swiglu_experts when gradients are needed"
        )
    num_tokens, num_topk = experts_TA.shape
    num_experts = w_gate_up_E2ID.shape[0]
    if sorted_pairs is None:
        order_N, offs_E, _ = sort_pairs_triton(experts_TA.contiguous(), num_experts)
    else:
        order_N, offs_E = sorted_pairs
    gate_up_config, down_config = tile_configs(order_N.numel(), num_experts)
    if x_TD.stride(-1) != 1:
        x_TD = x_TD.contiguous()
    h_NI = gate_up_swiglu_fwd(x_TD, order_N, offs_E, w_gate_up_E2ID, num_topk, gate_up_config)
    y_ND = down_fwd(h_NI, order_N, offs_E, w_down_EDI, weights_TA.reshape(-1), down_config)
    return y_ND.view(num_tokens, num_topk, y_ND.shape[-1]).sum(1)
