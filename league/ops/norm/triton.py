"""Triton kernels of the zero-centred RMSNorm ``x / rms(x) * (1 + w)`` (forward and backward), and the forward of
the GDN's gated norm ``w * (x / rms(x)) * silu(gate)``.

Compute what ``norm.rms_norm_reference`` and ``norm.gated_rms_norm_reference`` define: fp32 arithmetic inside,
rounded where the references round, the output in the input's dtype. The gated norm's backward recomputes the
reference under autograd (its values come from the kernel, so a trainer and an engine running it agree bitwise).
It does not choose when to run (``norm`` does).

Imported only when Triton is installed. Runs on CUDA, or on CPU tensors under ``TRITON_INTERPRET=1``. Launches read
no device value on the host, so they can be captured in CUDA graphs. Each row is reduced within one program in a
fixed order, so a row's output does not depend on the other rows of the batch. The weight's gradient is summed
per program, then over programs in fp32 (no atomics: deterministic).

Legend: M rows, D feature dim, P backward programs; inside the kernels BM rows of BD (D padded to a power of two).
"""

import torch
import triton
import triton.language as tl

_TILE = 4096  # elements per program tile: BM = max(1, _TILE // BD) rows
_BWD_PROGRAMS = 256  # programs of the backward, each summing the weight gradient of its rows


@triton.jit
def _row_offsets(rows, H, stride_t, stride_h):
    """Offsets of rows laid out as ``[T, H, D]`` with strides ``(stride_t, stride_h, 1)`` (``H`` = 1: plain
    ``[M, D]`` rows ``stride_t`` apart), row ``r`` being ``(r // H, r % H)``."""
    rows = rows.to(tl.int64)
    return (rows // H) * stride_t + (rows % H) * stride_h


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    rstd_ptr,
    M,
    D,
    H_x,
    stride_x,
    stride_xh,
    stride_y,
    eps,
    BM: tl.constexpr,
    BD: tl.constexpr,
):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.arange(0, BD)
    row_mask = rows < M
    mask = row_mask[:, None] & (cols < D)[None, :]
    x_rows = _row_offsets(rows, H_x, stride_x, stride_xh)
    x = tl.load(x_ptr + x_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) / D + eps)
    y = x * rstd[:, None] * (1.0 + w)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)


@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr,
    x_ptr,
    w_ptr,
    rstd_ptr,
    dx_ptr,
    dw_partial_ptr,
    M,
    D,
    stride_dy,
    stride_x,
    stride_dx,
    num_programs,
    tiles_per_program,
    BM: tl.constexpr,
    BD: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BD)
    col_mask = cols < D
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BD], dtype=tl.float32)
    # a while loop, not range(): the interpreter cannot turn a runtime scalar into a Python int
    i = 0
    while i < tiles_per_program:
        rows = (pid + i * num_programs) * BM + tl.arange(0, BM)
        row_mask = rows < M
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
        x_hat = x * rstd[:, None]
        u = dy * (1.0 + w)[None, :]
        # d/dx of x * rstd: rstd * (u - x_hat * mean(u * x_hat))
        dx = rstd[:, None] * (u - x_hat * (tl.sum(u * x_hat, axis=1) / D)[:, None])
        tl.store(dx_ptr + rows[:, None] * stride_dx + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * x_hat, axis=0)
        i += 1
    tl.store(dw_partial_ptr + pid * D + cols, dw, mask=col_mask)


