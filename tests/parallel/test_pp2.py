"""pp2: the policy split into 2 pipeline stages (1F1B over micro-batches padded to one length; the last stage holds
the final norm, the output and MTP heads, and a copy of the embedding for the MTP head) gives the one-process
training step and log-probs (one launch for every world-2 check); how the layers split into stages."""

import pytest

from league.models.qwen3_5_moe.presets import TINY
from league.parallel.pipeline import check_pipeline_split, stage_layers
from tests.parallel.expect import TOL, logprobs_equal_one_process, results, step_equals_one_process


@pytest.mark.xdist_group("world2")
def test_one_step_equals_one_process(world2):
    step_equals_one_process(world2, "pp2_train_step")


@pytest.mark.xdist_group("world2")
def test_last_stage_embedding_copy_is_the_updated_embedding(world2):
    """After the step, the last stage's copy (read by the MTP head) is stage 0's updated embedding."""
    first, last = results(world2, "pp2_train_step")
    assert first["embedding_copy_error"] is None
    assert last["embedding_copy_error"] < TOL


@pytest.mark.xdist_group("world2")
def test_logprobs_equal_one_process(world2):
    logprobs_equal_one_process(world2, "pp2_logprobs")


@pytest.mark.parametrize(
    "layers,stages,expected",
    [
        (4, 2, [range(0, 2), range(2, 4)]),
        (5, 2, [range(0, 3), range(3, 5)]),
        (40, 3, [range(0, 14), range(14, 27), range(27, 40)]),
    ],
)
def test_stages_take_consecutive_layers_the_first_ones_the_extra(layers, stages, expected):
    assert [stage_layers(layers, stages, s) for s in range(stages)] == expected


def test_a_split_that_cannot_be_made_is_refused():
    with pytest.raises(ValueError, match="`--pp` 5 exceeds the policy's 4 decoder layers"):
        check_pipeline_split(TINY, 5)
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        check_pipeline_split(TINY.replace(tie_word_embeddings=True), 2)


@pytest.mark.xdist_group("world2")
def test_engine_replica_gets_every_stages_weights(world2):
    for result in results(world2, "pp2_engine_replica_sync"):
        assert result["equal"]
        assert result["changed"] == result["count"]


@pytest.mark.xdist_group("world2")
def test_checkpoint_of_two_stages_resumes_as_two_stages_and_in_one_process(world2):
    """Each stage saves what it holds; the checkpoint declares the whole policy (its MTP layer, which stage 0 does
    not hold) and resumes bitwise with 2 stages, and in one process within fp32 summation order."""
    per_rank = results(world2, "dcp_pp2_resume_as_pp2_and_one")
    assert per_rank[0]["config"] == 1
    for result in per_rank:
        leg = result["legs"]["pp2"]
        assert leg["start"] == 1 and leg["bitwise"] and leg["rng"] and leg["sampler"]
    one = per_rank[0]["legs"]["one"]
    assert one["start"] == 1 and one["rng"] and one["sampler"]
    assert max(one["metric_errors"].values()) < TOL and one["param_error"] < TOL
