"""The ``league`` command line: a thin Typer shell over library functions.

One function per command: it parses its flags, calls one library function and prints the result. A user
error (``ValueError``) is printed as one red ``error: ...`` line with exit code 1, no traceback. Imports
of torch and the library happen inside the commands so that ``league --help`` starts quickly. Not
responsible for any logic: that lives in the function each command calls.
"""

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

app = typer.Typer(
    name="league",
    help="GRPO post-training for Qwen3.5 / Qwen3.6 MoE models (Gated DeltaNet + MoE + MTP), with its own engine.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
stdout = Console(highlight=False)
stderr = Console(stderr=True, highlight=False)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn a ``ValueError`` into one red ``error: ...`` line on stderr and exit code 1."""
    try:
        yield
    except ValueError as e:
        stderr.print(Text(f"error: {e}", style="red"), soft_wrap=True)
        raise typer.Exit(1) from None


@app.command()
def init(
    preset: Annotated[
        str,
        typer.Option(
            help="Architecture: 'tiny' (a small model for CPU, written with a tiny character tokenizer) or "
            "'qwen3.6-35b-a3b' (the published 35B-A3B architecture, about 71 GB in bfloat16)."
        ),
    ],
    out: Annotated[Path, typer.Option(help="Folder to create; it must be absent or empty unless --force.")],
    num_layers: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Decoder layers, repeating the preset's pattern (every 4th layer is full attention). "
            "Default: the preset's (tiny 4, qwen3.6-35b-a3b 40).",
        ),
    ] = None,
    mtp_num_layers: Annotated[
        int | None, typer.Option(min=0, help="Layers of the multi-token-prediction head; 0 for none. Default: 1.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random initialisation.")] = 0,
    dtype: Annotated[
        str | None,
        typer.Option(help="float32, bfloat16 or float16. Default: the preset's (tiny float32, 35B bfloat16)."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace --out if it is not empty.")] = False,
) -> None:
    """Write a randomly initialised checkpoint in Hugging Face format (config.json, safetensors, and for
    tiny a tokenizer), streaming tensor by tensor, so anything can be tried with no download."""
    with user_errors():
        from league.checkpoint.hf import init_checkpoint

        path = init_checkpoint(
            preset, out, num_layers=num_layers, mtp_num_layers=mtp_num_layers, seed=seed, dtype=dtype, force=force
        )
    stdout.print(f"wrote {path}")


@app.command()
def score(
    model: Annotated[Path, typer.Option(help="Hugging Face checkpoint folder (config.json and safetensors).")],
    input: Annotated[Path, typer.Option("--input", help='JSON Lines file, one {"input_ids": [x0, x1, ...]} per line.')],
    json_lines: Annotated[
        bool, typer.Option("--json", help="Print one JSON line per input line instead of a summary table.")
    ] = False,
    output: Annotated[
        Path | None, typer.Option(help="Also write the JSON lines to this file (written whole or not at all).")
    ] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda. Default: cuda when available.")] = None,
    dtype: Annotated[
        str | None, typer.Option(help="Parameter dtype. Default: bfloat16 on GPU, float32 on CPU.")
    ] = None,
    batch_invariant: Annotated[
        bool,
        typer.Option(
            "--batch-invariant",
            help="Row-independent numerics (slower): bitwise equal to an engine run with batch_invariant.",
        ),
    ] = False,
) -> None:
    """Teacher-forced per-token log-probabilities of given token sequences.

    For an input line {"input_ids": [x0, ..., x(n-1)]} the result is {"input_ids": [...],
    "token_logprobs": [log p(x1 | x0), ..., log p(x(n-1) | x0..x(n-2))]}: n - 1 numbers, none for the
    first token, from an fp32 log-softmax of the raw logits (the same function the engine and the trainer use).
    """
    with user_errors():
        from league.score import score_file

        results = score_file(model, input, output, device=device, dtype=dtype, batch_invariant=batch_invariant)
    if json_lines:
        for record in results:
            typer.echo(json.dumps(record))
        return
    table = Table("sequence", "tokens", "sum log-prob", "mean log-prob")
    for i, record in enumerate(results, start=1):
        lps = record["token_logprobs"]
        mean = f"{sum(lps) / len(lps):.4f}" if lps else "-"
        table.add_row(str(i), str(len(record["input_ids"])), f"{sum(lps):.4f}", mean)
    stdout.print(table)
    if output is not None:
        stdout.print(f"wrote {output}")
