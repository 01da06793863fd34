"""``league convert``: checkpoints between Hugging Face folders and DCP folders (``checkpoint.convert``), in one
process or by the ranks of a torchrun launch."""

from pathlib import Path
from typing import Annotated

import typer

from league.cli_output import stdout, user_errors

convert_app = typer.Typer(
    help="Convert checkpoints between Hugging Face folders and DCP (torch.distributed.checkpoint) folders, the format "
    "of league train's --save and --load. Streams tensor by tensor; runs in one process or under torchrun "
    "(`torchrun --nproc-per-node N -m league convert ...`), each rank converting a share.",
    no_args_is_help=True,
)
ReplaceSave = Annotated[bool, typer.Option("--force", help="Replace --save if it is not empty.")]


def _converting(run) -> Path:
    """``run(group)`` on one process, or by the ranks of a torchrun launch together (gloo: conversion is host work);
    prints where the result went (rank 0)."""
    from league.parallel.launch import distributed

    with distributed("cpu") as ranks:
        path = run(ranks.group)
        if ranks.main:
            stdout.print(f"wrote {path}")
    return path


@convert_app.command("hf-to-dcp")
def hf_to_dcp(
    hf_checkpoint: Annotated[
        Path,
        typer.Option(
            help="Hugging Face checkpoint folder: config.json and safetensors (one file or sharded; fused or "
            "per-expert experts; a multimodal checkpoint's vision tower is left out)."
        ),
    ],
    save: Annotated[Path, typer.Option(help="DCP folder to create; it must be absent or empty unless --force.")],
    mtp_num_layers: Annotated[
        int | None,
        typer.Option(min=0, help="0 leaves the MTP layer (mtp.*) out; otherwise it must be the checkpoint's."),
    ] = None,
    force: ReplaceSave = False,
) -> None:
    """Write a Hugging Face checkpoint as a DCP folder that `league train --load` starts from (at step 0, at any
    number of ranks): the weights under league's names, each in its stored dtype, with config.json and the tokenizer
    files copied alongside."""
    with user_errors():
        from league.checkpoint.convert import hf_to_dcp as run

        _converting(lambda group: run(hf_checkpoint, save, mtp_num_layers, force, group))


@convert_app.command("dcp-to-hf")
def dcp_to_hf(
    load: Annotated[
        Path,
        typer.Option(
            help="DCP folder (from `convert hf-to-dcp` or a `league train --save` checkpoint), or a folder of "
            "checkpoints whose `latest` file names one."
        ),
    ],
    save: Annotated[
        Path, typer.Option(help="Hugging Face folder to create; it must be absent or empty unless --force.")
    ],
    force: ReplaceSave = False,
    load_unsafe_pickle: Annotated[
        bool,
        typer.Option(
            "--load-unsafe-pickle",
            help="Read --load's .metadata (a pickle) without restriction, which runs any code it holds: only for a "
            "folder you trust. By default only DCP's metadata classes unpickle.",
        ),
    ] = False,
) -> None:
    """Write the policy of a DCP folder as a Hugging Face folder in the published naming (fused experts, mtp.*;
    sharded with an index above 5 GB), with the folder's config.json and tokenizer files: a folder transformers and
    league load."""
    with user_errors():
        from league.checkpoint.convert import dcp_to_hf as run

        _converting(lambda group: run(load, save, force, group, load_unsafe_pickle))
