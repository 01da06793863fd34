"""Whole rows copied between tensors by index, ``dst[dst_index] = src[src_index]`` over the first dim: how a
verify's GDN conv windows are committed (each request's window after its last accepted token, from the verify's
per-step scratch rows into its slot).

Advanced indexing gathers into a temporary and scatters it back, element by element; on CUDA with Triton one
kernel copies each row straight across, in wide contiguous blocks (a row is a whole window or state), reading the
indices on the device (no host synchronisation). Not responsible for which rows move (the model decides).

Legend: R rows moved, E elements per row.
"""

import torch

from league.ops.backends import use_kernel


def copy_rows(dst: torch.Tensor, dst_index: torch.Tensor, src: torch.Tensor, src_index: torch.Tensor) -> None:
    """``dst[dst_index] = src[src_index]``: row ``src_index[i]`` of ``src`` into row ``dst_index[i]`` of ``dst``.

    Args:
        dst (torch.Tensor): ``[rows, ...]``, contiguous; written in place.
        dst_index (torch.Tensor): ``[R]`` integer rows of ``dst`` (distinct).
        src (torch.Tensor): ``[rows', ...]`` with ``dst``'s row shape and dtype, contiguous.
        src_index (torch.Tensor): ``[R]`` integer rows of ``src``.
    """
    if dst.shape[1:] != src.shape[1:] or dst.dtype != src.dtype:
        raise ValueError(
            f"copy_rows: rows of {tuple(src.shape[1:])} {src.dtype} into rows of {tuple(dst.shape[1:])} {dst.dtype}"
        )
    if use_kernel(dst, None, None, op="copy_rows") and dst.is_contiguous() and src.is_contiguous():
        from league.ops.rows.triton import copy_rows_triton

        copy_rows_triton(dst, dst_index, src, src_index)
        return
    dst[dst_index] = src[src_index]
