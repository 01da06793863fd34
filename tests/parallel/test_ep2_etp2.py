"""ep2_etp2: 4 ranks, the routed experts split over pairs of ranks and each expert's intermediate dim over the ranks
of the other pairing (etp groups: ranks 0-1 and 2-3; ep groups: 0-2 and 1-3); one training step and the log-probs
equal one process's, and a checkpoint saved in this layout resumes in it bitwise and in one process (one launch of
4 gloo processes for every world-4 check)."""

import pytest

from tests.parallel.expect import logprobs_equal_one_process, results, step_equals_one_process

pytestmark = pytest.mark.xdist_group("world4")
TOL = 1e-5


def test_one_step_equals_one_process(world4):
    step_equals_one_process(world4, "ep2_etp2_train_step")


def test_logprobs_gathered_per_sample_equal_one_process(world4):
    logprobs_equal_one_process(world4, "ep2_etp2_logprobs")


def test_checkpoint_resumes_in_the_same_layout_bitwise_and_in_one_process(world4):
    """The optimizer's masters and moments and the reference, whose experts' gate/up shards are two blocks of the
    whole tensor on each rank, are saved and read back through tensors laid out in blocks (``parallel.blocks``)."""
    per_rank = results(world4, "dcp_resume_from_ep2_etp2")
    same = [r["legs"]["ep2_etp2"] for r in per_rank]
    assert all(leg["start"] == 1 and leg["bitwise"] and leg["rng"] and leg["sampler"] for leg in same), same
    [one] = [r["legs"]["one"] for r in per_rank if "one" in r["legs"]]
    assert one["start"] == 1 and one["rng"] and one["sampler"]
    assert max(one["metric_errors"].values()) < TOL, one["metric_errors"]
    assert one["param_error"] < TOL
