"""Which optional GPU packages are installed. Not responsible for choosing a kernel: each op decides."""

import functools
import importlib.util


@functools.cache
def installed(package: str) -> bool:
    """Whether ``package`` (``triton``, ``fla``) can be imported, without importing it."""
    return importlib.util.find_spec(package) is not None
