"""dcp, saved in tp2 ep2: a training checkpoint saved by 4 ranks (2 token groups of 2, experts over pairs) resumes
in the same layout, as dp4 and ep4, at 2 ranks and in one process into the uninterrupted run's next step; a failed
write on any rank leaves no checkpoint (one launch of 4 gloo processes for every world-4 check)."""

import pytest

from tests.parallel.expect import results

pytestmark = pytest.mark.xdist_group("world4")
TOL = 1e-5


def test_checkpoint_holds_every_ranks_shards_and_the_policy_files(world4):
    for result in results(world4, "dcp_resume_across_layouts"):
        assert result["root"] == ["latest", "step_000001"]
        assert {".metadata", "train_state.json", "config.json", "tokenizer.json"} <= set(result["files"])
        assert [f for f in result["files"] if f.endswith(".distcp")] == [f"__{r}_0.distcp" for r in range(4)]


def test_resume_in_the_same_layout_is_bitwise_the_uninterrupted_step(world4):
    for result in results(world4, "dcp_resume_across_layouts"):
        leg = result["legs"]["tp2_ep2"]
        assert leg["start"] == 1 and leg["bitwise"], leg
        assert leg["rng"] and leg["sampler"]


@pytest.mark.parametrize("leg", ["dp4", "ep4", "dp2", "one"])
def test_resume_in_another_layout_gives_the_uninterrupted_step(world4, leg):
    """The policy, reference, optimizer masters and moments are resharded from tp2 ep2 to FSDP2 alone and to ep4 at 4
    ranks, to 2 ranks (two runs of 2) and to one process; the next step's metrics and updated parameters equal the
    uninterrupted step's within fp32 summation order. Each rank takes the RNG states of the saving rank of its own
    number (modulo the saving world)."""
    legs = [r["legs"][leg] for r in results(world4, "dcp_resume_across_layouts") if leg in r["legs"]]
    assert len(legs) == (1 if leg == "one" else 4)
    for leg in legs:
        assert leg["start"] == 1 and leg["rng"] and leg["sampler"]
        assert max(leg["metric_errors"].values()) < TOL, leg["metric_errors"]
        assert leg["param_error"] < TOL


def test_a_write_failing_on_one_rank_fails_on_every_rank_and_leaves_nothing(world4):
    per_rank = results(world4, "dcp_failed_write_leaves_nothing")
    for rank, result in enumerate(per_rank):
        assert result["after"] == result["before"] == ["latest", "step_000001"]
        # in DCP's write (rank 2's disk is full): every rank raises rank 2's error
        assert result["errors"]["dcp"] == "OSError: [Errno 28] No space left on device: 'disk'"
        # in rank 0's own files: rank 0 raises its error, the others say which rank failed
        expected = "OSError: [Errno 28]" if rank == 0 else "ValueError: rank 0: [Errno 28]"
        assert result["errors"]["main"].startswith(expected)


@pytest.mark.parametrize("check", ["sharded_load_pp2_ep2", "sharded_load_tp2_ep2"])
def test_load_across_ranks_reads_each_ranks_shards_into_the_placed_policy(world4, check):
    """``--load`` at 4 ranks: the policy is built on the meta device, placed (pipeline stages, heads, experts, FSDP2),
    and each rank reads its shards of the policy and the KL reference; they hold the checkpoint's weights exactly, as
    do the engine's copy after the first sync and (pp) the last stage's embedding copy."""
    for rank, result in enumerate(results(world4, check)):
        assert result["built_on_meta"] and result["sharded"]
        assert result["policy"] and result["ref"] and result["engine"] and result["rope"]
        if check.startswith("sharded_load_pp2") and rank >= 2:
            assert result["mtp_embedding"]
