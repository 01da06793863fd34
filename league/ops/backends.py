"""Which optional GPU packages are installed, and the dtypes the fp32-computing Triton kernels take. Not
responsible for choosing a kernel: each op decides."""

import functools
import importlib.util

import torch


@functools.cache
def installed(package: str) -> bool:
    """Whether ``package`` (``triton``, ``fla``) can be imported, without importing it."""
    return importlib.util.find_spec(package) is not None


# the float dtypes the Triton kernels that compute in fp32 accept (loads converted, results rounded back)
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
