"""DCP checks run inside the launched processes (``worlds.run_world``): a training checkpoint saved by 4 data-parallel
ranks resumes at 4, 2 and 1 ranks into the uninterrupted run's next step; a failed write on one rank leaves nothing;
``league convert`` by 2 ranks writes what one process writes."""

import contextlib
import copy
import errno
import filecmp
import shutil
import tempfile
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from league.checkpoint import dcp
from league.checkpoint.convert import dcp_to_hf, hf_to_dcp
from league.checkpoint.hf import save_hf
from league.parallel.launch import Ranks
from league.parallel.parallelize import apply_fsdp, full_parameters
from league.rl import checkpoints
from league.rl.data import PromptSampler
from league.tokenizer import build_tiny_tokenizer
from tests.parallel.checks import ARGS, GBS, build, rel, sharded_policy, trainer
from tests.parallel.worlds import check
from tests.rl.test_trainer import make_samples

FIRST, SECOND = make_samples(GBS, ARGS.vocab_size, seed=11), make_samples(GBS, ARGS.vocab_size, seed=12)


def shared_folder(ranks: Ranks) -> Path:
    """A fresh temporary folder, the same on every rank."""
    return Path(ranks.broadcast(tempfile.mkdtemp(prefix="league-dcp-") if ranks.main else None))


def sampler() -> PromptSampler:
    return PromptSampler(10, 3, shuffle=True, seed=3)


def next_step(model, ref, ranks: Ranks, root: Path) -> dict:
    """Resume from ``root`` (the checkpoint's train state) and run what comes next: an RNG draw, the sampler's next
    batch, and the second optimizer step, as the loop does."""
    run = trainer(model, ref, ranks if ranks.world > 1 else None, offload=True)
    prompts = sampler()
    start = checkpoints.resume(root, run, prompts, ranks)
    return {
        "start": start,
        "draw": torch.rand(3).tolist(),
        "batch": prompts.next_batch(),
        "metrics": run.train(ranks.step_share(SECOND, GBS)),
        "params": dict(full_parameters(model)),
    }


def resumed(ranks: Ranks, root: Path) -> dict:
    """The policy built from the checkpoint as the loop builds it (whole on each rank, then sharded, the reference
    copied before sharding), then :func:`next_step`."""
    model, _ = checkpoints.load_policy(root, torch.device("cpu"), torch.float32)
    ref = copy.deepcopy(model).requires_grad_(False)
    if ranks.world > 1:
        apply_fsdp(model, ranks.mesh)
        apply_fsdp(ref, ranks.mesh)
    return next_step(model, ref, ranks, root)


def compare(got: dict, expected: dict, draws: list[list[float]], rank: int) -> dict:
    return {
        "start": got["start"],
        "metric_errors": {k: abs(got["metrics"][k] - v) / max(abs(v), 1e-7) for k, v in expected["metrics"].items()},
        "param_error": max(rel(got["params"][n], p) for n, p in expected["params"].items()),
        "bitwise": got["metrics"] == expected["metrics"]
        and all(torch.equal(got["params"][n], p) for n, p in expected["params"].items()),
        "rng": got["draw"] == draws[rank % len(draws)],
        "sampler": got["batch"] == expected["batch"],
    }


@check(world=4)
def dcp_resume_dp4_at_4_2_and_1(ranks: Ranks) -> dict:
    """One step at 4 ranks (fp32 masters offloaded, KL reference sharded), a checkpoint, then the next step: run
    uninterrupted, and resumed from the checkpoint at 4 ranks, at 2 (two pairs of ranks, each its own run) and in one
    process (rank 0)."""
    root = shared_folder(ranks)
    model, ref = sharded_policy(ranks)
    run = trainer(model, ref, ranks, offload=True)
    run.train(ranks.step_share(FIRST, GBS))
    prompts = sampler()
    prompts.next_batch()
    torch.manual_seed(100 + ranks.rank)  # RNG states that differ between ranks
    saved = checkpoints.save_checkpoint(root, 0, model, run, prompts, build_tiny_tokenizer(), ranks)
    draws = ranks.gather_blocks([torch.rand(3).tolist()])
    expected = {
        "batch": prompts.next_batch(),
        "metrics": run.train(ranks.step_share(SECOND, GBS)),
        "params": dict(full_parameters(model)),
    }
    pairs = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pair", "dp"))["dp"]
    legs = {
        "4": resumed(ranks, root),
        "2": resumed(Ranks(rank=pairs.get_local_rank(), world=2, mesh=pairs), root),
    }
    if ranks.main:  # one process: rank 0 alone (the others would only repeat it)
        legs["1"] = resumed(Ranks(), root)
    saving_rank = {"4": ranks.rank, "2": pairs.get_local_rank(), "1": 0}
    result = {
        "legs": {world: compare(got, expected, draws, saving_rank[world]) for world, got in legs.items()},
        "root": sorted(p.name for p in root.iterdir()),
        "files": sorted(p.name for p in saved.iterdir()),
    }
    dist.barrier()
    if ranks.main:
        shutil.rmtree(root)
    return result


