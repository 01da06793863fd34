"""What the fast paths of the ops share: which optional GPU packages are installed, the dtypes the fp32-computing
Triton kernels take, and :func:`by_kernel`, the one way a kernel's forward is paired with its reference's gradient.
Not responsible for the kernels themselves (each op's ``triton_*`` module) nor for an op's own conditions.
"""

import functools
import importlib.util
import warnings
from collections.abc import Callable

import torch

from league.ops.numerics import Numerics


@functools.cache
def installed(package: str) -> bool:
    """Whether ``package`` (``triton``, ``fla``) can be imported, without importing it."""
    return importlib.util.find_spec(package) is not None


# the float dtypes the Triton kernels that compute in fp32 accept (loads converted, results rounded back)
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def use_kernel(
    x: torch.Tensor,
    numerics: Numerics | None = None,
    dtypes: tuple[torch.dtype, ...] | None = KERNEL_DTYPES,
    package: str | None = "triton",
    op: str = "",
) -> bool:
    """Whether an op's fast form (a Triton or fla kernel, a fused torch kernel) runs for ``x``: the one predicate every
    op dispatcher asks (beside the conditions of its own kernel: shapes, the other operands' dtypes).

    Args:
        x (torch.Tensor): the op's main input.
        numerics (Numerics, Optional): the forward's numerics; row-by-row numerics run the references. None: the fast
            form is row-independent itself and runs whatever the numerics. Default: ``None``.
        dtypes (tuple[torch.dtype, ...], Optional): the dtypes the fast form takes; None: any. Default:
            :data:`KERNEL_DTYPES`.
        package (str, Optional): what it needs installed (``triton``, or ``fla`` with triton); None: nothing. Without it
            a warning naming ``op`` says that the reference runs instead. Default: ``triton``.
        op (str): the op's name, for that warning. Default: "".
    """
    if not x.is_cuda or (dtypes is not None and x.dtype not in dtypes):
        return False
    if numerics is not None and numerics.row_by_row:
        return False
    if package is None or (installed("triton") and installed(package)):
        return True
    warnings.warn(f"{op or 'an op'}: {package} is not installed; running its reference PyTorch form", stacklevel=3)
    return False


def by_kernel(kernel: Callable, reference: Callable, *inputs: torch.Tensor):
    """``kernel(*inputs)``; when gradients are asked for, differentiated by recomputing ``reference(*inputs)`` under
    autograd in the backward (a forward-only kernel with the reference's exact gradients). Both take the same tensor
    arguments (bind the rest with a closure) and return a tensor or a tuple of tensors; outputs that are not floating
    point are not differentiable."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return _KernelForward.apply(kernel, reference, *inputs)
    return kernel(*inputs)


class _KernelForward(torch.autograd.Function):
    """Values from a kernel, gradients from recomputing its torch reference under autograd."""

    @staticmethod
    def forward(ctx, kernel: Callable, reference: Callable, *inputs: torch.Tensor):
        ctx.reference = reference
        ctx.save_for_backward(*inputs)
        outputs = kernel(*inputs)
        ctx.mark_non_differentiable(
            *(t for t in (outputs if isinstance(outputs, tuple) else (outputs,)) if not t.is_floating_point())
        )
        return outputs

    @staticmethod
    def backward(ctx, *grad_outputs: torch.Tensor):
        needs = ctx.needs_input_grad[2:]
        inputs = [x.detach().requires_grad_(need) for x, need in zip(ctx.saved_tensors, needs)]
        with torch.enable_grad():
            outputs = ctx.reference(*inputs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if g is not None and o.requires_grad]
        wanted = [x for x in inputs if x.requires_grad]
        grads = iter(
            torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)
            if wanted and pairs
            else [None] * len(wanted)
        )
        return None, None, *(next(grads) if need else None for need in needs)
