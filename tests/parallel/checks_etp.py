"""Expert tensor parallelism's checks beyond the train step and the log-probs (``checks.py``): a training checkpoint
saved by 4 ranks in ep2 etp2 (the experts' fused gate/up weight held as two blocks per rank) resumes in the same
layout and in one process into the uninterrupted run's next step."""

import shutil

import torch.distributed as dist

from league.parallel.launch import Ranks
from tests.parallel.checks_dcp import compare, resumed, saved_between_steps
from tests.parallel.worlds import check

SAVED = {"ep": 2, "etp": 2}


@check(world=4)
def dcp_resume_from_ep2_etp2(world: int) -> dict:
    """One step at 4 ranks in ep2 etp2 (fp32 masters offloaded, KL reference sharded), a checkpoint, then the next
    step: run uninterrupted, and resumed from the checkpoint in ep2 etp2 and in one process (rank 0)."""
    ranks, root, _, expected, draws = saved_between_steps(world, SAVED)
    legs = {"ep2_etp2": resumed(ranks, SAVED, root)}
    if ranks.main:
        legs["one"] = resumed(Ranks(), {}, root)
    saving_rank = {"ep2_etp2": ranks.rank, "one": 0}
    result = {"legs": {name: compare(got, expected, draws, saving_rank[name]) for name, got in legs.items()}}
    dist.barrier()
    if ranks.main:
        shutil.rmtree(root)
    return result
