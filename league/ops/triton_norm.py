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
def _rms_norm_fwd_kernel(
    x_ptr, w_ptr, y_ptr, rstd_ptr, M, D, stride_x, stride_y, eps, BM: tl.constexpr, BD: tl.constexpr
):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.arange(0, BD)
    row_mask = rows < M
    mask = row_mask[:, None] & (cols < D)[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
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
    stride_x,
    stride_z,
    stride_y,
    eps,
    BM: tl.constexpr,
    BD: tl.constexpr,
    ROUND_WY: tl.constexpr,
):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.arange(0, BD)
    mask = (rows < M)[:, None] & (cols < D)[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + rows[:, None] * stride_z + cols[None, :], mask=mask, other=0.0).to(tl.float32)
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
    """``(y_MD, rstd_M)``: the normalised rows in the dtype of ``x_MD`` (last dim contiguous) and fp32 ``1/rms``."""
    num_rows, dim = x_MD.shape
    y_MD = torch.empty_like(x_MD, memory_format=torch.contiguous_format)
    rstd_M = torch.empty(num_rows, dtype=torch.float32, device=x_MD.device)
    if num_rows == 0:
        return y_MD, rstd_M
    block_m, block_d = _blocks(dim)
    grid = (triton.cdiv(num_rows, block_m),)
    _rms_norm_fwd_kernel[grid](
        x_MD,
        weight_D,
        y_MD,
        rstd_M,
        num_rows,
        dim,
        x_MD.stride(0),
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


def triton_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``norm.rms_norm_reference`` by the Triton kernels, differentiable in ``x`` and ``weight``.

    Args:
        x (torch.Tensor): ``[..., D]`` in fp32, bf16 or fp16.
        weight (torch.Tensor): ``[D]``.
        eps (float): added to the mean square.
    """
    return _RMSNorm.apply(x, weight, eps)


def gated_rms_norm_fwd(x_MD: torch.Tensor, z_MD: torch.Tensor, weight_D: torch.Tensor, eps: float) -> torch.Tensor:
    """The gated norm of ``[M, D]`` rows (last dims contiguous), in the dtype of ``x_MD``."""
    num_rows, dim = x_MD.shape
    y_MD = torch.empty_like(x_MD, memory_format=torch.contiguous_format)
    if num_rows == 0:
        return y_MD
    block_m, block_d = _blocks(dim)
    _gated_rms_norm_fwd_kernel[(triton.cdiv(num_rows, block_m),)](
        x_MD,
        z_MD,
        weight_D,
        y_MD,
        num_rows,
        dim,
        x_MD.stride(0),
        z_MD.stride(0),
        y_MD.stride(0),
        eps,
        BM=block_m,
        BD=block_d,
        ROUND_WY=weight_D.dtype == x_MD.dtype,
        num_warps=_num_warps(block_m * block_d),
    )
    return y_MD


class _GatedRMSNorm(torch.autograd.Function):
    """Forward by the kernel; backward by recomputing the torch reference under autograd."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, gate: torch.Tensor, weight_D: torch.Tensor, eps: float) -> torch.Tensor:
        ctx.save_for_backward(x, gate, weight_D)
        ctx.eps = eps
        return gated_rms_norm_fwd(_rows(x), _rows(gate), weight_D.contiguous(), eps).view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        from league.ops.norm import gated_rms_norm_reference

        needs = ctx.needs_input_grad[:3]
        inputs = [t.detach().requires_grad_(need) for t, need in zip(ctx.saved_tensors, needs)]
        with torch.enable_grad():
            y = gated_rms_norm_reference(*inputs, ctx.eps)
        wanted = [t for t in inputs if t.requires_grad]
        grads = iter(torch.autograd.grad(y, wanted, dy))
        return (*(next(grads) if need else None for need in needs), None)


def triton_gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``norm.gated_rms_norm_reference`` by the Triton kernel, differentiable (gradients by the reference).

    Args:
        x, gate (torch.Tensor): ``[..., D]`` in fp32, bf16 or fp16, the same shape and dtype.
        weight (torch.Tensor): ``[D]``.
        eps (float): added to the mean square.
    """
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, gate, weight)):
        return _GatedRMSNorm.apply(x, gate, weight, eps)
    return gated_rms_norm_fwd(_rows(x), _rows(gate), weight.contiguous(), eps).view(x.shape)
