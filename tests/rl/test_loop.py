"""The RL loop end to end on the tiny preset: exact resume, the reference recipe's settings, bad input."""

import errno
import json
import os
import pickle

import pytest
import torch
from typer.testing import CliRunner

from league.checkpoint.convert import hf_to_dcp
from league.cli import app
from league.config import apply_overrides
from league.recipes import get_recipe
from league.rl import checkpoints, setup
from league.rl.loop import train
from league.rl.metrics import read_metrics
from tests.checkpoint.test_convert import RunsCode

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
    train(tiny_job(tmp_path, "first", num_rollout=2, save=str(tmp_path / "ckpt")))  # --save alone: at the end
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["latest", "step_000002"]
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "step_000002"
    saved = {p.name for p in (tmp_path / "ckpt" / "step_000002").iterdir()}
    assert {".metadata", "__0_0.distcp", "train_state.json", "config.json", "tokenizer.json"} <= saved
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
    # the config, then the error the real run gives: EP8 needs several processes
    assert result.exit_code == 1 and "start a multiple of 8 processes" in result.stderr
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
        (["--ep", "8"], "start a multiple of 8 processes"),
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


def test_a_converted_checkpoint_starts_at_step_0_from_its_weights(tmp_path):
    """`--load` of a `league convert hf-to-dcp` folder (weights, config and tokenizer; no train state) runs as
    `--hf-checkpoint` of the Hugging Face folder does, from step 0."""
    assert (
        CliRunner().invoke(app, ["init", "--preset", "tiny", "--out", str(tmp_path / "hf"), "--seed", "3"]).exit_code
        == 0
    )
    hf_to_dcp(tmp_path / "hf", tmp_path / "dcp")
    loaded = read_metrics(train(tiny_job(tmp_path, "loaded", num_rollout=2, load=str(tmp_path / "dcp"))))
    direct = read_metrics(train(tiny_job(tmp_path, "direct", num_rollout=2, hf_checkpoint=str(tmp_path / "hf"))))
    assert [r["step"] for r in loaded] == [0, 1]
    assert [comparable(r) for r in loaded] == [comparable(r) for r in direct]


