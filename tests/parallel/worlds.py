"""One launch per world size: every check registered for a world size runs in one group of processes (gloo on
CPU), and each rank's results come back as JSON for the layout tests to assert on.

A check is ``fn(world) -> dict`` registered with :func:`check` in a ``tests/parallel/checks*.py`` module; it runs
on every rank of its world. The tests read ``run_world(world, folder)[name][rank]``.
"""

import json
import os
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

CHECKS: dict[int, dict[str, Callable]] = {}


def check(world: int):
    """Register ``fn`` as a check of ``world`` ranks."""

    def register(fn: Callable) -> Callable:
        CHECKS.setdefault(world, {})[fn.__name__] = fn
        return fn

    return register


def import_checks() -> None:
    """Import every ``tests/parallel/checks*.py`` module, which registers its checks."""
    import importlib
    import pkgutil

    import tests.parallel

    for module in pkgutil.iter_modules(tests.parallel.__path__):
        if module.name.startswith("checks"):
            importlib.import_module(f"tests.parallel.{module.name}")


def _rank_main(rank: int, world: int, folder: str) -> None:
    import_checks()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    results = {}
    for name, fn in CHECKS[world].items():
        try:
            results[name] = fn(world)
        except Exception:
            results[name] = {"error": traceback.format_exc()}
        dist.barrier()
    Path(folder, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def run_world(world: int, folder: Path) -> dict[str, list[dict]]:
    """Run every check of ``world`` ranks in one launch; ``{check: [result of rank 0, rank 1, ...]}``."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.multiprocessing.start_processes(_rank_main, args=(world, str(folder)), nprocs=world, start_method="spawn")
    per_rank = [json.loads(Path(folder, f"rank{r}.json").read_text()) for r in range(world)]
    return {name: [results[name] for results in per_rank] for name in per_rank[0]}
