"""What the layout tests assert on the checks' results (``checks.py``): a layout's step equals one process's."""

import pytest

TOL = 1e-5
"""Relative difference allowed between a layout and one process (fp32; the sums run in another order): of the
metrics, and of all gradients (all updated parameters) taken together as one vector."""
TENSOR_TOL = 1e-4
"""Relative difference allowed for each gradient and parameter on its own: a small gradient summed from large terms
of both signs (GDN's dt_bias and A_log) keeps the rounding of the terms (measured up to 1.2e-5 with the heads split 4
ways; in fp64 every tensor agrees to 1e-7, the rounding of the fp32 log-probs)."""


def results(world: dict, name: str) -> list[dict]:
    """A check's result on every rank, failing with the rank's traceback when the check raised."""
    per_rank = world[name]
    for r, result in enumerate(per_rank):
        assert "error" not in result, f"rank {r}:\n{result['error']}"
    return per_rank


def step_equals_one_process(world: dict, name: str) -> list[dict]:
    """Every metric, the gathered gradients and the updated parameters of the layout's step within TOL of one
    process's (each tensor within TENSOR_TOL); every parameter has a gradient (MTP included), and the KL and MTP terms
    are not zero."""
    per_rank = results(world, name)
    for result in per_rank:
        assert result["num_grads"] == result["num_params"]
        assert len(result["grad_errors"]) == result["num_grads"]
        assert result["grad_error"] < TOL and result["param_error"] < TOL, (result["grad_error"], result["param_error"])
        assert max(result["grad_errors"].values()) < TENSOR_TOL, result["grad_errors"]
        assert max(result["param_errors"].values()) < TENSOR_TOL, result["param_errors"]
        for key, (got, expected) in result["metrics"].items():
            assert got == pytest.approx(expected, rel=TOL, abs=1e-7), key
        assert result["metrics"]["train/kl_loss"][1] > 0 and result["metrics"]["train/mtp_loss"][1] > 0
    return per_rank


def logprobs_equal_one_process(world: dict, name: str, count: int = 16) -> None:
    for result in results(world, name):
        assert result["count"] == count
        assert max(result["errors"]) < TOL
