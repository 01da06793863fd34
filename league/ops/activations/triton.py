"""Triton kernels of the MoE block's elementwise tail: the shared expert's ``silu(gate) * up`` and the block's output
``routed + sigmoid(gate_logit) * shared``, one launch each instead of two and three.

Each rounds where torch's separate ops round (silu's output, sigmoid's output and the product to the tensors'
dtype before the next op), computing in fp32 between; the exponentials are Triton's, so a value may differ from
torch's in its last bit. Inputs may be column slices of wider tensors (the joined projections' outputs): rows
are strided, columns contiguous. They do not choose when to run (``activations`` does) and have no backward.

Imported only when Triton is installed. Runs on CUDA, or on CPU tensors under ``TRITON_INTERPRET=1``.

Legend: T rows, D columns; inside the kernels BD columns per program.
"""

import torch
import triton
import triton.language as tl

from league.ops.triton_rounding import round_to

_BLOCK_D = 1024


@triton.jit
def _silu_mul_kernel(gate_ptr, up_ptr, out_ptr, D, stride_gate, stride_up, stride_out, BD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    inside = cols < D
    gate = tl.load(gate_ptr + row * stride_gate + cols, mask=inside, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + row * stride_up + cols, mask=inside, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    act = round_to(tl.math.div_rn(gate, 1.0 + tl.exp(-gate)), dtype)
    tl.store(out_ptr + row * stride_out + cols, (act * up).to(dtype), mask=inside)


@triton.jit
def _add_gated_kernel(
    x_ptr, gate_ptr, y_ptr, out_ptr, D, stride_x, stride_gate, stride_y, stride_out, BD: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    inside = cols < D
    dtype = out_ptr.dtype.element_ty
    gate = tl.load(gate_ptr + row * stride_gate).to(tl.float32)
    scale = round_to(tl.math.div_rn(1.0, 1.0 + tl.exp(-gate)), dtype)
    x = tl.load(x_ptr + row * stride_x + cols, mask=inside, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + row * stride_y + cols, mask=inside, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (x + round_to(scale * y, dtype)).to(dtype), mask=inside)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``[T, D]`` rows with contiguous columns (a view where it can be)."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    return x.reshape(-1, x.shape[-1])


def silu_mul_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``, both ``[..., D]`` of one dtype; a new contiguous tensor."""
    gate_TD, up_TD = _rows(gate), _rows(up)
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    num_rows, dim = gate_TD.shape
    if out.numel():
        grid = (num_rows, triton.cdiv(dim, _BLOCK_D))
        _silu_mul_kernel[grid](
            gate_TD,
            up_TD,
            out,
            dim,
            gate_TD.stride(0),
            up_TD.stride(0),
            dim,
            BD=min(_BLOCK_D, triton.next_power_of_2(dim)),
        )
    return out


def add_gated_fwd(x: torch.Tensor, gate_logit: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x + sigmoid(gate_logit) * y``: x and y ``[..., D]``, gate_logit ``[..., 1]``, one dtype; a new tensor."""
    x_TD, y_TD, gate_T1 = _rows(x), _rows(y), gate_logit.reshape(-1, 1)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    num_rows, dim = x_TD.shape
    if out.numel():
        grid = (num_rows, triton.cdiv(dim, _BLOCK_D))
        _add_gated_kernel[grid](
            x_TD,
            gate_T1,
            y_TD,
            out,
            dim,
            x_TD.stride(0),
            gate_T1.stride(0),
            y_TD.stride(0),
            dim,
            BD=min(_BLOCK_D, triton.next_power_of_2(dim)),
        )
    return out
