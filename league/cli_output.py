"""What the command line prints: its output streams, and a user's error (bad input, a full disk, a missing file)
as one red ``error: ...`` line with exit code 1, no traceback."""

from collections.abc import Iterator
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.text import Text

stdout = Console(highlight=False)
stderr = Console(stderr=True, highlight=False)


def os_error_message(error: OSError) -> str:
    """``No space left on device: /path`` rather than ``[Errno 28] No space left on device: '/path'``."""
    paths = [str(p) for p in (error.filename, error.filename2) if p is not None]
    text = error.strerror or str(error)
    return f"{text}: {' -> '.join(paths)}" if paths else text


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn a ``ValueError`` or an ``OSError`` (a full disk, a permission, a missing file) into one red
    ``error: ...`` line on stderr and exit code 1."""
    try:
        yield
    except (ValueError, OSError) as e:
        message = os_error_message(e) if isinstance(e, OSError) else str(e)
        stderr.print(Text(f"error: {message}", style="red"), soft_wrap=True)
        raise typer.Exit(1) from None
