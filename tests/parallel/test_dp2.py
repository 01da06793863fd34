"""dp2: FSDP2 over 2 ranks gives the one-process training step (gloo on CPU, one launch for every world-2 check)."""

import pytest

pytestmark = pytest.mark.xdist_group("world2")
TOL = 1e-5


def results(world2, name: str) -> list[dict]:
    per_rank = world2[name]
    for r, result in enumerate(per_rank):
        assert "error" not in result, f"rank {r}:\n{result['error']}"
    return per_rank


def test_one_step_equals_one_process(world2):
    for result in results(world2, "dp_train_step"):
        assert result["num_grads"] == result["num_params"]  # every parameter has a gradient (MTP included)
        assert len(result["grad_errors"]) == result["num_grads"]
        assert max(result["grad_errors"].values()) < TOL, result["grad_errors"]
        assert max(result["param_errors"].values()) < TOL, result["param_errors"]
        for key, (got, expected) in result["metrics"].items():
            assert got == pytest.approx(expected, rel=TOL, abs=1e-7), key
        assert result["metrics"]["train/kl_loss"][1] > 0 and result["metrics"]["train/mtp_loss"][1] > 0


def test_ranks_run_different_numbers_of_micro_batches(world2):
    """The step above covers a rank that repeats its last micro-batch with no weight."""
    counts = [result["micro_batches"] for result in results(world2, "dp_train_step")]
    assert len(set(counts)) == 2, counts


def test_logprobs_gathered_per_sample_equal_one_process(world2):
    for result in results(world2, "dp_logprobs"):
        assert result["count"] == 16
        assert max(result["errors"]) < TOL


def test_engine_replica_gets_the_sharded_policy_weights(world2):
    for result in results(world2, "dp_engine_replica_sync"):
        assert result["equal"]
        assert result["changed"] == result["count"]