@check(world=4)
def dcp_failed_write_leaves_nothing(ranks: Ranks) -> dict:
    """A checkpoint whose write fails on one rank: in DCP's write on rank 2 (a full disk), then in rank 0's own files
    after DCP's: every rank raises, and the folder of checkpoints holds what it held before."""
    root = shared_folder(ranks)
    model, ref = sharded_policy(ranks)
    run = trainer(model, ref, ranks)
    tokenizer = build_tiny_tokenizer()
    checkpoints.save_checkpoint(root, 0, model, run, sampler(), tokenizer, ranks)
    before = sorted(p.name for p in root.iterdir())
    full = OSError(errno.ENOSPC, "No space left on device", "disk")
    errors = {}
    for case, failing_rank, target in (("dcp", 2, "torch.save"), ("main", 0, "league.checkpoint.hf.copy_tokenizer")):
        failing = mock.patch(target, side_effect=full) if ranks.rank == failing_rank else contextlib.nullcontext()
        try:
            with failing:
                checkpoints.save_checkpoint(root, 1, model, run, sampler(), tokenizer, ranks)
            errors[case] = None
        except (OSError, ValueError) as e:
            errors[case] = f"{type(e).__name__}: {e}"
        dist.barrier()
    after = sorted(p.name for p in root.iterdir())
    dist.barrier()
    if ranks.main:
        shutil.rmtree(root)
    return {"errors": errors, "before": before, "after": after}


@check(world=2)
def dcp_convert_two_ranks_equal_one(ranks: Ranks) -> dict:
    """hf-to-dcp and dcp-to-hf (several output shards) by 2 ranks and by one process, from a checkpoint with an MTP
    layer: the same tensors in DCP, byte-identical Hugging Face files, and each rank wrote a share."""
    root = shared_folder(ranks)
    if ranks.main:
        save_hf(build(), root / "hf", tokenizer_from=build_tiny_tokenizer())
    dist.barrier()
    shard = 200_000  # bytes: several output files, so that both ranks write some
    hf_to_dcp(root / "hf", root / "dcp2", group=ranks.group)
    dcp_to_hf(root / "dcp2", root / "hf2", group=ranks.group, max_shard_bytes=shard)
    result = None
    if ranks.main:
        hf_to_dcp(root / "hf", root / "dcp1")
        dcp_to_hf(root / "dcp1", root / "hf1", max_shard_bytes=shard)
        entries = dcp.list_tensors(root / "dcp1")
        one = {name: torch.empty(e.shape, dtype=e.dtype) for name, e in entries.items()}
        two = {name: torch.empty(e.shape, dtype=e.dtype) for name, e in dcp.list_tensors(root / "dcp2").items()}
        dcp.load_tensors(root / "dcp1", one)
        dcp.load_tensors(root / "dcp2", two)
        names = sorted(p.name for p in (root / "hf1").iterdir())
        result = {
            "dcp_equal": one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one),
            "dcp_files": sorted(p.name for p in (root / "dcp2").iterdir()),
            "num_mtp": sum(name.startswith("model.mtp.") for name in one),
            "hf_files": names,
            "hf_identical": names == sorted(p.name for p in (root / "hf2").iterdir())
            and all(filecmp.cmp(root / "hf1" / n, root / "hf2" / n, shallow=False) for n in names),
        }
    dist.barrier()
    if ranks.main:
        shutil.rmtree(root)
    return result or {}
