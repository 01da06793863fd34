"""The Triton kernels of the MoE block's elementwise tail (``silu(gate) * up`` and ``x + sigmoid(g) * y``) against
their torch references: by hand, on strided slices as the joined projections give them, and their gradients.

Runs on CUDA, or on CPU under ``TRITON_INTERPRET=1`` (``PYTHONPATH`` holding a Triton install); skipped otherwise.
"""

import importlib.util
import math
import os

import pytest
import torch

from league.ops import backends
from league.ops.activations import add_gated_reference, silu_mul_reference

HAS_TRITON = importlib.util.find_spec("triton") is not None
CAN_RUN_TRITON = HAS_TRITON and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = pytest.mark.skipif(not CAN_RUN_TRITON, reason="needs triton and CUDA or TRITON_INTERPRET=1")


def kernels():
    from league.ops.activations.triton import add_gated_fwd, silu_mul_fwd

    return silu_mul_fwd, add_gated_fwd


def test_by_hand():
    silu_mul_fwd, add_gated_fwd = kernels()
    gate = torch.tensor([[0.0, math.log(3.0)]], device=DEVICE)
    up = torch.tensor([[5.0, 2.0]], device=DEVICE)
    # silu(ln 3) = ln 3 * sigmoid(ln 3) = 0.75 ln 3
    torch.testing.assert_close(silu_mul_fwd(gate, up), torch.tensor([[0.0, 1.5 * math.log(3.0)]], device=DEVICE))
    x = torch.tensor([[1.0, -2.0]], device=DEVICE)
    y = torch.tensor([[4.0, 8.0]], device=DEVICE)
    out = add_gated_fwd(x, torch.tensor([[0.0]], device=DEVICE), y)  # sigmoid(0) = 1/2
    torch.testing.assert_close(out, torch.tensor([[3.0, 2.0]], device=DEVICE))


def close(out: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor | None = None) -> None:
    """fp32: rounding apart. bf16 on CUDA: at most two rounding steps apart (a result rounded from an input that
    rounded one step off), and nearly all bitwise equal; under the interpreter, which truncates to bf16 where CUDA
    rounds to nearest, a few steps (truncations compound). A step is relative to ``scale`` (the operands' size,
    where a sum may cancel; default the result's)."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        return
    diff = (out.float() - ref.float()).abs()
    steps = 2 if DEVICE == "cuda" else 4
    scale = ref.float().abs() if scale is None else scale.float()
    assert (diff <= steps * 2.0**-7 * scale).all()
    if DEVICE == "cuda" and out.numel():
        assert (diff == 0).float().mean().item() > 0.98


@pytest.mark.parametrize("num_rows,dim", [(37, 512), (5, 1500), (1, 7), (0, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_match_references_on_strided_slices(num_rows, dim, dtype):
    silu_mul_fwd, add_gated_fwd = kernels()
    gen = torch.Generator().manual_seed(num_rows + dim)
    # the joined projection's output: [router | gate | up | shared gate | padding] columns of one tensor
    joined = (torch.randn(num_rows, 3 + 2 * dim + 1 + 4, generator=gen) * 3).to(dtype).to(DEVICE)
    gate, up, gate_logit = joined[:, 3 : 3 + dim], joined[:, 3 + dim : 3 + 2 * dim], joined[:, 3 + 2 * dim :][:, :1]
    close(silu_mul_fwd(gate, up), silu_mul_reference(gate, up))
    x, y = (torch.randn(2, num_rows, dim, generator=gen) * 2).to(dtype).to(DEVICE).unbind(0)
    close(add_gated_fwd(x, gate_logit, y), add_gated_reference(x, gate_logit, y), x.abs() + y.abs())
    # a row does not depend on the others
    assert torch.equal(silu_mul_fwd(gate[:2], up[:2]), silu_mul_fwd(gate, up)[:2])


def test_three_dim_inputs_keep_their_shape():
    silu_mul_fwd, add_gated_fwd = kernels()
    gate, up, y, x = torch.randn(4, 2, 3, 10, device=DEVICE).unbind(0)
    assert silu_mul_fwd(gate, up).shape == (2, 3, 10)
    close(add_gated_fwd(x, gate[..., :1], y), add_gated_reference(x, gate[..., :1], y), x.abs() + y.abs())


def test_gradients_come_from_the_references():
    gen = torch.Generator().manual_seed(2)
    gate, up, x, y = (torch.randn(4, 6, 9, generator=gen)).to(DEVICE).unbind(0)
    gate_logit = torch.randn(6, 1, generator=gen).to(DEVICE)
    grad_out = torch.randn(6, 9, generator=gen).to(DEVICE)
    silu_mul_fwd, add_gated_fwd = kernels()
    cases = [
        (silu_mul_fwd, silu_mul_reference, (gate, up)),
        (add_gated_fwd, add_gated_reference, (x, gate_logit, y)),
    ]
    for kernel, reference, inputs in cases:
        grads = []
        for run in (lambda *a, k=kernel, r=reference: backends._KernelForward.apply(k, r, *a), reference):
            leaves = [t.clone().requires_grad_() for t in inputs]
            run(*leaves).backward(grad_out)
            grads.append([t.grad for t in leaves])
        for got, want in zip(*grads):
            torch.testing.assert_close(got, want, rtol=0, atol=0)  # the very reference, recomputed


if HAS_TRITON:
    import triton
    import triton.language as tl

    from league.ops.triton_rounding import round_to

    @triton.jit
    def _round_kernel(x_ptr, out_ptr, N: tl.constexpr, BF16: tl.constexpr):
        cols = tl.arange(0, N)
        x = tl.load(x_ptr + cols)
        tl.store(out_ptr + cols, round_to(x, tl.bfloat16 if BF16 else tl.float32))


def test_round_to_rounds_to_nearest_even_as_torch():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1024, generator=gen) * 100
    # exact ties between two bf16 values (the low 16 bits 0x8000), both parities, negative, infinities, zero
    ties = torch.tensor([1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, -(1.0 + 2.0**-8), float("inf"), -float("inf"), 0.0])
    x = torch.cat([x, ties, torch.zeros(1024 - ties.numel())]).to(DEVICE)
    for bf16, expected in ((True, x.bfloat16().float()), (False, x)):
        out = torch.empty_like(x)
        _round_kernel[(1,)](x, out, N=x.numel(), BF16=bf16)
        assert torch.equal(out, expected)
