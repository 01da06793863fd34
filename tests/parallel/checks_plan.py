"""What each rank of a real launch holds once the policy is placed (gloo, real tensors), for the memory plan's test
(``test_plan.py``) to compare with the plan made in one process over a fake process group."""

from torch.distributed.tensor import DTensor

from league.rl.optim import OptimConfig, Optimizer
from tests.parallel.checks import sharded_policy
from tests.parallel.worlds import check

LAYOUTS = {"dp4": {}, "ep2": {"ep": 2}, "ep4": {"ep": 4}, "tp2_ep2": {"tp": 2, "ep": 2}}
"""The world-4 layouts whose shards are counted (``sharded_policy``'s sizes)."""


@check(world=4)
def shard_sizes(world: int) -> dict:
    """For each layout: the elements of this rank's local shards, the bytes of the storage FSDP2 allocated for them
    (each shard is a view of its padded storage), and the elements the optimizer keeps fp32 state for."""
    results = {}
    for name, sizes in LAYOUTS.items():
        model, _ = sharded_policy(world, **sizes)
        params = list(model.named_parameters())
        locals_ = [p.to_local() if isinstance(p, DTensor) else p for _, p in params]
        optimizer = Optimizer(params, OptimConfig(optimizer_cpu_offload=True))
        results[name] = {
            "local": sum(t.numel() for t in locals_),
            "storage_bytes": sum(t.untyped_storage().nbytes() for t in locals_),
            "masters": sum(m.numel() for m in optimizer.masters),
            "master_grads": sum(m.numel() for m in optimizer.master_grads),
        }
    return results
