"""`league train --nproc-per-node 4` with its rollouts from two engines of two ranks each (heads and experts split
over each engine's ranks, `parallel.inference`) learns the embedded default as one process does."""

import statistics
import subprocess
import sys

from league.rl.metrics import read_metrics

STEPS = 25
"""GRPO steps of the run across ranks (the demo's 60 take 10 minutes at 4 ranks on 2 cores)."""


def test_four_ranks_with_engines_over_two_ranks_learn_as_one_process(tmp_path, demo_metrics):
    run = tmp_path / "run"
    args = ["train", "--nproc-per-node", "4", "--rollout-num-gpus-per-engine", "2", "--sglang-tp-size", "2"]
    args += ["--sglang-ep-size", "2", "--num-rollout", str(STEPS), "--run-dir", str(run), "--no-tensorboard"]
    args += ["--reward-num-workers", "1"]
    done = subprocess.run([sys.executable, "-m", "league", *args], capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    records = read_metrics(run)
    assert len(records) == STEPS
    rewards = [r["rollout/reward_mean"] for r in records]
    gain = statistics.fmean(rewards[-5:]) - statistics.fmean(rewards[:5])
    assert gain >= 0.3, rewards
    # the one-process run's curve over the same steps, within noise
    single = [r["rollout/reward_mean"] for r in demo_metrics[:STEPS]]
    assert abs(statistics.fmean(rewards[-5:]) - statistics.fmean(single[-5:])) <= 0.15, (rewards, single)
    # rollouts stay on-policy: the engines' log-probs are the trainer's
    assert max(r["train/train_rollout_logprob_abs_diff"] for r in records) < 1e-5
    assert all(r["perf/weight_sync_s"] > 0 for r in records)
    assert "eval/add/reward_mean" in records[-1]
