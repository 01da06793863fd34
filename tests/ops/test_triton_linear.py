"""The fixed-tiles GEMM of decode parity: close to an fp32 matmul, each row's result independent of the rows that
share the call, and ``linear``'s autograd form with the gradients of ``F.linear``.

Runs on CUDA (bf16), or on CPU under ``TRITON_INTERPRET=1`` (fp16: the interpreter has no bf16 dot); skipped
otherwise.
"""

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

from league.ops.linear import _FixedTilesLinear, fixed_tiles_fit, linear
from league.ops.numerics import DECODE_PARITY

HAS_TRITON = importlib.util.find_spec("triton") is not None
CUDA = torch.cuda.is_available()
CAN_RUN_TRITON = HAS_TRITON and (CUDA or os.environ.get("TRITON_INTERPRET") == "1")
DEVICE, DTYPE = ("cuda", torch.bfloat16) if CUDA else ("cpu", torch.float16)

pytestmark = pytest.mark.skipif(not CAN_RUN_TRITON, reason="needs triton and CUDA or TRITON_INTERPRET=1")


def operands(rows: int, dim: int, cols: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, dim, generator=gen).to(DEVICE, DTYPE)
    w = (torch.randn(cols, dim, generator=gen) * dim**-0.5).to(DEVICE, DTYPE)
    return x, w


@pytest.mark.parametrize("shape", [(70, 130, 100), (1, 64, 64), (129, 256, 65), (3, 200, 1)])
def test_fixed_tiles_matmul_matches_fp32(shape):
    from league.ops.linear.triton import fixed_tiles_matmul

    x, w = operands(*shape)
    out = fixed_tiles_matmul(x, w)
    exact = x.float() @ w.float().t()
    assert out.dtype == DTYPE and out.shape == exact.shape
    # one rounding of an fp32 sum: within an ulp of the output dtype (plus fp32 summation noise)
    torch.testing.assert_close(out.float(), exact, rtol=8e-3, atol=1e-3)


def test_fixed_tiles_rows_do_not_depend_on_the_call():
    from league.ops.linear.triton import fixed_tiles_matmul

    x, w = operands(150, 192, 96, seed=1)
    whole = fixed_tiles_matmul(x, w)
    for rows in (1, 7, 64, 65, 149):
        assert torch.equal(fixed_tiles_matmul(x[:rows].contiguous(), w), whole[:rows]), rows
    # a row alone, anywhere in the batch
    for row in (0, 63, 64, 149):
        assert torch.equal(fixed_tiles_matmul(x[row : row + 1].contiguous(), w), whole[row : row + 1]), row
    assert fixed_tiles_matmul(x[:0], w).shape == (0, 96)


def test_fixed_tiles_linear_gradients_are_the_matmuls():
    x, w = operands(33, 80, 48, seed=2)
    x = x.view(3, 11, 80)
    grad = torch.randn(3, 11, 48, generator=torch.Generator().manual_seed(3)).to(DEVICE, DTYPE)
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    out = _FixedTilesLinear.apply(xa, wa)
    out.backward(grad)
    xb, wb = x.clone().requires_grad_(), w.clone().requires_grad_()
    # fp32 on CPU: half-precision matmuls are not everywhere there
    F.linear(xb.float(), wb.float()).backward(grad.float())
    assert out.shape == (3, 11, 48)
    torch.testing.assert_close(xa.grad.float(), xb.grad.float(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(wa.grad.float(), wb.grad.float(), rtol=1e-2, atol=1e-2)


def test_linear_takes_fixed_tiles_only_where_it_runs():
    x, w = operands(5, 32, 16, seed=4)
    assert fixed_tiles_fit(x, w) == CUDA
    assert not fixed_tiles_fit(x.float(), w.float())
    # elsewhere (CPU, fp32) the flag falls back to F.linear, bitwise
    assert torch.equal(
        linear(x.float().cpu(), w.float().cpu(), DECODE_PARITY), F.linear(x.float().cpu(), w.float().cpu())
    )
    if CUDA:
        assert torch.equal(linear(x, w, DECODE_PARITY), _FixedTilesLinear.apply(x, w))
