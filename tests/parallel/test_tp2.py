"""tp2: one training step equals one process (`checks.tp2_train_step`)."""

import pytest

from tests.parallel.expect import logprobs_equal_one_process, step_equals_one_process

pytestmark = pytest.mark.xdist_group("world2")


def test_one_step_equals_one_process(world2):
    step_equals_one_process(world2, "tp2_train_step")


def test_logprobs_gathered_per_sample_equal_one_process(world2):
    logprobs_equal_one_process(world2, "tp2_logprobs")
