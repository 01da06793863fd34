"""Linear layers, and two forms of them whose result for a row does not depend on the other rows.

A BLAS matmul may pick its kernel (and so its summation order) by the number of rows, so the same
row can round differently in a batch of 1 and a batch of 100. The batch-invariant form computes each
output row as an elementwise product summed over the input dim, 16 rows at a time, so a row's result
never depends on which rows share its batch: a token's logits are then bitwise the same in prefill,
decode, verify and training, on any device. Slower; meant for exact checks and small models.

The fixed-tiles form (decode parity's, ``ForwardBatch.decode_parity``) gets the same property on the GPU at
GEMM speed: a Triton GEMM with one tile configuration and no split of K (``triton_linear``), bf16/fp16 on
CUDA; gradients by ``torch.matmul``. Elsewhere it is ``F.linear``.

Legend: M rows, K input dim, N output dim.
"""

import torch
import torch.nn.functional as F

from league.ops.backends import installed

ROWS = 16
_FIXED_TILES_DTYPES = (torch.bfloat16, torch.float16)


def linear(
    x_MK: torch.Tensor, weight_NK: torch.Tensor, batch_invariant: bool = False, fixed_tiles: bool = False
) -> torch.Tensor:
    """``x @ weight^T`` over the last dim of ``x`` (any leading shape).

    Args:
        x_MK (torch.Tensor): ``[..., K]``.
        weight_NK (torch.Tensor): ``[N, K]``.
        batch_invariant (bool): use the row-independent reference form. Default: ``False``.
        fixed_tiles (bool): on CUDA in bf16/fp16, the fixed-tiles GEMM (see the module doc). Default: ``False``.
    """
    if fixed_tiles and not batch_invariant and fixed_tiles_fit(x_MK, weight_NK):
        return _FixedTilesLinear.apply(x_MK, weight_NK)
    if not batch_invariant:
        return F.linear(x_MK, weight_NK)
    lead = x_MK.shape[:-1]
    rows = x_MK.reshape(-1, x_MK.shape[-1])
    blocks = [(rows[s : s + ROWS, None, :] * weight_NK[None]).sum(-1) for s in range(0, rows.shape[0], ROWS)]
    out = torch.cat(blocks) if blocks else rows.new_zeros(0, weight_NK.shape[0])
    return out.reshape(*lead, weight_NK.shape[0])


def fixed_tiles_fit(x_MK: torch.Tensor, weight_NK: torch.Tensor) -> bool:
    """Whether :func:`linear` runs the fixed-tiles GEMM for these operands when asked to."""
    return x_MK.is_cuda and x_MK.dtype in _FIXED_TILES_DTYPES and weight_NK.dtype == x_MK.dtype and installed("triton")


class _FixedTilesLinear(torch.autograd.Function):
    """Values from the fixed-tiles GEMM, gradients from ``torch.matmul``."""

    @staticmethod
    def forward(ctx, x_MK, weight_NK):
        from league.ops.triton_linear import fixed_tiles_matmul

        ctx.save_for_backward(x_MK, weight_NK)
        rows = x_MK.reshape(-1, x_MK.shape[-1])
        out = fixed_tiles_matmul(rows if rows.stride(-1) == 1 else rows.contiguous(), weight_NK.contiguous())
        return out.view(*x_MK.shape[:-1], weight_NK.shape[0])

    @staticmethod
    def backward(ctx, grad_MN):
        x_MK, weight_NK = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_MN @ weight_NK
        if ctx.needs_input_grad[1]:
            grad_w = grad_MN.reshape(-1, grad_MN.shape[-1]).t() @ x_MK.reshape(-1, x_MK.shape[-1])
        return grad_x, grad_w
