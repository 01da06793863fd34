"""``rows.copy_rows``: rows copied by index, as advanced indexing copies them; the Triton kernel bitwise the same
(on CUDA, or on CPU under ``TRITON_INTERPRET=1``; those cases skip otherwise)."""

import importlib.util
import os

import pytest
import torch

from league.ops.rows import copy_rows

HAS_TRITON = importlib.util.find_spec("triton") is not None
CUDA = torch.cuda.is_available()
CAN_RUN_TRITON = HAS_TRITON and (CUDA or os.environ.get("TRITON_INTERPRET") == "1")
DEVICE = "cuda" if CUDA else "cpu"


def operands(dtype: torch.dtype, row_shape: tuple[int, ...], device: str = "cpu"):
    gen = torch.Generator().manual_seed(0)
    dst = torch.randn(6, *row_shape, generator=gen).to(device, dtype)
    src = torch.randn(9, *row_shape, generator=gen).to(device, dtype)
    dst_index = torch.tensor([4, 0, 5], device=device)
    src_index = torch.tensor([8, 8, 2], device=device)
    return dst, dst_index, src, src_index


def test_copy_rows_moves_whole_rows_and_nothing_else():
    dst, dst_index, src, src_index = operands(torch.float32, (3, 5))
    before = dst.clone()
    copy_rows(dst, dst_index, src, src_index)
    for d, s in ((4, 8), (0, 8), (5, 2)):
        assert torch.equal(dst[d], src[s])
    for untouched in (1, 2, 3):
        assert torch.equal(dst[untouched], before[untouched])


def test_copy_rows_refuses_rows_of_another_shape_or_dtype():
    dst, dst_index, src, src_index = operands(torch.float32, (3, 5))
    with pytest.raises(ValueError, match="copy_rows"):
        copy_rows(dst, dst_index, src[:, :2], src_index)
    with pytest.raises(ValueError, match="copy_rows"):
        copy_rows(dst, dst_index, src.double(), src_index)


@pytest.mark.skipif(not CAN_RUN_TRITON, reason="needs triton and CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("row_shape", [(2, 3, 700), (4097,), (1,)])  # rows past one block, and a one-element row
def test_triton_copy_rows_is_the_indexed_copy_bitwise(dtype, row_shape):
    from league.ops.rows.triton import copy_rows_triton

    dst, dst_index, src, src_index = operands(dtype, row_shape, DEVICE)
    expected = dst.clone()
    expected[dst_index] = src[src_index]
    copy_rows_triton(dst, dst_index, src, src_index)
    assert torch.equal(dst, expected)
    copy_rows_triton(dst, dst_index[:0], src, src_index[:0])  # nothing to move
    assert torch.equal(dst, expected)
