"""The engine over 2 ranks (``parallel.inference``) against one process, and a trainer's weights synced into an
engine of another layout (`checks_engine`)."""

import pytest

from tests.parallel.expect import results as checked

pytestmark = pytest.mark.xdist_group("world2")


def engine_equals_one_process(world: dict, check: str, num_engines: int = 1) -> None:
    """Every rank's outputs equal one process's: bitwise under batch-invariant numerics, within rounding under fast
    numerics, speculative greedy tokens equal plain greedy ones; the engines' prompt blocks make up the prompts."""
    per_rank = checked(world, check)
    for rank in per_rank:
        assert rank["num_engines"] == num_engines
        exact = rank["batch_invariant"]
        assert exact["tokens_equal"] and exact["logprobs_equal"], exact  # bitwise under batch-invariant numerics
        fast = rank["fast"]
        assert fast["tokens_equal"] and fast["max_logprob_diff"] < 1e-5, fast
        if "spec_greedy_tokens_equal" in rank:
            assert rank["spec_greedy_tokens_equal"]
    blocks = sorted({tuple(rank["block"]) for rank in per_rank})  # the engines' blocks make up the prompts
    assert len(blocks) == num_engines and blocks[0][0] == 0
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))


@pytest.mark.parametrize("check", ["engine_tp2", "engine_ep2", "engine_tp2_ep2"])
def test_engine_equals_one_process(world2, check):
    engine_equals_one_process(world2, check)


def test_two_data_parallel_engines(world2):
    engine_equals_one_process(world2, "engine_dp2", num_engines=2)


def test_sync_from_fsdp2_ep2_trainer_into_tp2_engine(world2):
    for rank in checked(world2, "sync_fsdp2_ep2_to_engine_tp2"):
        assert rank["step_changed_weights"]
        assert rank["tokens_equal_one_process"] and rank["logprobs_equal_one_process"]
        assert rank["max_engine_trainer_diff"] <= 1e-6


def test_an_engine_laid_out_as_the_trainer_reads_its_expert_shards_in_place(world2):
    for rank in checked(world2, "engine_ep2_reads_fsdp2_ep2_experts_in_place"):
        assert rank["all_experts_shared"], rank["shared"]
        assert rank["same_storage_after_step"]  # still the trainer's tensors after its optimizer step
        assert rank["max_engine_trainer_diff"] <= 1e-6
