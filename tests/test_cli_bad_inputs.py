"""Bad command lines, one per row of docs/robustness.md's second table: each is one ``error: ...`` line on stderr
naming the option and the fix, exit code 1, no traceback, nothing left behind. The doc's table is these answers
exactly (``TMP`` standing for the test's folder); regenerate with ``python -m tests.test_cli_bad_inputs --write``.
"""

import sys
import tempfile
import warnings
from pathlib import Path

import torch
from typer.testing import CliRunner

from league.cli import app

DOC = Path(__file__).resolve().parents[1] / "docs" / "robustness.md"
BEGIN, END = "<!-- cli-bad-inputs:begin -->", "<!-- cli-bad-inputs:end -->"
TRAIN = ["train", "--dry-run", "--run-dir", "TMP/run"]
GENERATE = ["generate", "--model", "TMP/tiny", "--max-new-tokens", "2"]
CONVERT = ["convert", "hf-to-dcp"]

# (command line, a piece of the error); TMP is the test's folder (TMP/tiny: a tiny checkpoint, TMP/file: a file)
CASES = [
    (["init", "--preset", "huge", "--out", "TMP/x"], "preset"),
    (["init", "--preset", "tiny", "--out", "TMP/x", "--dtype", "int8"], "int8"),
    (["init", "--preset", "tiny", "--out", "TMP/x", "--seed", "-1"], "--seed"),
    (["init", "--preset", "tiny", "--out", "TMP/file/x"], "TMP/file"),
    (["init", "--preset", "tiny", "--out", "TMP/tiny"], "--force"),
    ([*GENERATE, "--input-ids", "1,2,99999"], "outside"),
    ([*GENERATE, "--input-ids", "1,x"], "comma-separated"),
    ([*GENERATE, "--prompt", "a", "--input-ids", "1"], "exactly one"),
    ([*GENERATE, "--input-file", "/nonexistent.jsonl"], "no such file"),
    ([*GENERATE, "--input-ids", "1", "--top-p", "0"], "top_p"),
    ([*GENERATE, "--input-ids", "1", "--seed", str(2**63)], "--seed"),
    ([*GENERATE, "--input-ids", "1", "--seed", str(2**63 - 1), "--n", "2"], "2**63 - 1"),
    ([*GENERATE, "--input-ids", "1", "--speculative-algorithm", "MEDUSA"], "speculative_algorithm"),
    (["generate", "--model", "/nonexistent", "--input-ids", "1"], "/nonexistent"),
    (["score", "--model", "TMP/tiny", "--input", "/nonexistent.jsonl"], "no such file"),
    (["score", "--model", "TMP/tiny", "--input", "TMP/file"], "TMP/file line 1"),
    (["serve", "--model", "TMP/tiny", "--host", "999.1.1.1"], "--host"),
    (["serve", "--model", "/nonexistent"], "/nonexistent"),
    (["serve", "--model", "TMP/tiny", "--mamba-ssm-dtype", "fp8"], "mamba_ssm_dtype"),
    (["bench", "--preset", "tiny", "--batch", "x"], "--batch"),
    (["bench", "--preset", "tiny", "--memory-bandwidth", "nan"], "--memory-bandwidth"),
    (["bench", "--preset", "tiny", "--model", "TMP/tiny"], "--model"),
    (["reward", "--rm-type", "nope", "--label", "1", "--response", "1"], "nope"),
    (["reward", "--label", "1"], "--response"),
    (["plot", "/nonexistent"], "/nonexistent"),
    ([*TRAIN, "--tp", "3"], "start a multiple of 3 processes"),
    ([*TRAIN, "--pp", "2", "--tp", "2", "--nproc-per-node", "4"], "not available in this version"),
    ([*TRAIN, "--pp", "8", "--nproc-per-node", "8"], "exceeds the policy's 4 decoder layers"),
    ([*TRAIN, "--tp", "4", "--nproc-per-node", "4"], "does not divide the model's 2 GDN key heads"),
    ([*TRAIN, "--nproc-per-node", "3"], "does not split over 3 data-parallel ranks"),
    ([*TRAIN, "--nproc-per-node", "2", "--rollout-engine", "http://x:1"], "`--rollout-engine` with 2 ranks"),
    ([*TRAIN, "--nproc-per-node", "0"], "--nproc-per-node"),
    ([*TRAIN, "--recipe", "nope"], "nope"),
    ([*TRAIN, "--mode", "fast"], "fast"),
    ([*TRAIN, "--rollout-batch-size", "3", "--n-samples-per-prompt", "3"], "--global-batch-size"),
    ([*TRAIN, "--n-samples-per-prompt", "200"], "--n-samples-per-prompt"),
    ([*TRAIN, "--hf-checkpoint", "/nonexistent/model"], "no such folder"),
    ([*TRAIN, "--load", "/nonexistent/ckpt"], "--load"),
    ([*TRAIN, "--load", "TMP/tiny"], "league convert hf-to-dcp"),
    ([*TRAIN, "--prompt-data", "builtin:nope"], "unknown built-in task"),
    ([*TRAIN, "--prompt-data", "TMP/data.csv"], "extension"),
    ([*TRAIN, "--eval-prompt-data", "x,/nonexistent/x.jsonl"], "no such file"),
    ([*TRAIN, "--eval-prompt-data", "x"], "NAME PATH pairs"),
    ([*TRAIN, "--custom-rm-path", "/nonexistent/r.py:f"], "r.py"),
    ([*TRAIN, "--mtp-num-layers", "3"], "does not match"),
    ([*TRAIN, "--seed", "100000000000000000000"], "--seed"),
    ([*TRAIN, "--lr", "nan"], "--lr"),
    ([*TRAIN, "--lr", "-0.1"], "--lr"),
    ([*TRAIN, "--rollout-top-p", "1.5"], "--rollout-top-p"),
    ([*TRAIN, "--rollout-temperature", "0"], "--rollout-temperature"),
    ([*TRAIN, "--rollout-top-k", "0"], "--rollout-top-k"),
    ([*TRAIN, "--eps-clip-c", "0.5"], "--eps-clip-c"),
    ([*TRAIN, "--adam-beta2", "1"], "--adam-beta2"),
    ([*TRAIN, "--num-rollout", "-1"], "--num-rollout"),
    ([*TRAIN, "--kl-loss-type", "k9"], "k9"),
    ([*TRAIN, "--rm-type", "nope"], "nope"),
    ([*TRAIN, "--speculative-num-steps", "0"], "speculative_num_steps"),
    ([*TRAIN, "--batch-invariant", "--decode-parity"], "choose one"),
    ([*TRAIN, "--keep-last", "2"], "--save"),
    ([*TRAIN, "--save-interval", "5"], "--save"),
    ([*TRAIN, "--load-unsafe-pickle"], "--load"),
    ([*TRAIN, "--save", "TMP/file/ckpt"], "--save"),
    ([*TRAIN, "--sft-warmup-steps", "5", "--prompt-data", "TMP/data.jsonl"], "built-in task"),
    (["train", "--dry-run", "--run-dir", "TMP/file/run"], "--run-dir"),
    (["eval", "--dry-run", "--run-dir", "TMP/run", "--eval-prompt-data", "x,/nonexistent.jsonl"], "no such file"),
    ([*CONVERT, "--hf-checkpoint", "/nonexistent", "--save", "TMP/dcp"], "`--hf-checkpoint` /nonexistent"),
    ([*CONVERT, "--hf-checkpoint", "TMP/file", "--save", "TMP/dcp"], "`--hf-checkpoint` TMP/file"),
    ([*CONVERT, "--hf-checkpoint", "TMP/tiny", "--save", "TMP/file/dcp"], "`--save` TMP/file/dcp"),
    ([*CONVERT, "--hf-checkpoint", "TMP/tiny", "--save", "TMP/tiny"], "--force"),
    ([*CONVERT, "--hf-checkpoint", "TMP/tiny", "--save", "TMP/dcp", "--mtp-num-layers", "2"], "give 0"),
    (["convert", "dcp-to-hf", "--load", "/nonexistent", "--save", "TMP/hf"], "`--load` /nonexistent"),
    (["convert", "dcp-to-hf", "--load", "TMP/tiny", "--save", "TMP/hf"], "league convert hf-to-dcp"),
    ([*TRAIN, "--etp", "128", "--nproc-per-node", "128"], "moe_intermediate_size 64"),
]


