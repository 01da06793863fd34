"""The flag set of every command, pinned: a flag added or lost shows here. Engine options reach `league serve`,
`league generate` and `league train` from EngineConfig's fields alike."""

import dataclasses

import pytest
import typer.main

from league.cli import app
from league.engine.config import EngineConfig

ENGINE = [f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(EngineConfig)]
ALIASES = ["--batch-invariant", "--decode-parity"]
PINNED = {
    "serve": [
        "--model",
        "--host",
        "--port",
        "--served-model-name",
        "--api-key",
        "--device",
        "--dtype",
        "--nproc-per-node",
        *ENGINE,
        *ALIASES,
    ],
    "generate": [
        "--model",
        "--prompt",
        "--input-ids",
        "--input-file",
        "--chat",
        "--max-new-tokens",
        "--temperature",
        "--top-p",
        "--top-k",
        "--min-p",
        "--seed",
        "--n",
        "--ignore-eos",
        "--device",
        "--dtype",
        "--json",
        "--nproc-per-node",
        *ENGINE,
        *ALIASES,
    ],
    "score": ["--model", "--input", "--json", "--output", "--device", "--dtype", "--numerics", *ALIASES],
    "bench": [
        "--model",
        "--preset",
        "--num-layers",
        "--mtp-num-layers",
        "--batch",
        "--prompt-len",
        "--new-tokens",
        "--temperature",
        "--speculative-num-steps",
        "--mamba-ssm-dtype",
        "--numerics",
        "--decode-parity",
        "--memory-bandwidth",
        "--device",
        "--dtype",
        "--out",
        "--tp-size",
        "--ep-size",
        "--nproc-per-node",
    ],
    "init": ["--preset", "--out", "--num-layers", "--mtp-num-layers", "--seed", "--dtype", "--force"],
    "reward": ["--label", "--rm-type", "--response", "--response-file", "--custom-rm-path", "--timeout"],
    "plot": ["--out"],
    "convert hf-to-dcp": ["--hf-checkpoint", "--save", "--mtp-num-layers", "--force"],
    "convert dcp-to-hf": ["--load", "--save", "--force", "--load-unsafe-pickle"],
}


def options(name: str) -> list[str]:
    """The options of ``name`` (a command, or ``group command``)."""
    command = typer.main.get_command(app)
    for part in name.split():
        command = command.commands[part]
    return [opt for p in command.params if p.param_type_name == "option" for opt in p.opts if opt.startswith("--")]


@pytest.mark.parametrize("name", sorted(PINNED))
def test_flag_sets_are_pinned(name):
    assert options(name) == PINNED[name]


def test_train_takes_every_engine_option_and_the_numerics_aliases():
    train = options("train")
    assert all(flag in train for flag in [*ENGINE, *ALIASES, "--recipe", "--mode", "--dry-run"])
    assert len(train) == len(set(train))
