"""Launching ranks: how work is shared among them, the world size a run takes, refusals before any work, and
`league train --nproc-per-node 2` end to end."""

import json
import subprocess
import sys

import pytest

from league.config import apply_overrides
from league.parallel.dims import ParallelConfig
from league.parallel.launch import Ranks, block_bounds, run_world_size, torchrun_command
from league.recipes import get_recipe
from league.rl.preflight import check_job


@pytest.mark.parametrize("num,world", [(16, 2), (7, 2), (5, 4), (2, 4), (0, 3)])
def test_blocks_cover_the_items_in_order(num, world):
    items = list(range(num))
    blocks = [Ranks(rank=r, world=world).block(items) for r in range(world)]
    assert [i for b in blocks for i in b] == items
    assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
    assert [block_bounds(num, r, world)[0] for r in range(world)] == [sum(map(len, blocks[:r])) for r in range(world)]


def test_step_share_is_each_windows_rank_block():
    """16 samples, global batch 8, 2 ranks: rank 0 trains on 0-3 (step 1) and 8-11 (step 2), rank 1 on 4-7, 12-15."""
    items = list(range(16))
    assert Ranks(rank=0, world=2).step_share(items, 8) == [0, 1, 2, 3, 8, 9, 10, 11]
    assert Ranks(rank=1, world=2).step_share(items, 8) == [4, 5, 6, 7, 12, 13, 14, 15]
    assert Ranks().step_share(items, 8) == items
    with pytest.raises(ValueError, match="does not split over 3"):
        Ranks(rank=0, world=3).step_share(items, 8)


def test_world_size_is_torchruns_under_torchrun(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert run_world_size(3) == 3
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert run_world_size(1) == 8 and run_world_size(4) == 8
    with pytest.raises(ValueError, match="`--nproc-per-node` 2 under a torchrun of 4 processes per node"):
        run_world_size(2)


def test_torchrun_command_runs_league_standalone():
    command = torchrun_command(4, ["train", "--num-rollout", "2"])
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--standalone" in command and "--nproc-per-node=4" in command
    # `--` first: torchrun's parser would take an abbreviation of one of its options (`--n`) for its own
    assert command[-6:] == ["-m", "league", "--", "train", "--num-rollout", "2"]


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"pp": 2, "tp": 2, "nproc_per_node": 4}, "`--pp` 2 with `--tp` 2 `--cp` 1 is not available"),
        ({"pp": 8, "nproc_per_node": 8}, "`--pp` 8 exceeds the policy's 4 decoder layers"),
        ({"pp": 2, "tp": 2, "nproc_per_node": 2}, "world size 2 .* not divisible by tp\\*cp\\*pp = 2\\*1\\*2"),
        ({"nproc_per_node": 2, "tp": 2, "rollout_engine": "http://x:1"}, "`--rollout-engine` with 2 ranks"),
        ({"tp": 4, "nproc_per_node": 4}, "tp x cp = 4 does not divide the model's 2 GDN key heads"),
        ({"ep": 16, "nproc_per_node": 16}, "`--ep` 16 does not divide the policy's 8 routed experts"),
        ({"tp": 2}, "world size 1 .* is not divisible by tp\\*cp\\*pp = 2\\*1\\*1; start a multiple of 2"),
        ({"ep": 4, "nproc_per_node": 2}, "not divisible by ep\\*etp\\*pp = 4\\*1\\*1; start a multiple of 4"),
        ({"ep": 2, "etp": 2, "nproc_per_node": 2}, "not divisible by ep\\*etp\\*pp = 2\\*2\\*1; start a multiple of 4"),
        (
            {"etp": 128, "nproc_per_node": 128},
            "`--etp` 128 does not divide the policy's expert intermediate size \\(moe_intermediate_size 64\\)",
        ),
        ({"nproc_per_node": 3}, "`--global-batch-size` 128 does not split over 3 data-parallel ranks"),
        ({"nproc_per_node": 2, "rollout_engine": "http://x:1"}, "`--rollout-engine` with 2 ranks"),
    ],
)
def test_invalid_layouts_fail_before_any_work(overrides, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    job = apply_overrides(get_recipe("tiny"), {"run_dir": str(tmp_path / "run"), **overrides})
    with pytest.raises(ValueError, match=message):
        check_job(job)
    assert not (tmp_path / "run").exists()


def test_nproc_per_node_must_be_positive():
    with pytest.raises(ValueError, match="`--nproc-per-node` must be a positive integer, got 0"):
        ParallelConfig(nproc_per_node=0)


@pytest.mark.xdist_group("world2")
def test_league_train_on_two_processes_runs_two_rollouts(tmp_path):
    """`league train --nproc-per-node 2 --tp 2 --ep 2` (torchrun, gloo; FSDP2, rows and heads split over the 2 ranks,
    which share every sample, and the experts split over them): two GRPO steps of the tiny recipe, saving after each;
    rank 0 writes the run folder, and the steps' rollouts are those of one process (same per-request seeds) and the
    losses agree. One process resumed from the 2-rank checkpoint of step 1 runs step 2 as the 2 ranks did, and so do
    2 pipeline stages resumed from it (each rank reading only its stage's shards into the policy built on the meta
    device, the engine's copy filled by the first sync)."""
    run, ckpt = tmp_path / "run", tmp_path / "ckpt"
    args = ["train", "--num-rollout", "2", "--sft-warmup-steps", "0", "--rollout-batch-size", "4"]
    args += ["--global-batch-size", "16", "--no-tensorboard"]
    saving = ["--save", str(ckpt), "--save-interval", "1", "--nproc-per-node", "2", "--tp", "2", "--ep", "2"]
    done = league([*args, "--run-dir", str(run), *saving])
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("run folder:") == 1 and "on each of 2 ranks" in done.stdout
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [0, 1]
    assert all(s["train/grad_norm"] > 0 for s in steps)
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step_000001", "step_000002"]
    one = tmp_path / "one"
    single = league([*args, "--run-dir", str(one)])
    assert single.returncode == 0, single.stderr
    expected = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    resumed = league([*args, "--run-dir", str(tmp_path / "resumed"), "--load", str(ckpt / "step_000001")])
    assert resumed.returncode == 0, resumed.stderr
    [after] = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    staged = tmp_path / "staged"
    from_load = ["--load", str(ckpt / "step_000001"), "--nproc-per-node", "2", "--pp", "2"]
    pipeline = league([*args, "--run-dir", str(staged), *from_load])
    assert pipeline.returncode == 0, pipeline.stdout + pipeline.stderr
    [after_pp] = [json.loads(line) for line in (staged / "metrics.jsonl").read_text().splitlines()]
    for got, want in [*zip(steps, expected), (after, steps[1]), (after_pp, steps[1])]:
        for key in ("rollout/reward_mean", "rollout/response_len_mean", "rollout/truncated_ratio"):
            assert got[key] == want[key], key
        for key in ("train/pg_loss", "train/mtp_loss", "train/grad_norm"):
            assert got[key] == pytest.approx(want[key], rel=1e-5), key


def league(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "league", *args], capture_output=True, text=True, timeout=300)
