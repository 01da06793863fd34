"""`league eval`: a saved checkpoint scores on an evaluation set exactly as the training run's evaluation did."""

import json

import pytest
from typer.testing import CliRunner

from league.cli import app
from league.config import apply_overrides
from league.evaluate import evaluate_policy
from league.recipes import get_recipe
from league.rl.loop import train
from league.rl.metrics import read_metrics
from tests.rl.test_loop import tiny_job


def test_eval_of_a_checkpoint_equals_the_runs_last_evaluation(tmp_path):
    """Greedy evaluation (the tiny recipe's) of the checkpoint saved after the last step (`--load`: the newest DCP
    checkpoint of the folder) reproduces the reward the run logged for that step; the warm-up makes the reward
    non-trivial."""
    job = tiny_job(
        tmp_path,
        "run",
        num_rollout=2,
        sft_warmup_steps=150,
        eval_interval=2,
        save=str(tmp_path / "ckpt"),
        save_interval=2,
    )
    logged = read_metrics(train(job))[-1]
    assert logged["eval/add/reward_mean"] > 0
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "--load",
            str(tmp_path / "ckpt"),
            "--eval-prompt-data",
            "add,builtin:add",
            "--run-dir",
            str(tmp_path / "eval"),
            "--reward-num-workers",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert metrics["eval/add/reward_mean"] == logged["eval/add/reward_mean"]
    assert metrics["eval/add/response_len_mean"] == logged["eval/add/response_len_mean"]
    assert "eval/add/reward_mean" in result.output


def test_eval_without_sets_is_refused(tmp_path):
    job = apply_overrides(get_recipe("tiny"), {"eval_prompt_data": [], "run_dir": str(tmp_path / "r")})
    with pytest.raises(ValueError, match="--eval-prompt-data"):
        evaluate_policy(job)


def test_eval_dry_run_makes_the_start_up_checks(tmp_path):
    args = ["eval", "--dry-run", "--run-dir", str(tmp_path / "r"), "--eval-prompt-data", "x,/nonexistent/x.jsonl"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and "/nonexistent/x.jsonl: no such file" in result.stderr
    assert not (tmp_path / "r").exists()
