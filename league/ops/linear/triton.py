"""A Triton GEMM ``x @ w^T`` whose result for a row does not depend on how many rows are in the call.

cuBLAS picks its kernel by shape, and at a few rows it splits the sum over K across thread blocks: on an H200 the
GDN and attention out-projections (K = 4,096) round 0.2% of their outputs differently at 8 rows a call (decode)
than at 4,096 (the whole sequence), ``benchmarks/results/mixer_precision_gpu_parity.json``. Here every call runs
one tile configuration, with no split: each output is one fp32 sum over K in BK steps of ``tl.dot``, in the same
order whatever M is, then rounded once to the output dtype. So a token's projections in a decode step equal
its projections in a training forward bitwise, which decode parity (``Numerics.as_decode``) needs.

Forward only: ``linear.linear`` under decode parity takes the gradients from ``torch.matmul``. Imported only when
Triton is installed; runs on CUDA, or on CPU tensors under ``TRITON_INTERPRET=1``. Reads no device value on the
host, so CUDA graphs can capture it.

Legend: M rows, K input dim, N output dim; inside the kernel BM x BN output tiles, BK input columns a step.
"""

import torch
import triton
import triton.language as tl

# the one configuration (changing it changes the rounding of every parity run): 64 x 64 tiles keep ~130 programs
# busy at decode (N = 2,048, M <= 256) and BK 64 with 4 stages streams the weights
BLOCK_M, BLOCK_N, BLOCK_K, NUM_WARPS, NUM_STAGES = 64, 64, 64, 4, 4


@triton.jit(do_not_specialize=["M"])
def _fixed_tiles_matmul_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    M,
    stride_xm,
    stride_wn,
    stride_ym,
    N: tl.constexpr,
    K: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    # the M blocks of one N block are neighbours in launch order: at decode they share its weights through L2
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    row_ok, col_ok = rows < M, cols < N
    ks = tl.arange(0, BK)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k in range(0, K, BK):
        k_ok = (k + ks < K)[None, :]
        x = tl.load(x_rows + (k + ks)[None, :], mask=row_ok[:, None] & k_ok, other=0.0)
        w = tl.load(w_rows + (k + ks)[None, :], mask=col_ok[:, None] & k_ok, other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    y_rows = y_ptr + rows.to(tl.int64)[:, None] * stride_ym
    tl.store(y_rows + cols[None, :], acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def fixed_tiles_matmul(x_MK: torch.Tensor, weight_NK: torch.Tensor) -> torch.Tensor:
    """``x @ weight^T`` ``[M, N]`` in x's dtype, fp32 sums over K in a fixed order (see the module doc).

    Args:
        x_MK (torch.Tensor): ``[M, K]`` bf16 or fp16, last dim contiguous.
        weight_NK (torch.Tensor): ``[N, K]`` in x's dtype, last dim contiguous.
    """
    num_rows, dim = x_MK.shape
    num_cols = weight_NK.shape[0]
    assert x_MK.dtype == weight_NK.dtype and x_MK.dtype in (torch.bfloat16, torch.float16)
    assert x_MK.stride(-1) == 1 and weight_NK.stride(-1) == 1 and weight_NK.shape[1] == dim
    y_MN = torch.empty(num_rows, num_cols, dtype=x_MK.dtype, device=x_MK.device)
    if num_rows == 0:
        return y_MN
    grid = (triton.cdiv(num_rows, BLOCK_M), triton.cdiv(num_cols, BLOCK_N))
    _fixed_tiles_matmul_kernel[grid](
        x_MK,
        weight_NK,
        y_MN,
        num_rows,
        x_MK.stride(0),
        weight_NK.stride(0),
        y_MN.stride(0),
        N=num_cols,
        K=dim,
        BM=BLOCK_M,
        BN=BLOCK_N,
        BK=BLOCK_K,
        num_warps=NUM_WARPS,
        num_stages=NUM_STAGES,
    )
    return y_MN
