"""Triton kernel of ``rows.copy_rows``: one program per (row, block of the row), a plain bitwise copy.

Imported only when Triton is installed. Runs on CUDA, or on CPU tensors under ``TRITON_INTERPRET=1``.

Legend: R rows moved, E elements per row, BE elements per program.
"""

import torch
import triton
import triton.language as tl

_BLOCK = 4096  # elements per program: 16 KiB of fp32


@triton.jit
def _copy_rows_kernel(dst_ptr, dst_index_ptr, src_ptr, src_index_ptr, E, BE: tl.constexpr):
    i = tl.program_id(0)
    offs = tl.program_id(1).to(tl.int64) * BE + tl.arange(0, BE)
    mask = offs < E
    dst_row = tl.load(dst_index_ptr + i).to(tl.int64)
    src_row = tl.load(src_index_ptr + i).to(tl.int64)
    values = tl.load(src_ptr + src_row * E + offs, mask=mask)
    tl.store(dst_ptr + dst_row * E + offs, values, mask=mask)


def copy_rows_triton(dst: torch.Tensor, dst_index: torch.Tensor, src: torch.Tensor, src_index: torch.Tensor) -> None:
    """``dst[dst_index] = src[src_index]`` for contiguous ``dst`` and ``src`` of one row shape and dtype."""
    assert dst.is_contiguous() and src.is_contiguous() and dst.shape[1:] == src.shape[1:] and dst.dtype == src.dtype
    num_rows = dst_index.numel()
    row_elems = dst[0].numel() if dst.shape[0] else 0
    if num_rows == 0 or row_elems == 0:
        return
    block = min(_BLOCK, triton.next_power_of_2(row_elems))
    grid = (num_rows, triton.cdiv(row_elems, block))
    _copy_rows_kernel[grid](dst, dst_index.contiguous(), src, src_index.contiguous(), row_elems, BE=block)