@triton.jit
def _gated_rms_norm_fwd_kernel(
    x_ptr,
    z_ptr,
    w_ptr,
    y_ptr,
    M,
    D,
    H_x,
    stride_x,
    stride_xh,
    H_z,
    stride_z,
    stride_zh,
    stride_y,
    eps,
    BM: tl.constexpr,
    BD: tl.constexpr,
    ROUND_WY: tl.constexpr,
):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.arange(0, BD)
    mask = (rows < M)[:, None] & (cols < D)[None, :]
    x_rows = _row_offsets(rows, H_x, stride_x, stride_xh)
    z_rows = _row_offsets(rows, H_z, stride_z, stride_zh)
    x = tl.load(x_ptr + x_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + z_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) / D + eps)
    # rounded as the reference rounds: the normalised value to x's dtype, w * that to it when w has that dtype
    y = (x * rstd[:, None]).to(y_ptr.dtype.element_ty).to(tl.float32) * w[None, :]
    if ROUND_WY:
        y = y.to(y_ptr.dtype.element_ty).to(tl.float32)
    y = y * tl.math.div_rn(z, 1.0 + tl.exp(-z))
    tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


def _blocks(dim: int) -> tuple[int, int]:
    block_d = triton.next_power_of_2(dim)
    return max(1, _TILE // block_d), block_d


def _num_warps(tile: int) -> int:
    return 8 if tile >= 8192 else 4


def rms_norm_fwd(x_MD: torch.Tensor, weight_D: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y_MD, rstd_M)``: the normalised rows in the dtype of ``x_MD`` and fp32 ``1/rms``. ``x_MD`` is ``[M, D]``,
    or ``[T, H, D]`` (rows ``(t, h)``, e.g. heads of a projection's column slice) with a contiguous last dim;
    ``y_MD`` is ``[M, D]``, contiguous."""
    x, heads, stride_t, stride_h = _layout(x_MD)
    dim = x.shape[-1]
    num_rows = x.numel() // dim
    y_MD = torch.empty(num_rows, dim, dtype=x.dtype, device=x.device)
    rstd_M = torch.empty(num_rows, dtype=torch.float32, device=x.device)
    if num_rows == 0:
        return y_MD, rstd_M
    block_m, block_d = _blocks(dim)
    grid = (triton.cdiv(num_rows, block_m),)
    _rms_norm_fwd_kernel[grid](
        x,
        weight_D,
        y_MD,
        rstd_M,
        num_rows,
        dim,
        heads,
        stride_t,
        stride_h,
        y_MD.stride(0),
        eps,
        BM=block_m,
        BD=block_d,
        num_warps=_num_warps(block_m * block_d),
    )
    return y_MD, rstd_M


def rms_norm_bwd(
    dy_MD: torch.Tensor, x_MD: torch.Tensor, weight_D: torch.Tensor, rstd_M: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dx_MD, dw_D)`` in the dtypes of ``x_MD`` and ``weight_D`` (last dims contiguous)."""
    num_rows, dim = x_MD.shape
    dx_MD = torch.empty_like(x_MD, memory_format=torch.contiguous_format)
    block_m, block_d = _blocks(dim)
    num_tiles = triton.cdiv(num_rows, block_m)
    num_programs = max(1, min(_BWD_PROGRAMS, num_tiles))
    dw_partial_PD = torch.empty(num_programs, dim, dtype=torch.float32, device=x_MD.device)
    _rms_norm_bwd_kernel[(num_programs,)](
        dy_MD,
        x_MD,
        weight_D,
        rstd_M,
        dx_MD,
        dw_partial_PD,
        num_rows,
        dim,
        dy_MD.stride(0),
        x_MD.stride(0),
        dx_MD.stride(0),
        num_programs,
        triton.cdiv(num_tiles, num_programs),
        BM=block_m,
        BD=block_d,
        num_warps=_num_warps(block_m * block_d),
    )
    return dx_MD, dw_partial_PD.sum(0).to(weight_D.dtype)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight_D: torch.Tensor, eps: float) -> torch.Tensor:
        x_MD = _rows(x)
        y_MD, rstd_M = rms_norm_fwd(x_MD, weight_D.contiguous(), eps)
        ctx.save_for_backward(x_MD, weight_D, rstd_M)
        return y_MD.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x_MD, weight_D, rstd_M = ctx.saved_tensors
        dx_MD, dw_D = rms_norm_bwd(_rows(dy), x_MD, weight_D.contiguous(), rstd_M)
        return dx_MD.view(dy.shape), dw_D if ctx.needs_input_grad[1] else None, None


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``[M, D]`` view of ``x`` with a contiguous last dim (a copy only when it has none)."""
    x_MD = x.reshape(-1, x.shape[-1])
    return x_MD if x_MD.stride(-1) == 1 else x_MD.contiguous()


def _inference_rows(x: torch.Tensor) -> torch.Tensor:
    """``x``'s rows for the forward kernels without a copy where one can be avoided: ``[M, D]`` when its leading
    dims fold into one, else ``[T, H, D]`` (the last two dims of ``x`` as ``H, D``: heads of a column slice of a
    wider matrix), else a contiguous ``[M, D]`` copy."""
    if x.stride(-1) == 1:
        try:
            return x.view(-1, x.shape[-1])
        except RuntimeError:
            pass
        if x.dim() >= 3:
            try:
                return x.view(-1, x.shape[-2], x.shape[-1])
            except RuntimeError:
                pass
    return x.reshape(-1, x.shape[-1]).contiguous()


def _layout(x: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """``(x, H, stride_t, stride_h)`` of ``[M, D]`` (H = 1) or ``[T, H, D]`` rows, the last dim contiguous."""
    assert x.stride(-1) == 1 and x.dim() in (2, 3)
    if x.dim() == 2:
        return x, 1, x.stride(0), 0
    return x, x.shape[1], x.stride(0), x.stride(1)


def triton_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``norm.rms_norm_reference`` by the Triton kernels, differentiable in ``x`` and ``weight``.

    Args:
        x (torch.Tensor): ``[..., D]`` in fp32, bf16 or fp16.
        weight (torch.Tensor): ``[D]``.
        eps (float): added to the mean square.
    """
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _RMSNorm.apply(x, weight, eps)
    return rms_norm_fwd(_inference_rows(x), weight.contiguous(), eps)[0].view(x.shape)


def gated_rms_norm_fwd(x_MD: torch.Tensor, z_MD: torch.Tensor, weight_D: torch.Tensor, eps: float) -> torch.Tensor:
    """The gated norm of M rows of D, in the dtype of ``x_MD``, as a contiguous ``[M, D]``; ``x_MD`` and ``z_MD``
    each ``[M, D]`` or ``[T, H, D]`` (as :func:`rms_norm_fwd` takes), last dims contiguous."""
    x, heads_x, stride_x, stride_xh = _layout(x_MD)
    z, heads_z, stride_z, stride_zh = _layout(z_MD)
    dim = x.shape[-1]
    num_rows = x.numel() // dim
    assert z.numel() == x.numel() and z.shape[-1] == dim
    y_MD = torch.empty(num_rows, dim, dtype=x.dtype, device=x.device)
    if num_rows == 0:
        return y_MD
    block_m, block_d = _blocks(dim)
    _gated_rms_norm_fwd_kernel[(triton.cdiv(num_rows, block_m),)](
        x,
        z,
        weight_D,
        y_MD,
        num_rows,
        dim,
        heads_x,
        stride_x,
        stride_xh,
        heads_z,
        stride_z,
        stride_zh,
        y_MD.stride(0),
        eps,
        BM=block_m,
        BD=block_d,
        ROUND_WY=weight_D.dtype == x.dtype,
        num_warps=_num_warps(block_m * block_d),
    )
    return y_MD


def gated_rms_norm_forward(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``norm.gated_rms_norm_reference`` by the Triton kernel, forward only (``norm.gated_rms_norm_kernel`` adds the
    reference's gradients).

    Args:
        x, gate (torch.Tensor): ``[..., D]`` in fp32, bf16 or fp16, the same shape and dtype.
        weight (torch.Tensor): ``[D]``.
        eps (float): added to the mean square.
    """
    return gated_rms_norm_fwd(_inference_rows(x), _inference_rows(gate), weight.contiguous(), eps).view(x.shape)
