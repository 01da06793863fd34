"""The embedded default (`league train` with no options) learns: reward rises and rollouts stay on-policy.

This runs the whole `tiny` recipe (a warm-up, then 60 GRPO steps with MTP training and speculative rollouts):
a few minutes on 2 cores.
"""

import statistics

# the target of the embedded default: the last 5 rollouts average at least 0.3 more reward than the first 5
MIN_REWARD_GAIN = 0.3


def test_embedded_default_learns(demo_metrics):
    records = demo_metrics
    rewards = [r["rollout/reward_mean"] for r in records]
    first, last = statistics.fmean(rewards[:5]), statistics.fmean(rewards[-5:])
    assert last - first >= MIN_REWARD_GAIN, rewards
    assert max(r["train/train_rollout_logprob_abs_diff"] for r in records) < 1e-5
    accept = [r["rollout/spec_accept_length"] for r in records]
    assert statistics.fmean(accept[-5:]) > statistics.fmean(accept[:5])
    assert any("eval/add/reward_mean" in r for r in records)