def prepare(root: Path) -> None:
    result = CliRunner().invoke(app, ["init", "--preset", "tiny", "--out", str(root / "tiny")])
    assert result.exit_code == 0, result.output
    (root / "file").write_text("not json\n")
    (root / "data.csv").write_text("prompt,label\n")
    (root / "data.jsonl").write_text('{"prompt": "1+1=", "label": "2"}\n')


def answer(root: Path, args: list[str]) -> tuple[int, str]:
    """Exit code and stderr (warnings, which pytest would capture anyway, kept out)."""
    with warnings.catch_warnings(record=True):
        result = CliRunner().invoke(app, [a.replace("TMP", str(root)) for a in args])
    return result.exit_code, result.stderr.replace(str(root), "TMP")


def table(answers: list[tuple[list[str], int, str]]) -> str:
    def cell(text: str) -> str:
        text = " ".join(text.split())
        text = text if len(text) <= 200 else text[:197] + "..."
        return text.replace("|", "\\|")

    rows = ["| # | command line | exit | stderr |", "| --- | --- | --- | --- |"]
    for i, (args, code, err) in enumerate(answers, start=1):
        rows.append(f"| {i} | `league {cell(' '.join(args))}` | {code} | {cell(err)} |")
    return "\n".join(rows)


def run_all(root: Path) -> list[tuple[list[str], int, str]]:
    prepare(root)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return [(args, *answer(root, args)) for args, _ in CASES]
    finally:
        torch.set_num_threads(previous)


def test_bad_command_lines_are_one_error_line(tmp_path):
    answers = run_all(tmp_path)
    for (args, words), (_, code, err) in zip(CASES, answers):
        assert code == 1 and err.startswith("error: ") and words in err, (args, code, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, (args, err)
    assert not (tmp_path / "run").exists() and not (tmp_path / "x").exists()
    text = DOC.read_text()
    documented = text[text.index(BEGIN) + len(BEGIN) : text.index(END)].strip()
    assert documented == table(answers), f"regenerate: {sys.executable} -m tests.test_cli_bad_inputs --write"


def write_doc() -> None:
    with tempfile.TemporaryDirectory() as folder:
        rendered = table(run_all(Path(folder)))
    text = DOC.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    DOC.write_text(text[:start] + "\n" + rendered + "\n" + text[end:])
    print(f"wrote {DOC}: {len(CASES)} cases")


if __name__ == "__main__" and "--write" in sys.argv:
    write_doc()
