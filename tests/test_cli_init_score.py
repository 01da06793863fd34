"""``league init`` and ``league score`` through the CLI: a tiny checkpoint, log-probs equal to a direct
log-softmax of the model's logits, and bad inputs (exit code 1, file:line in the message, no output file)."""

import json

import pytest
import torch
from typer.testing import CliRunner

from league.checkpoint.hf import load_model
from league.cli import app
from league.models.qwen3_5_moe import ForwardBatch
from league.ops.logprob import token_logprobs
from league.ops.numerics import BATCH_INVARIANT
from league.score import score_sequences

runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Tiny models on one thread: two intra-op threads on a busy 2-core machine are far slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "tiny"
    result = invoke("init", "--preset", "tiny", "--out", out, "--seed", "5")
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.stdout
    return out


def direct_logprobs(model, ids: list[int]) -> list[float]:
    tokens = torch.tensor(ids)
    with torch.no_grad():
        logits = model.logits(model(tokens, ForwardBatch.packed([len(ids)])))
    return torch.log_softmax(logits[:-1].double(), -1).gather(-1, tokens[1:, None])[:, 0].tolist()


def test_init_then_score(tiny_dir, tmp_path):
    seqs = [[1, 2, 3, 4, 5, 6, 7], list(range(80)) * 2, [9, 10], [42]]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps({"input_ids": s, "id": i}) for i, s in enumerate(seqs)) + "\n\n")
    out = tmp_path / "out.jsonl"
    result = invoke("score", "--model", tiny_dir, "--input", src, "--json", "--output", out)
    assert result.exit_code == 0, result.output
    printed = [json.loads(line) for line in result.stdout.splitlines()]
    assert printed == [json.loads(line) for line in out.read_text().splitlines()]
    model = load_model(tiny_dir).eval()
    for record, ids in zip(printed, seqs, strict=True):
        assert record.keys() == {"input_ids", "token_logprobs"} and record["input_ids"] == ids
        assert len(record["token_logprobs"]) == len(ids) - 1
        if len(ids) > 1:
            expected = torch.tensor(direct_logprobs(model, ids))
            assert (torch.tensor(record["token_logprobs"], dtype=torch.float64) - expected).abs().max() < 1e-5
    assert score_sequences(model, seqs) == [r["token_logprobs"] for r in printed]
    invariant = invoke("score", "--model", tiny_dir, "--input", src, "--json", "--batch-invariant")
    assert invariant.exit_code == 0, invariant.output
    for line, ids in zip(invariant.stdout.splitlines(), seqs):
        tokens = torch.tensor(ids)
        with torch.no_grad():
            hidden = model(tokens, ForwardBatch.packed([len(ids)], numerics=BATCH_INVARIANT))
            logits = model.logits(hidden, BATCH_INVARIANT)[:-1]
        assert json.loads(line)["token_logprobs"] == token_logprobs(logits, tokens[1:]).tolist()
    table = invoke("score", "--model", tiny_dir, "--input", src)
    assert table.exit_code == 0 and "mean log-prob" in table.stdout


def test_score_help_says_n_minus_one():
    result = invoke("score", "--help")
    assert result.exit_code == 0 and "n - 1 numbers" in " ".join(result.stdout.split())


@pytest.mark.parametrize(
    "content, where, message",
    [
        ("", "", "no sequences"),
        ("\n  \n", "", "no sequences"),
        ('{"input_ids": [1, 2]}\n{"input_ids": [1, 2\n', " line 2", "invalid JSON"),
        ('{"input_ids": [1]}\n{"ids": [1]}\n', " line 2", 'expected an object with "input_ids"'),
        ('{"input_ids": [1, 2.5]}\n', " line 1", "list of integers"),
        ('{"input_ids": []}\n', " line 1", "input_ids is empty"),
        ('{"input_ids": [1]}\n\n{"input_ids": [3, 128]}\n', " line 3", "token id 128 is outside the vocabulary"),
        ('{"input_ids": [-1]}\n', " line 1", "token id -1 is outside"),
    ],
    ids=["empty", "blank", "json", "missing", "float", "no-ids", "too-big", "negative"],
)
def test_bad_score_input(tiny_dir, tmp_path, content, where, message):
    src = tmp_path / "in.jsonl"
    src.write_text(content)
    out = tmp_path / "out.jsonl"
    result = invoke("score", "--model", tiny_dir, "--input", src, "--output", out, "--json")
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: {src}{where}: ") and message in result.stderr
    assert "Traceback" not in result.output and result.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_bad_model_folder_and_init_errors(tiny_dir, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"input_ids": [1, 2]}\n')
    result = invoke("score", "--model", tmp_path / "nope", "--input", src)
    assert result.exit_code == 1 and f"{tmp_path / 'nope' / 'config.json'}: no such file" in result.stderr
    result = invoke("init", "--preset", "tiny", "--out", tiny_dir)
    assert result.exit_code == 1 and "not empty" in result.stderr
    result = invoke("init", "--preset", "huge", "--out", tmp_path / "x")
    assert result.exit_code == 1 and "unknown preset 'huge'" in result.stderr
    assert not (tmp_path / "x").exists()


def test_init_options(tmp_path):
    out = tmp_path / "small"
    result = invoke("init", "--preset", "tiny", "--out", out, "--num-layers", "2", "--mtp-num-layers", "0")
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["layer_types"] == ["linear_attention", "linear_attention"] and config["mtp_num_hidden_layers"] == 0
    assert (out / "tokenizer.json").is_file()
    result = invoke("init", "--preset", "tiny", "--out", out, "--force", "--dtype", "bfloat16")
    assert result.exit_code == 0 and json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_init_seed_range_and_an_unwritable_out(tmp_path):
    result = invoke("init", "--preset", "tiny", "--out", tmp_path / "x", "--seed", "-1")
    assert result.exit_code == 1 and "`--seed` must be an integer in [0, 2**63 - 1], got -1" in result.stderr
    (tmp_path / "file").write_text("")
    result = invoke("init", "--preset", "tiny", "--out", tmp_path / "file" / "x")
    message = f"`--out` {tmp_path / 'file' / 'x'} is under {tmp_path / 'file'}, which is not a folder"
    assert result.exit_code == 1 and result.stderr == f"error: {message}\n"
