"""ep2: the routed experts split over 2 ranks (FSDP2 for the rest, activation recompute on) give the one-process
training step; the engine's whole replica receives the sharded policy."""

import pytest

from tests.parallel.expect import logprobs_equal_one_process, results, step_equals_one_process

pytestmark = pytest.mark.xdist_group("world2")


def test_one_step_equals_one_process(world2):
    step_equals_one_process(world2, "ep2_train_step")


def test_logprobs_gathered_per_sample_equal_one_process(world2):
    logprobs_equal_one_process(world2, "ep2_logprobs")


def test_engine_replica_gets_the_sharded_policy_weights(world2):
    for result in results(world2, "ep2_engine_replica_sync"):
        assert result["equal"]
        assert result["changed"] == result["count"]
