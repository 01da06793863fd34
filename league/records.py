"""Record files, read one way for every command: JSON Lines (one object per line, blank lines skipped) and Parquet
(pyarrow, nested columns as dicts), each row with where it is (``"<file> line 3"``, ``"<file> row 3"``, 1-based)
for error messages; and token-id lists checked against a vocabulary.

Used by ``league train`` and ``league eval`` (``rl.data``: prompts and labels), ``league generate`` (prompts) and
``league score`` (sequences). Not responsible for what a row means: its caller picks the fields.
"""

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from league.engine.request import is_int_list


def read_records(path: str | Path, what: str = "records") -> Iterator[tuple[str, dict[str, Any]]]:
    """The rows of a JSON Lines file (any extension but ``.parquet``) or a Parquet file, each with where it is.

    Args:
        path (str | Path): the file.
        what (str): what the file holds, for error messages ("prompt data", ...). Default: ``records``.

    Raises:
        ValueError: naming the file (missing, not a file, unreadable Parquet) or the line (not UTF-8, invalid JSON,
            not an object).
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{what} {path}: no such file")
    if not path.is_file():
        raise ValueError(f"{what} {path}: not a file")
    if path.suffix == ".parquet":
        yield from _read_parquet(path, what)
    else:
        yield from _read_jsonl(path)


def _read_jsonl(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path} line {number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            yield where, row


def _read_parquet(path: Path, what: str) -> Iterator[tuple[str, dict[str, Any]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        number = 0
        for batch in pq.ParquetFile(path).iter_batches():
            for row in batch.to_pylist():
                number += 1
                yield f"{path} row {number}", row
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{what} {path}: not a readable Parquet file ({e})") from None


def token_ids(value: Any, vocab_size: int, where: str) -> list[int]:
    """``value`` as a prompt's token ids: a non-empty list of integers (not booleans) in ``[0, vocab_size)``."""
    if not isinstance(value, list) or not all(is_int_list([t], -(2**63)) for t in value):
        raise ValueError(f"{where}: input_ids must be a list of integers, got {value!r:.100}")
    if not value:
        raise ValueError(f"{where}: input_ids is empty")
    bad = [t for t in value if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"{where}: token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    return value
