"""Expert tensor parallelism's checks beyond the train step and the log-probs (``checks.py``): a training checkpoint
saved by 4 ranks in ep2 etp2 (the experts' fused gate/up weight held as two blocks per rank) resumes in the same
layout and in one process into the uninterrupted run's next step."""

import shutil

import torch
import torch.distributed as dist

from league.parallel.launch import Ranks
from league.parallel.parallelize import full_parameters
from league.rl import checkpoints
from league.tokenizer import build_tiny_tokenizer
from tests.parallel.checks import GBS, layout, sharded_policy, trainer
from tests.parallel.checks_dcp import FIRST, SECOND, compare, resumed, sampler, shared_folder
from tests.parallel.worlds import check

SAVED = {"ep": 2, "etp": 2}


@check(world=4)
def dcp_resume_from_ep2_etp2(world: int) -> dict:
    """One step at 4 ranks in ep2 etp2 (fp32 masters offloaded, KL reference sharded), a checkpoint, then the next
    step: run uninterrupted, and resumed from the checkpoint in ep2 etp2 and in one process (rank 0)."""
    ranks, _ = layout(world, **SAVED)
    root = shared_folder(ranks)
    model, ref = sharded_policy(world, **SAVED)
    run = trainer(model, ref, ranks, offload=True)
    run.train(ranks.step_share(FIRST, GBS))
    prompts = sampler()
    prompts.next_batch()
    torch.manual_seed(100 + ranks.rank)
    checkpoints.save_checkpoint(root, 0, model, run, prompts, build_tiny_tokenizer(), ranks)
    draws = ranks.gather_blocks([torch.rand(3).tolist()])
    expected = {
        "batch": prompts.next_batch(),
        "metrics": run.train(ranks.step_share(SECOND, GBS)),
        "params": dict(full_parameters(model)),
    }
    legs = {"ep2_etp2": resumed(ranks, SAVED, root)}
    if ranks.main:
        legs["one"] = resumed(Ranks(), {}, root)
    saving_rank = {"ep2_etp2": ranks.rank, "one": 0}
    result = {"legs": {name: compare(got, expected, draws, saving_rank[name]) for name, got in legs.items()}}
    dist.barrier()
    if ranks.main:
        shutil.rmtree(root)
    return result
