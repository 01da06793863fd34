"""Linear layers, and two forms of them whose result for a row does not depend on the other rows.

A BLAS matmul may pick its kernel (and so its summation order) by the number of rows, so the same
row can round differently in a batch of 1 and a batch of 100. The batch-invariant form computes each
output row as an elementwise product summed over the input dim, 16 rows at a time, so a row's result
never depends on which rows share its batch: a token's logits are then bitwise the same in prefill,
decode, verify and training, on any device. Slower; meant for exact checks and small models.

The fixed-tiles form (decode parity's: ``Numerics.as_decode``) gets the same property on the GPU at
GEMM speed: a Triton GEMM with one tile configuration and no split of K (``ops.linear.triton``), bf16/fp16 on
CUDA; gradients by ``torch.matmul``. Elsewhere it is ``F.linear``.

Projections of one input (a mixer's input projections, the router and the shared expert's) run as one GEMM
when their weights lie end to end in one buffer (:func:`join_rows` puts them there, :func:`linear_joined` finds
them): a decode step makes ~250 small GEMMs, each paying a launch and a tail. Only without gradients (the
engine); a row's value is the same as from its own weight under the fixed-tiles GEMM, whose output columns do
not depend on the others.

Legend: M rows, K input dim, N output dim.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from league.ops.backends import use_kernel
from league.ops.numerics import FAST, Numerics

ROWS = 16
ROW_ALIGN = 8  # joined buffers are padded to a multiple of this many rows (see with_spare_rows)
_FIXED_TILES_DTYPES = (torch.bfloat16, torch.float16)


def linear(x_MK: torch.Tensor, weight_NK: torch.Tensor, numerics: Numerics = FAST) -> torch.Tensor:
    """``x @ weight^T`` over the last dim of ``x`` (any leading shape).

    Args:
        x_MK (torch.Tensor): ``[..., K]``.
        weight_NK (torch.Tensor): ``[N, K]``.
        numerics (Numerics): row by row: the row-independent reference form; as decode: on CUDA in bf16/fp16, the
            fixed-tiles GEMM (see the module doc). Default: ``FAST``.
    """
    if numerics.as_decode and fixed_tiles_fit(x_MK, weight_NK):
        return _FixedTilesLinear.apply(x_MK, weight_NK)
    if not numerics.row_by_row:
        return F.linear(x_MK, weight_NK)
    lead = x_MK.shape[:-1]
    rows = x_MK.reshape(-1, x_MK.shape[-1])
    blocks = [(rows[s : s + ROWS, None, :] * weight_NK[None]).sum(-1) for s in range(0, rows.shape[0], ROWS)]
    out = torch.cat(blocks) if blocks else rows.new_zeros(0, weight_NK.shape[0])
    return out.reshape(*lead, weight_NK.shape[0])


def linear_joined(x_MK: torch.Tensor, weights: Sequence[torch.Tensor], numerics: Numerics = FAST) -> list[torch.Tensor]:
    """``[linear(x_MK, w, numerics) for w in weights]``, as one GEMM over their joined matrix (the outputs are column
    slices of its result) when the weights lie end to end in one buffer (:func:`joined`) and no gradient is needed;
    one GEMM each otherwise."""
    needs_grad = torch.is_grad_enabled() and (x_MK.requires_grad or any(w.requires_grad for w in weights))
    whole = None if numerics.row_by_row or needs_grad else joined(weights)
    if whole is None:
        return [linear(x_MK, w, numerics) for w in weights]
    whole = with_spare_rows(whole)  # the rows join_rows added past the last weight, if any
    sizes = [w.shape[0] for w in weights]
    outs = linear(x_MK, whole, numerics).split([*sizes, whole.shape[0] - sum(sizes)], dim=-1)
    return list(outs[: len(weights)])


def with_spare_rows(whole_NK: torch.Tensor) -> torch.Tensor:
    """``whole`` grown to a multiple of :data:`ROW_ALIGN` rows where its storage holds the rows that follow it
    (as :func:`join_rows` leaves them); else ``whole`` itself. A GEMM whose output has an odd column count
    sends cuBLAS to a slow unaligned kernel (the shared expert's one-column gate made a group 1,281 columns)."""
    rows, dim = whole_NK.shape
    spare = -rows % ROW_ALIGN
    end = (whole_NK.storage_offset() + (rows + spare) * dim) * whole_NK.element_size()
    if spare == 0 or end > whole_NK.untyped_storage().nbytes():
        return whole_NK
    return whole_NK.as_strided((rows + spare, dim), (dim, 1))


def joined(weights: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The ``[sum N_i, K]`` matrix that ``weights`` (``[N_i, K]`` each, row-major, one dtype) form when they lie
    end to end in one storage, in order; ``None`` when they do not."""
    first = weights[0]
    if first.dim() != 2:
        return None
    dim = first.shape[1]
    storage, offset = first.untyped_storage().data_ptr(), first.storage_offset()
    for w in weights:
        if (
            w.dim() != 2
            or w.shape[1] != dim
            or w.stride() != (dim, 1)
            or w.dtype != first.dtype
            or w.untyped_storage().data_ptr() != storage
            or w.storage_offset() != offset
        ):
            return None
        offset += w.numel()
    return first.detach().as_strided((sum(w.shape[0] for w in weights), dim), (dim, 1))


@torch.no_grad()
def join_rows(weights: Sequence[torch.Tensor]) -> None:
    """Move ``weights`` (``[N_i, K]`` parameters of one dtype and device) into one new buffer, end to end in
    order and followed by zero rows up to a multiple of :data:`ROW_ALIGN`, each becoming a view of its rows with
    its values unchanged; in-place updates (weight sync, checkpoint loads, optimizer steps) keep them there, a
    parameter replaced by a new tensor leaves the group (and :func:`linear_joined` falls back to one GEMM each).
    Tensor subclasses (DTensor shards) are left apart."""
    if any(type(w.data) is not torch.Tensor for w in weights):  # noqa: E721 (DTensor shards and the like stay apart)
        return
    if joined(weights) is not None:  # already joined (a second engine on the same model)
        return
    rows = sum(w.shape[0] for w in weights)
    spare = weights[0].new_zeros(-rows % ROW_ALIGN, weights[0].shape[1])  # see with_spare_rows
    whole = torch.cat([*(w.detach() for w in weights), spare])
    start = 0
    for w in weights:
        w.data = whole[start : start + w.shape[0]]
        start += w.shape[0]


def fixed_tiles_fit(x_MK: torch.Tensor, weight_NK: torch.Tensor) -> bool:
    """Whether :func:`linear` runs the fixed-tiles GEMM for these operands when asked to."""
    return use_kernel(x_MK, None, _FIXED_TILES_DTYPES, op="linear (fixed tiles)") and weight_NK.dtype == x_MK.dtype


class _FixedTilesLinear(torch.autograd.Function):
    """Values from the fixed-tiles GEMM, gradients from ``torch.matmul``."""

    @staticmethod
    def forward(ctx, x_MK, weight_NK):
        from league.ops.linear.triton import fixed_tiles_matmul

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
