"""``league generate`` and ``league serve`` with ``--nproc-per-node 2``: one engine laid out over two processes
(torchrun, gloo) answers exactly as one process does, the served one through its leading rank (``engine.lockstep``)
across weight updates and memory release."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from league.checkpoint.hf import load_model
from league.checkpoint.init import init_checkpoint
from league.cli import app
from league.engine.config import EngineConfig
from league.engine.engine import LLMEngine
from league.engine.request import SamplingParams
from tests.engine.servers import league_serve

EXACT = ["--numerics", "batch_invariant", "--device", "cpu", "--context-length", "64"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    return init_checkpoint("tiny", folder / "a", seed=0), init_checkpoint("tiny", folder / "b", seed=1)


def test_generate_over_two_processes_equals_one_process(checkpoints, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"input_ids": [5, 6, 7]}\n{"input_ids": [9, 10]}\n{"input_ids": [40, 2, 17, 3]}\n')
    args = ["generate", "--model", str(checkpoints[0]), "--input-file", str(prompts), "--max-new-tokens", "8"]
    args += ["--seed", "3", "--n", "2", "--json", *EXACT]
    one = CliRunner().invoke(app, args)
    assert one.exit_code == 0, one.output
    two = subprocess.run(
        [sys.executable, "-m", "league", *args, "--nproc-per-node", "2", "--tp-size", "2", "--ep-size", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr
    lines = [json.loads(line) for line in two.stdout.splitlines()]  # printed once, by rank 0
    assert len(lines) == 6 and lines == [json.loads(line) for line in one.stdout.splitlines()]


def test_serve_over_two_processes_answers_as_one_process(checkpoints):
    first, second = checkpoints
    args = ["--model", str(first), "--port", "0", *EXACT, "--nproc-per-node", "2", "--ep-size", "2", "--tp-size", "2"]
    with league_serve([*args, "--max-running-requests", "16"]) as (proc, client):
        assert "over 2 processes" in proc.start_line
        prompts = [[5 + i, 6, 7 + 2 * i][: 2 + i % 2] for i in range(8)]
        params = [
            SamplingParams(max_new_tokens=6, temperature=[0.0, 1.0][i % 2], seed=i, ignore_eos=True) for i in range(8)
        ]

        def expected(folder):
            config = EngineConfig(max_running_requests=16, context_length=64, numerics="batch_invariant")
            outs = LLMEngine(load_model(folder), config).generate(prompts, params)
            return [(o.output_ids, o.output_logprobs) for o in outs]

        def served():
            return [(o.output_ids, o.output_logprobs) for o in client.generate(prompts, params)]

        assert served() == expected(first)
        client.update_weights_from_disk(str(second))  # every rank reads its part of the other checkpoint
        assert served() == expected(second)
        # tensors handed to the leading rank reach the other's part too
        client.update_weights([(name, p.detach()) for name, p in load_model(first).named_parameters()])
        assert served() == expected(first)
        client._request("POST", "/release_memory_occupation", {})  # every rank's caches and weights
        client._request("POST", "/resume_memory_occupation", {})
        assert served() == expected(first)
    # a SIGTERM to torchrun reaches the ranks; the leading one stops the other. torchrun reports the signal with its
    # own traceback; no rank failed, and none is left
    lines = proc.output.splitlines()
    assert not [line for line in lines if line.strip().startswith("File") and "/league/" in line], proc.output
    assert not running(str(first))


def running(text: str) -> list[int]:
    """Processes whose command line holds ``text``."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def test_bench_over_two_processes(tmp_path):
    out = tmp_path / "bench.json"
    args = ["bench", "--preset", "tiny", "--num-layers", "2", "--batch", "2,3", "--prompt-len", "4", "--new-tokens"]
    args += ["6", "--device", "cpu", "--dtype", "float32", "--nproc-per-node", "2", "--ep-size", "2", "--out", str(out)]
    done = subprocess.run([sys.executable, "-m", "league", *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("batch") == 1  # one table, from rank 0
    record = json.loads(out.read_text())
    assert record["settings"]["ep_size"] == 2 and record["settings"]["tp_size"] == 1
    assert record["settings"]["processes"] == 2
    assert all(r["tokens_per_s"] > 0 for r in record["results"].values())
