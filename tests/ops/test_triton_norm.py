"""The Triton (1 + w) RMSNorm against ``rms_norm_reference``: forward and gradients of x and w.

Runs on CUDA, or on CPU under ``TRITON_INTERPRET=1`` (``PYTHONPATH`` holding a Triton install); skipped otherwise.
"""

import importlib.util
import os

import pytest
import torch

from league.ops.norm import gated_rms_norm_reference, rms_norm, rms_norm_reference

HAS_TRITON = importlib.util.find_spec("triton") is not None
CAN_RUN_TRITON = HAS_TRITON and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = pytest.mark.skipif(not CAN_RUN_TRITON, reason="needs triton and CUDA or TRITON_INTERPRET=1")

# bf16: up to one ulp apart (the interpreter truncates fp32 to bf16 where CUDA rounds to nearest)
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}


def fwd_bwd(fn, x, w, grad_out):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    out = fn(x, w, 1e-6)
    out.backward(grad_out)
    return out.detach(), x.grad, w.grad


@pytest.mark.parametrize("shape", [(37, 24), (5, 3, 128), (9, 200), (1, 2048), (64, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_rms_norm_matches_reference(shape, dtype):
    from league.ops.norm.triton import triton_rms_norm

    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=gen) * 3).to(dtype).to(DEVICE)
    w = (torch.randn(shape[-1], generator=gen) * 0.2).to(dtype).to(DEVICE)
    grad_out = torch.randn(shape, generator=gen).to(dtype).to(DEVICE)
    out, dx, dw = fwd_bwd(triton_rms_norm, x, w, grad_out)
    out_ref, dx_ref, dw_ref = fwd_bwd(rms_norm_reference, x, w, grad_out)
    assert out.dtype == dx.dtype == dw.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out, out_ref, **TOL[dtype])
    torch.testing.assert_close(dx, dx_ref, **TOL[dtype])
    torch.testing.assert_close(dw, dw_ref, **TOL[dtype])


def test_fp32_input_bf16_weight_and_strided_rows():
    from league.ops.norm.triton import triton_rms_norm

    gen = torch.Generator().manual_seed(1)
    base = torch.randn(10, 2, 48, generator=gen).to(DEVICE)
    x = base[:, 1]  # rows 96 apart
    w = (torch.randn(48, generator=gen) * 0.2).bfloat16().to(DEVICE)
    grad_out = torch.randn(10, 48, generator=gen).to(DEVICE)
    out, dx, dw = fwd_bwd(triton_rms_norm, x, w, grad_out)
    out_ref, dx_ref, dw_ref = fwd_bwd(rms_norm_reference, x, w, grad_out)
    assert out.dtype == torch.float32 and dw.dtype == torch.bfloat16
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw, dw_ref)


def test_rows_do_not_depend_on_the_batch():
    from league.ops.norm.triton import triton_rms_norm

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(40, 128, generator=gen).to(DEVICE)
    w = torch.randn(128, generator=gen).to(DEVICE)
    full = triton_rms_norm(x, w, 1e-6)
    assert torch.equal(full[17:18], triton_rms_norm(x[17:18], w, 1e-6))
    assert torch.equal(full[:5], triton_rms_norm(x[:5], w, 1e-6))


def test_no_rows_and_dispatch():
    from league.ops.norm.triton import triton_rms_norm

    x, w = torch.zeros(0, 64, device=DEVICE, requires_grad=True), torch.zeros(64, device=DEVICE, requires_grad=True)
    out = triton_rms_norm(x, w, 1e-6)
    out.sum().backward()
    assert out.shape == (0, 64) and torch.count_nonzero(w.grad) == 0
    if DEVICE == "cpu":
        y = torch.randn(3, 64)
        assert torch.equal(rms_norm(y, w.detach(), 1e-6), rms_norm_reference(y, w.detach(), 1e-6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_gated_rms_norm_kernel_matches_reference(dtype, weight_dtype):
    """Values from the kernel (rounded where the reference rounds), gradients by the reference."""
    from league.ops.norm import gated_rms_norm_kernel

    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(7, 4, 32, generator=gen) * 3).to(dtype).to(DEVICE)
    z = (torch.randn(7, 4, 32, generator=gen) * 2).to(dtype).to(DEVICE)
    w = (1 + torch.randn(32, generator=gen) * 0.2).to(weight_dtype).to(DEVICE)
    grad_out = torch.randn(7, 4, 32, generator=gen).to(dtype).to(DEVICE)
    results = []
    for fn in (gated_rms_norm_kernel, gated_rms_norm_reference):
        leaves = [t.clone().requires_grad_() for t in (x, z, w)]
        out = fn(*leaves, 1e-6)
        out.backward(grad_out)
        results.append((out.detach(), *(t.grad for t in leaves)))
    # bf16: three roundings, each up to one ulp apart under the interpreter's truncation
    tol = TOL[dtype] if dtype == torch.float32 else dict(rtol=3.2e-2, atol=1e-2)
    for got, ref in zip(*results):
        assert got.dtype == ref.dtype and got.shape == ref.shape
        torch.testing.assert_close(got, ref, **tol)
    with torch.no_grad():  # no autograd: the kernel alone, rows on their own
        full = gated_rms_norm_kernel(x, z, w, 1e-6)
        assert torch.equal(full[2:3], gated_rms_norm_kernel(x[2:3], z[2:3], w, 1e-6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_slices_of_a_wider_matrix_are_read_in_place_with_the_same_bits(dtype):
    """Without gradients the forward kernels read ``[T, H, D]`` heads of a column slice of a wider matrix (a joined
    projection's output) where they lie, no copy: the same bits as from contiguous rows, for both norms."""
    from league.ops.norm import gated_rms_norm_kernel
    from league.ops.norm import triton as triton_norm
    from league.ops.norm.triton import triton_rms_norm

    gen = torch.Generator().manual_seed(0)
    wide = torch.randn(7, 3 * 4 * 32 + 5, generator=gen).to(DEVICE, dtype)  # [T, q | k | z | 5 more]
    heads = [wide[:, i * 128 : (i + 1) * 128].view(7, 4, 32) for i in range(3)]
    w = (torch.randn(32, generator=gen) * 0.1).to(DEVICE, dtype)
    assert not heads[1].is_contiguous() and triton_norm._inference_rows(heads[1]).dim() == 3  # read in place
    with torch.no_grad():
        for x in heads:
            assert torch.equal(triton_rms_norm(x, w, 1e-6), triton_rms_norm(x.contiguous(), w, 1e-6))
        got = gated_rms_norm_kernel(heads[0], heads[2], w, 1e-6)
        assert torch.equal(got, gated_rms_norm_kernel(heads[0].contiguous(), heads[2].contiguous(), w, 1e-6))
        torch.testing.assert_close(got, gated_rms_norm_reference(heads[0], heads[2], w, 1e-6), **TOL[dtype])
        torch.testing.assert_close(
            triton_rms_norm(heads[1], w, 1e-6), rms_norm_reference(heads[1], w, 1e-6), **TOL[dtype]
        )
