"""Checks of option values: ranges of numbers, and output folders that must be writable. Each failure is a
``ValueError`` naming the option, what it must be and the value.

Not responsible for which options a config has or what they mean: each config's ``__post_init__`` (or the
start-up checks of a command) calls these with its own option names.
"""

import math
import tempfile
from pathlib import Path

SEED_MAX = 2**63 - 1
"""Largest seed: seeds travel in int64 tensors (the engine's sampling keys) and seed torch generators."""


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if high is None:
        return f"{'>' if low_open else '>='} {low}"
    if low is None:
        return f"{'<' if high_open else '<='} {high}"
    return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def _within(value: float, low: float | None, high: float | None, low_open: bool, high_open: bool) -> bool:
    above = low is None or (value > low if low_open else value >= low)
    below = high is None or (value < high if high_open else value <= high)
    return above and below


def check_number(
    name: str,
    value: float,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """``value`` must be a finite number (not a bool) within the bounds.

    Args:
        name (str): the option as the user wrote it, e.g. ``--lr``.
        value (float): its value.
        low (float, Optional): lower bound. Default: ``None`` (none).
        high (float, Optional): upper bound. Default: ``None`` (none).
        low_open (bool): exclude ``low`` itself. Default: ``False``.
        high_open (bool): exclude ``high`` itself. Default: ``False``.
    """
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not (number and _within(value, low, high, low_open, high_open)):
        bounds = "" if low is None and high is None else " " + _interval(low, high, low_open, high_open)
        raise ValueError(f"`{name}` must be a finite number{bounds}, got {value!r}")


def check_int(name: str, value: int, low: int, high: int | None = None) -> None:
    """``value`` must be an integer (not a bool) in ``[low, high]``; same ``name`` as :func:`check_number`."""
    if not (isinstance(value, int) and not isinstance(value, bool) and _within(value, low, high, False, False)):
        raise ValueError(f"`{name}` must be an integer {_interval(low, high, False, False)}, got {value!r}")


def check_seed(name: str, value: int) -> None:
    """``value`` must be a seed: an integer in ``[0, 2**63 - 1]``."""
    if not (isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= SEED_MAX):
        raise ValueError(f"`{name}` must be an integer in [0, 2**63 - 1], got {value!r}")


def check_top_k(name: str, value: int) -> None:
    """``value`` must be -1 (top-k off) or an integer >= 1."""
    if not (isinstance(value, int) and not isinstance(value, bool) and (value == -1 or value >= 1)):
        raise ValueError(f"`{name}` must be -1 (off) or an integer >= 1, got {value!r}")


def check_writable(flag: str, path: Path) -> None:
    """Raise a ``ValueError`` naming ``flag`` unless ``path`` is a folder this process can write in, or can be
    created as one. Writes and removes a probe file (permission bits alone do not tell, e.g. for root or a
    read-only mount)."""
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        what = "is not a folder" if existing == path else f"is under {existing}, which is not a folder"
        raise ValueError(f"`{flag}` {path} {what}")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise ValueError(f"`{flag}` {path}: cannot write in {existing} ({e.strerror or e})") from None