def test_load_refuses_metadata_that_runs_code(tmp_path):
    """DCP's .metadata is a pickle: `--load` unpickles DCP's metadata classes only, unless --load-unsafe-pickle."""
    assert CliRunner().invoke(app, ["init", "--preset", "tiny", "--out", str(tmp_path / "hf")]).exit_code == 0
    hf_to_dcp(tmp_path / "hf", tmp_path / "dcp")
    marker = tmp_path / "ran"
    (tmp_path / "dcp" / ".metadata").write_bytes(pickle.dumps(RunsCode(str(marker))))
    args = ["train", "--num-rollout", "1", "--run-dir", str(tmp_path / "run"), "--load", str(tmp_path / "dcp")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and "refused to unpickle (posix.mkdir" in result.stderr, result.output
    assert "pass --load-unsafe-pickle" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not marker.exists() and not (tmp_path / "run").exists()
    result = CliRunner().invoke(app, [*args, "--load-unsafe-pickle"])  # the flag trusts the file, and runs its code
    assert result.exit_code == 1 and "not DCP metadata" in result.stderr and marker.is_dir()


def test_save_interval_saves_after_the_last_step_too_and_keep_last_prunes(tmp_path):
    # every 2 steps and after the last: steps 2 and 3, of which the newest is kept
    small = dict(rollout_batch_size=2, n_samples_per_prompt=2, global_batch_size=4)
    train(tiny_job(tmp_path, "b", num_rollout=3, save=str(tmp_path / "kept"), save_interval=2, keep_last=1, **small))
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["latest", "step_000003"]


def test_prune_never_deletes_what_latest_names(tmp_path):
    for step in (1, 2, 10, 11):
        (tmp_path / f"step_{step:06d}").mkdir()
    (tmp_path / "latest").write_text("step_000002\n")  # e.g. a run resumed from step 2 into an older folder
    deleted = checkpoints.prune_checkpoints(tmp_path, keep_last=1)
    assert [p.name for p in deleted] == ["step_000001", "step_000010"]
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_000002", "step_000011"]


def unwritable(tmp_path, kind):
    """A folder path that cannot be written: below a regular file, or in a read-only folder (not as root, whom
    permission bits do not stop)."""
    if kind == "under_a_file":
        (tmp_path / "file").write_text("")
        return tmp_path / "file" / "out"
    if os.geteuid() == 0:
        pytest.skip("root writes in a 0o555 folder; the under_a_file case checks the same path")
    (tmp_path / "ro").mkdir(mode=0o555)
    return tmp_path / "ro" / "out"


@pytest.mark.parametrize("kind", ["under_a_file", "read_only"])
@pytest.mark.parametrize("flag", ["--save", "--run-dir"])
def test_unwritable_output_folders_fail_at_start(tmp_path, monkeypatch, kind, flag):
    monkeypatch.setattr(setup, "build_policy", lambda *a: pytest.fail("built the model before the check"))
    folders = {
        "--run-dir": str(tmp_path / "run"),
        "--save": str(tmp_path / "ckpt"),
        flag: str(unwritable(tmp_path, kind)),
    }
    for dry_run in ([], ["--dry-run"]):
        result = CliRunner().invoke(app, ["train", *dry_run, *(x for kv in folders.items() for x in kv)])
        assert result.exit_code == 1, result.output
        assert f"`{flag}` {folders[flag]}" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "run").exists() and not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tp", "3"], "start a multiple of 3 processes"),
        (["--rollout-batch-size", "3", "--n-samples-per-prompt", "3"], "multiple of `--global-batch-size` (128)"),
        (["--n-samples-per-prompt", "200"], "`--n-samples-per-prompt` (200) exceeds"),
        (["--hf-checkpoint", "/nonexistent/model"], "no such folder"),
        (["--load", "/nonexistent/ckpt"], "`--load` /nonexistent/ckpt"),
        (["--prompt-data", "builtin:nope"], "unknown built-in task"),
        (["--eval-prompt-data", "x,/nonexistent/x.jsonl"], "/nonexistent/x.jsonl: no such file"),
        (["--custom-rm-path", "/nonexistent/r.py:f"], "r.py"),
        (["--mtp-num-layers", "3"], "does not match"),
        (["--seed", str(2**63 - 2)], "too large"),
        (["--seed", "100000000000000000000"], "`--seed` must be an integer in [0, 2**63 - 1]"),
        (["--lr", "nan"], "`--lr` must be a finite number >= 0, got nan"),
        (["--lr", "-0.1"], "`--lr` must be a finite number >= 0"),
        (["--rollout-top-p", "1.5"], "`--rollout-top-p` must be a finite number in (0, 1]"),
        (["--rollout-temperature", "0"], "`--rollout-temperature` must be a finite number > 0"),
        (["--rollout-top-k", "0"], "`--rollout-top-k` must be -1 (off) or an integer >= 1"),
        (["--eps-clip-c", "nan"], "`--eps-clip-c` must be a finite number > 1"),
        (["--adam-beta2", "1"], "`--adam-beta2` must be a finite number in [0, 1)"),
        (["--tis-clip-low", "3"], "`--tis-clip-low` must be a finite number in [0, 2.0]"),
        (["--num-rollout", "-1"], "`--num-rollout` must be an integer >= 1"),
        (["--eval-top-p", "0"], "`--eval-top-p`"),
        (["--sft-warmup-label-smoothing", "1"], "`--sft-warmup-label-smoothing`"),
        (["--random-seed", "-5"], "`random_seed` must be an integer in [0, 2**63 - 1]"),
        (["--speculative-num-steps", "0"], "`speculative_num_steps` must be an integer >= 1"),
        (["--rollout-seed", "-1"], "`--rollout-seed`"),
        (["--keep-last", "0", "--save", "x"], "`--keep-last` must be an integer >= 1"),
        (["--keep-last", "2"], "`--keep-last` is set but `--save` is not"),
        (["--load-unsafe-pickle"], "`--load-unsafe-pickle` is set but `--load` is not"),
    ],
)
def test_dry_run_refuses_what_the_run_refuses(tmp_path, args, message):
    result = CliRunner().invoke(app, ["train", "--dry-run", "--run-dir", str(tmp_path / "run"), *args])
    assert result.exit_code == 1 and message in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_dry_run_of_a_good_run_writes_nothing(tmp_path):
    result = CliRunner().invoke(
        app, ["train", "--dry-run", "--run-dir", str(tmp_path / "run"), "--save", str(tmp_path / "ckpt")]
    )
    assert result.exit_code == 0 and json.loads(result.stdout)["checkpoint"]["save"] == str(tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_failed_start_removes_only_the_folder_it_made(tmp_path, monkeypatch):
    def no_permission(job, path):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr("league.rl.loop.write_config", no_permission)
    made = tmp_path / "new" / "run"
    args = ["train", "--num-rollout", "1", "--sft-warmup-steps", "0", "--no-tensorboard"]
    result = CliRunner().invoke(app, [*args, "--run-dir", str(made)])
    assert result.exit_code == 1 and result.stderr == f"error: Permission denied: {made / 'config.json'}\n"
    assert not (tmp_path / "new").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    result = CliRunner().invoke(app, [*args, "--run-dir", str(mine)])
    assert result.exit_code == 1 and mine.is_dir()


def test_a_full_disk_while_saving_is_one_error_line(tmp_path, monkeypatch):
    def full(tensor, stream):
        raise OSError(errno.ENOSPC, "No space left on device", "__0_0.distcp")

    monkeypatch.setattr(torch, "save", full)  # DCP writes each tensor with torch.save
    flags = {**FAST, "num_rollout": 1, "eval_prompt_data": "", "save": tmp_path / "ckpt", "run_dir": tmp_path / "run"}
    del flags["eval_interval"], flags["tensorboard"]
    args = [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]
    result = CliRunner().invoke(app, ["train", *args, "--no-tensorboard"])
    assert result.exit_code == 1 and result.stderr == "error: No space left on device: __0_0.distcp\n"
    assert list((tmp_path / "ckpt").iterdir()) == []  # the half-written checkpoint is gone


def test_routing_replay_uses_the_rollouts_experts_and_changes_nothing_where_they_agree(tmp_path, monkeypatch):
    """``--use-rollout-routing-replay``: every trainer forward gets the rollout's experts of each token; in fp32 on
    the CPU the trainer would have chosen the same ones, so the run's metrics equal the run without replay."""
    from league.models.qwen3_5_moe import ForwardBatch

    replayed = []
    original = ForwardBatch.training.__func__

    def training(cls, seq_lens, device="cpu", numerics=None, routed_experts=None, **kw):
        replayed.append(routed_experts is not None and bool((routed_experts >= 0).any()))
        return original(
            cls, seq_lens, device, *(() if numerics is None else (numerics,)), routed_experts=routed_experts
        )

    monkeypatch.setattr(ForwardBatch, "training", classmethod(training))
    with_replay = read_metrics(train(tiny_job(tmp_path, "r3", num_rollout=2, use_rollout_routing_replay=True)))
    assert replayed and all(replayed)
    replayed.clear()
    without = read_metrics(train(tiny_job(tmp_path, "plain", num_rollout=2)))
    assert not any(replayed)
    assert [comparable(r) for r in with_replay] == [comparable(r) for r in without]


def test_a_served_engine_gets_the_trained_weights_through_the_tensor_route(tmp_path):
    """``--rollout-engine URL``: rollouts come from a `league serve`, and each step's weights reach it through
    ``/update_weights_from_tensor`` (the same ``update_weights`` call an in-process replica gets): after the run the
    served model holds the trainer's final weights exactly."""
    from league.checkpoint.init import init_checkpoint
    from league.engine.config import EngineConfig
    from league.engine.server import build_server
    from league.rl import loop

    init_checkpoint("tiny", tmp_path / "start", seed=5)
    server = build_server(str(tmp_path / "start"), "127.0.0.1", 0, EngineConfig(context_length=512), "cpu").start()
    trained = {}
    original = setup.sync_weights

    def sync_and_keep(engine, model, run_dir, ranks=None):
        original(engine, model, run_dir, ranks)
        trained.update({k: v.detach().clone() for k, v in model.state_dict().items()})

    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(loop.setup, "sync_weights", sync_and_keep)
            records = read_metrics(train(tiny_job(tmp_path, "remote", num_rollout=2, rollout_engine=server.url)))
        assert len(records) == 2 and server.worker.weight_version == "default"
        served = server.engine.model.state_dict()
        assert trained and all(torch.equal(served[k], v) for k, v in trained.items())
    finally:
        server.shutdown()


def test_offload_rollout_gives_the_cache_back_during_training_and_changes_nothing(tmp_path, monkeypatch):
    """`--offload-rollout` (the reference's name; on by default on a GPU): the engine's cache slots go while the
    trainer runs and come back zeroed for the next rollout; in one process its weights are the policy's and stay.
    The run's metrics are those of a run without it."""
    calls = []
    release, resume = setup.LLMEngine.release_memory, setup.LLMEngine.resume_memory

    def released(engine, *args, **kwargs):
        calls.append(("release", *args, *kwargs.values()))
        return release(engine, *args, **kwargs)

    monkeypatch.setattr(setup.LLMEngine, "release_memory", released)
    monkeypatch.setattr(setup.LLMEngine, "resume_memory", lambda e, *a: calls.append(("resume", *a)) or resume(e, *a))
    plain = read_metrics(train(tiny_job(tmp_path, "plain", num_rollout=2)))
    assert calls == []  # off by default on the CPU
    offloaded = read_metrics(train(tiny_job(tmp_path, "offloaded", num_rollout=2, offload_rollout=True)))
    tags = {"kv_cache", "cuda_graph"}
    assert calls == [("release", tags, tags), ("resume", tags)] * 2
    assert [comparable(r) for r in offloaded] == [comparable(r) for r in plain]
    assert all(r["perf/offloaded_gib"] > 0 for r in offloaded)
    with pytest.raises(ValueError, match="`--offload-rollout-level` \\['cache'\\]: expected kv_cache and/or weight"):
        tiny_job(tmp_path, "bad", offload_rollout_level=["cache"])
