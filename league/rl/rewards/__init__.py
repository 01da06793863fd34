"""Rule-based math rewards (``deepscaler``, ``dapo``, ``math``), user rewards from ``--custom-rm-path``,
and a pool of worker processes that grades a batch in parallel with a time limit per response.

Public API:

- ``RewardConfig``, ``RewardModel(config).score(responses, labels, metadata) -> RewardResult``: the
  isolated, time-bounded scorer the RL loop uses;
- ``compute_reward(rm_type, response, label) -> float``: one built-in reward, in this process;
- ``reward_one(rm_type, label, response, custom_rm_path=None, timeout_s=10.0) -> float``: one reward
  in a worker process (the ``league reward`` command);
- ``REWARDS``: the built-in rewards by name; ``load_custom_reward(path)``.

Not responsible for turning rewards into advantages (``rl.algorithms``) or for remote reward models.
"""

from league.rl.rewards.dapo import dapo_reward
from league.rl.rewards.deepscaler import deepscaler_reward, grade_answer
from league.rl.rewards.mathverify import math_verify_reward
from league.rl.rewards.pool import RewardConfig, RewardModel, RewardResult, reward_one
from league.rl.rewards.registry import REWARDS, compute_reward, load_custom_reward

__all__ = [
    "REWARDS",
    "RewardConfig",
    "RewardModel",
    "RewardResult",
    "compute_reward",
    "dapo_reward",
    "deepscaler_reward",
    "grade_answer",
    "load_custom_reward",
    "math_verify_reward",
    "reward_one",
]
