"""Teacher-forced per-token log-probabilities of given token sequences (``league score``).

Each sequence runs through the trunk in its own forward; the log-probabilities come from
:func:`league.ops.logprob.token_logprobs` (fp32 log-softmax of the raw logits), the function the engine
and the trainer use, so the numbers agree with theirs. Not responsible for tokenization or sampling.

File format: JSON Lines in, one ``{"input_ids": [x0, ..., x_{n-1}]}`` per line (other keys are ignored,
blank lines skipped); JSON Lines out, one ``{"input_ids": [...], "token_logprobs": [lp(x1 | x0), ...,
lp(x_{n-1} | x0 .. x_{n-2})]}`` per input line, n - 1 numbers for n ids.
"""

import json
import os
from pathlib import Path

import torch

from league.models.qwen3_5_moe import ForwardBatch, Transformer
from league.ops.logprob import token_logprobs
from league.ops.numerics import FAST, Numerics
from league.records import read_records, token_ids

LOGIT_ROWS = 1024
"""Rows of logits materialised at once (a row is a vocabulary of fp32 numbers)."""


@torch.inference_mode()
def score_sequences(model: Transformer, sequences: list[list[int]], numerics: Numerics = FAST) -> list[list[float]]:
    """``log p(x_t | x_<t)`` for t = 1 .. n-1 of each sequence (n - 1 numbers; none for n <= 1).

    Args:
        model (Transformer): the model (its device and dtype are used as they are).
        sequences (list[list[int]]): token ids, each in ``[0, vocab_size)``.
        numerics (Numerics): how the forward computes (``ops.numerics``); batch invariant: bitwise equal to an
            engine run in that mode. Default: ``FAST``.
    """
    device, vocab = model.output_weight().device, model.args.vocab_size
    out = []
    for i, ids in enumerate(sequences):
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"sequence {i}: token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if len(ids) < 2:
            out.append([])
            continue
        tokens = torch.tensor(ids, dtype=torch.long, device=device)
        batch = ForwardBatch.training([len(ids)], device, numerics)
        hidden = model(tokens, batch)[:-1]
        targets = tokens[1:]
        scores = [
            token_logprobs(
                model.logits(hidden[start : start + LOGIT_ROWS], numerics), targets[start : start + LOGIT_ROWS]
            )
            for start in range(0, len(targets), LOGIT_ROWS)
        ]
        out.append(torch.cat(scores).tolist())
    return out


def read_sequences(path: str | Path, vocab_size: int) -> list[list[int]]:
    """The ``input_ids`` of each row of a JSON Lines (or Parquet) file.

    Raises:
        ValueError: naming the file and line for invalid JSON, a missing or malformed ``input_ids``, or ids
            outside ``[0, vocab_size)``; naming the file when it is missing or holds no sequence.
    """
    sequences = []
    for where, record in read_records(path, "--input"):
        if "input_ids" not in record:
            raise ValueError(f'{where}: expected an object with "input_ids" (a list of token ids)')
        sequences.append(token_ids(record["input_ids"], vocab_size, where))
    if not sequences:
        raise ValueError(f"{path}: no sequences (the file is empty)")
    return sequences


def score_file(
    model_dir: str | Path,
    input_path: str | Path,
    output_path: str | Path | None = None,
    device: str | None = None,
    dtype: str | None = None,
    numerics: str = "fast",
) -> list[dict]:
    """Score every line of ``input_path`` with the checkpoint in ``model_dir``.

    The input is checked before the model is loaded; the output file is written to a temporary name
    beside it and renamed at the end, so a failure leaves none.

    Args:
        model_dir (str | Path): a Hugging Face checkpoint folder.
        input_path (str | Path): JSON Lines of ``{"input_ids": [...]}``.
        output_path (str | Path, Optional): where to write the JSON Lines results. Default: nowhere.
        device (str, Optional): Default: ``cuda`` when available, else ``cpu``.
        dtype (str, Optional): parameter dtype. Default: bfloat16 on GPU, float32 on CPU.
        numerics (str): ``fast``, ``batch_invariant`` or ``decode_parity``, as the engine's setting. Default: ``fast``.

    Returns:
        one ``{"input_ids", "token_logprobs"}`` dict per sequence.
    """
    from league.checkpoint.hf import load_model, resolve_device_dtype
    from league.models.qwen3_5_moe import ModelArgs

    args = ModelArgs.from_dir(model_dir)
    sequences = read_sequences(input_path, args.vocab_size)
    device, dtype = resolve_device_dtype(device, dtype)
    model = load_model(model_dir, device=device, dtype=dtype).eval()
    results = [
        {"input_ids": ids, "token_logprobs": lps}
        for ids, lps in zip(sequences, score_sequences(model, sequences, Numerics(numerics)))
    ]
    if output_path is not None:
        write_jsonl(output_path, results)
    return results


def write_jsonl(path: str | Path, records: list[dict]) -> None:
    """Write records as JSON Lines, atomically (temporary file beside ``path``, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        with open(partial, "w", encoding="utf-8") as fh:
            for record in records:
                fh.write(json.dumps(record) + "\n")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
