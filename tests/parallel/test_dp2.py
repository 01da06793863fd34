"""dp2: FSDP2 over 2 ranks gives the one-process training step (gloo on CPU, one launch for every world-2 check)."""

import pytest

from tests.parallel.expect import logprobs_equal_one_process, step_equals_one_process

pytestmark = pytest.mark.xdist_group("world2")


def test_one_step_equals_one_process(world2):
    step_equals_one_process(world2, "dp2_train_step")


def test_ranks_run_different_numbers_of_micro_batches(world2):
    """The step above covers a rank that repeats its last micro-batch with no weight."""
    counts = [result["micro_batches"] for result in step_equals_one_process(world2, "dp2_train_step")]
    assert len(set(counts)) == 2, counts


def test_logprobs_gathered_per_sample_equal_one_process(world2):
    logprobs_equal_one_process(world2, "dp2_logprobs")
