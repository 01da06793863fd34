"""The RL loop end to end on the tiny preset: exact resume, the reference recipe's settings, bad input."""

import json

import pytest
from typer.testing import CliRunner

from league.cli import app
from league.config import apply_overrides
from league.recipes import get_recipe
from league.rl.loop import train
from league.rl.metrics import read_metrics

FAST = dict(
    num_rollout=4,
    rollout_batch_size=4,
    n_samples_per_prompt=4,
    global_batch_size=16,
    sft_warmup_steps=0,
    eval_interval=None,
    reward_num_workers=1,
    tensorboard=False,
    rollout_max_response_len=4,
)


def tiny_job(tmp_path, name, **overrides):
    return apply_overrides(get_recipe("tiny"), {**FAST, "run_dir": str(tmp_path / name), **overrides})


def comparable(record):
    return {k: v for k, v in record.items() if not k.startswith("perf/")}


def test_resume_gives_the_same_metrics(tmp_path):
    full = read_metrics(train(tiny_job(tmp_path, "full")))
    train(tiny_job(tmp_path, "first", num_rollout=2, save=str(tmp_path / "ckpt"), save_interval=2))
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "step_000002"
    resumed = read_metrics(train(tiny_job(tmp_path, "resumed", load=str(tmp_path / "ckpt"))))
    assert [r["step"] for r in resumed] == [2, 3]
    assert [comparable(r) for r in resumed] == [comparable(r) for r in full[2:]]


def test_the_run_shows_its_progress_from_the_start(tmp_path, capsys):
    """The first line says what is happening; the warm-up reports its steps and loss (as lines where the console is
    no terminal, as here), then a summary, before the step lines."""
    train(tiny_job(tmp_path, "shown", num_rollout=1, sft_warmup_steps=10, sft_warmup_batch_size=4))
    out = capsys.readouterr().out
    assert out.startswith("league train: recipe tiny")
    lines = [line for line in out.splitlines() if line.startswith("warm-up")]
    assert [line.split()[1] for line in lines] == [f"{i}/10" for i in range(1, 11)] + ["10"]
    assert "loss" in lines[0] and out.index("warm-up: 10 steps") < out.index("step 0")


def test_reference_recipe_settings_run_on_a_tiny_model(tmp_path):
    """The qwen3_6_35b_a3b_mtp algorithm settings, on the tiny preset and the built-in task."""
    ref = get_recipe("qwen3_6_35b_a3b_mtp")
    settings = {
        name: getattr(ref.algo, name)
        for name in (
            "eps_clip",
            "eps_clip_high",
            "use_kl_loss",
            "kl_loss_coef",
            "kl_loss_type",
            "entropy_coef",
            "enable_mtp_training",
            "mtp_loss_scaling_factor",
        )
    }
    settings.update(
        lr=ref.optim.lr,
        weight_decay=ref.optim.weight_decay,
        adam_beta2=ref.optim.adam_beta2,
        clip_grad=ref.optim.clip_grad,
        optimizer_cpu_offload=True,
        speculative_num_steps=2,
        recompute=True,
        max_tokens_per_gpu=64,
    )
    records = read_metrics(train(tiny_job(tmp_path, "ref", num_rollout=2, **settings)))
    assert len(records) == 2
    last = records[-1]
    assert last["train/lr"] == 1e-6 and last["train/kl_loss"] >= 0 and last["rollout/spec_accept_length"] >= 1
    assert last["train/train_rollout_logprob_abs_diff"] < 1e-5


def test_dry_run_prints_the_reference_recipe():
    result = CliRunner().invoke(app, ["train", "--recipe", "qwen3_6_35b_a3b_mtp", "--dry-run"])
    assert result.exit_code == 0
    config = json.loads(result.stdout)
    assert config["rollout"]["rollout_batch_size"] == 8 and config["rollout"]["n_samples_per_prompt"] == 2
    assert config["algo"]["eps_clip_high"] == 0.28 and config["optim"]["lr"] == 1e-6
    assert config["engine"]["speculative_num_draft_tokens"] == 3 and config["parallel"]["ep"] == 8


def test_modes_switch_the_sizes():
    assert get_recipe("qwen3_6_35b_a3b_mtp", "normal").rollout.rollout_max_response_len == 16384
    debug = get_recipe("qwen3_6_35b_a3b_mtp", "debug_minimal")
    assert debug.rollout.num_rollout == 64 and debug.rollout.rollout_max_response_len == 100


@pytest.mark.parametrize(
    "args, message",
    [
        (["--recipe", "nope"], "unknown recipe"),
        (["--prompt-data", "/nonexistent/data.jsonl"], "data.jsonl"),
        (["--ep", "8"], "parallel layout"),
        (["--eps-clip-c", "0.5"], "eps-clip-c"),
        (["--cuda-graph-bs", "1,x"], "cuda-graph-bs"),
    ],
)
def test_bad_input_is_one_clear_error(tmp_path, args, message):
    result = CliRunner().invoke(app, ["train", "--run-dir", str(tmp_path / "run"), *args])
    assert result.exit_code == 1
    assert message in result.output


def test_bad_dataset_rows_and_long_prompts(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"question": "1+1=", "label": "2"}) + "\n")
    bad_key = ["train", "--run-dir", str(tmp_path / "a"), "--prompt-data", str(data), "--sft-warmup-steps", "0"]
    result = CliRunner().invoke(app, bad_key)
    assert result.exit_code == 1 and "line 1" in result.output
    data.write_text("")
    result = CliRunner().invoke(app, bad_key)
    assert result.exit_code == 1 and "no rows" in result.output
    data.write_text(json.dumps({"prompt": "9" * 100, "label": "9"}) + "\n")
    result = CliRunner().invoke(
        app,
        [
            *bad_key,
            "--context-length",
            "32",
            "--num-rollout",
            "1",
            "--rollout-batch-size",
            "1",
            "--global-batch-size",
            "8",
            "--no-apply-chat-template",
        ],
    )
    assert result.exit_code == 1 and "context" in result.output


def test_custom_reward_that_raises_scores_zero(tmp_path):
    module = tmp_path / "my_reward.py"
    module.write_text("def reward(response, label, metadata):\n    raise RuntimeError('boom')\n")
    run_dir = train(tiny_job(tmp_path, "custom", num_rollout=1, custom_rm_path=f"{module}:reward"))
    [record] = read_metrics(run_dir)
    assert record["rollout/reward_mean"] == 0.0 and record["rollout/reward_failures"] == 16
