"""pp2 ep2: 2 pipeline stages of 2 ranks each, the routed experts of each stage split over its 2 ranks (and FSDP2
over them; activation recompute on) give the one-process training step; dp2 pp2 log-probs equal one process's (one
launch of 4 gloo processes for every world-4 check)."""

import pytest

from tests.parallel.expect import logprobs_equal_one_process, step_equals_one_process

pytestmark = pytest.mark.xdist_group("world4")


def test_one_step_equals_one_process(world4):
    step_equals_one_process(world4, "pp2_ep2_train_step")


def test_dp2_pp2_logprobs_equal_one_process(world4):
    logprobs_equal_one_process(world4, "dp2_pp2_logprobs")
