"""DCP checks run inside the launched processes (``worlds.run_world``): a training checkpoint saved by 4 ranks in one
layout (tp2 ep2) resumes in the same layout, in two others at 4 ranks (dp4, ep4), at 2 ranks and in one process into
the uninterrupted run's next step; a failed write on one rank leaves nothing; ``league convert`` by 2 ranks writes
what one process writes."""

import contextlib
import copy
import errno
import filecmp
import json
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
from league.parallel.dims import ParallelConfig
from league.parallel.launch import Ranks
from league.parallel.parallelize import full_parameters, parallelize_qwen3_5_moe, pipeline_parameters
from league.parallel.pipeline import Pipeline
from league.rl import checkpoints
from league.rl.data import PromptSampler
from league.tokenizer import build_tiny_tokenizer
from tests.parallel.checks import ARGS, GBS, build, layout, parallel_policy, rel, sharded_policy, trainer
from tests.parallel.worlds import check
from tests.rl.test_trainer import make_samples

FIRST, SECOND = make_samples(GBS, ARGS.vocab_size, seed=11), make_samples(GBS, ARGS.vocab_size, seed=12)


def shared_folder(ranks: Ranks) -> Path:
    """A fresh temporary folder, the same on every rank."""
    return Path(ranks.broadcast(tempfile.mkdtemp(prefix="league-dcp-") if ranks.main else None))


def sampler() -> PromptSampler:
    return PromptSampler(10, 3, shuffle=True, seed=3)


SAVED = {"tp": 2, "ep": 2}
"""The layout the checkpoint is saved in: 2 token groups of 2 ranks, experts split over pairs of ranks."""


def next_step(model, ref, ranks: Ranks, root: Path, pipelines=(None, None)) -> dict:
    """Resume from ``root`` (the checkpoint's train state) and run what comes next: an RNG draw, the sampler's next
    batch, and the second optimizer step, as the loop does."""
    run = trainer(model, ref, ranks, offload=True, pipelines=pipelines)
    prompts = sampler()
    start = checkpoints.resume(root, run, prompts, ranks)
    return {
        "start": start,
        "draw": torch.rand(3).tolist(),
        "batch": prompts.next_batch(),
        "metrics": run.train(ranks.step_share(SECOND, GBS)),
        "params": whole_parameters(model, ranks),
    }


def whole_parameters(model, ranks: Ranks) -> dict[str, torch.Tensor]:
    """The policy's parameters, whole, on every rank (with pipeline stages, every stage's)."""
    if ranks.pp_group is None:
        return dict(full_parameters(model))
    return dict(pipeline_parameters(model, ranks.stage, ranks.pp_size, ranks.pp_group, torch.device("cpu")))


def resumed(ranks: Ranks, sizes: dict, root: Path) -> dict:
    """The policy built from the checkpoint as the loop builds it (whole on each rank, then parallelized for the
    layout ``sizes`` of ``ranks``, the reference copied before), then :func:`next_step`."""
    model, _ = checkpoints.load_policy(root, torch.device("cpu"), torch.float32)
    ref = copy.deepcopy(model).requires_grad_(False)
    pipelines = (None, None)
    if ranks.world > 1:
        dims = ParallelConfig(**sizes).resolve(ranks.world)
        meshes = (ranks.stage_mesh, ranks.expert_mesh, ranks.token_group)
        runs = [parallelize_qwen3_5_moe(m, dims, False, *meshes, stage=ranks.stage) for m in (model, ref)]
        if dims.pp > 1:
            pipelines = tuple(Pipeline(m, ranks.stage, dims.pp, ranks.pp_group) for m in runs)
    return next_step(model, ref, ranks, root, pipelines)


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


def saved_between_steps(world: int, sizes: dict) -> tuple[Ranks, Path, Path, dict, list]:
    """One step at ``world`` ranks in the layout ``sizes`` (fp32 masters offloaded, KL reference sharded), a
    checkpoint into a fresh folder shared by the ranks, then the next step as the uninterrupted run takes it. Returns
    the ranks, the folder, the checkpoint, what the uninterrupted run did next (the sampler's batch, the step's
    metrics, the whole parameters) and every rank's RNG draw after the save."""
    ranks, _ = layout(world, **sizes)
    root = shared_folder(ranks)
    model, ref, pipes = parallel_policy(world, **sizes)
    run = trainer(model, ref, ranks, offload=True, pipelines=pipes)
    run.train(ranks.step_share(FIRST, GBS))
    prompts = sampler()
    prompts.next_batch()
    torch.manual_seed(100 + ranks.rank)  # RNG states that differ between ranks
    saved = checkpoints.save_checkpoint(root, 0, model, run, prompts, build_tiny_tokenizer(), ranks)
    draws = ranks.gather_blocks([torch.rand(3).tolist()])
    expected = {
        "batch": prompts.next_batch(),
        "metrics": run.train(ranks.step_share(SECOND, GBS)),
        "params": whole_parameters(model, ranks),
    }
    return ranks, root, saved, expected, draws


@check(world=4)
def dcp_resume_across_layouts(world: int) -> dict:
    """One step at 4 ranks in the ``SAVED`` layout (fp32 masters offloaded, KL reference sharded), a checkpoint, then
    the next step: run uninterrupted, and resumed from the checkpoint in the same layout, at 4 ranks as dp4 (FSDP2
    only) and ep4, at 2 (two pairs of ranks, each its own data-parallel run) and in one process (rank 0)."""
    ranks, root, saved, expected, draws = saved_between_steps(world, SAVED)
    pairs = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pair", "dp"))["dp"]
    legs = {
        "tp2_ep2": resumed(ranks, SAVED, root),
        "dp4": resumed(layout(world)[0], {}, root),
        "ep4": resumed(layout(world, ep=4)[0], {"ep": 4}, root),
        "dp2": resumed(Ranks(rank=pairs.get_local_rank(), world=2, mesh=pairs), {}, root),
    }
    if ranks.main:  # one process: rank 0 alone (the others would only repeat it)
        legs["one"] = resumed(Ranks(), {}, root)
    saving_rank = {"tp2_ep2": ranks.rank, "dp4": ranks.rank, "ep4": ranks.rank, "dp2": pairs.get_local_rank(), "one": 0}
    result = {
        "legs": {name: compare(got, expected, draws, saving_rank[name]) for name, got in legs.items()},
        "root": sorted(p.name for p in root.iterdir()),
        "files": sorted(p.name for p in saved.iterdir()),
    }
    dist.barrier()
    if ranks.main:
        shutil.rmtree(root)
    return result


@check(world=2)
def dcp_pp2_resume_as_pp2_and_one(world: int) -> dict:
    """One step with 2 pipeline stages, a checkpoint (each stage saves the parameters and optimizer state it holds),
    then the next step: uninterrupted, resumed with 2 stages, and resumed in one process (rank 0)."""
    ranks, root, _, expected, draws = saved_between_steps(world, {"pp": 2})
    legs = {"pp2": resumed(ranks, {"pp": 2}, root)}
    if ranks.main:
        legs["one"] = resumed(Ranks(), {}, root)
    saving_rank = {"pp2": ranks.rank, "one": 0}
    result = {"legs": {name: compare(got, expected, draws, saving_rank[name]) for name, got in legs.items()}}
    dist.barrier()
    if ranks.main:
        result["config"] = json.loads((root / "step_000001" / "config.json").read_text())["mtp_num_hidden_layers"]
        shutil.rmtree(root)
    return result


@check(world=4)
def dcp_failed_write_leaves_nothing(world: int) -> dict:
    """A checkpoint whose write fails on one rank: in DCP's write on rank 2 (a full disk), then in rank 0's own files
    after DCP's: every rank raises, and the folder of checkpoints holds what it held before."""
    ranks, _ = layout(world)
    root = shared_folder(ranks)
    model, ref = sharded_policy(world)
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
def dcp_convert_two_ranks_equal_one(world: int) -> dict:
    """hf-to-dcp and dcp-to-hf (several output shards) by 2 ranks and by one process, from a checkpoint with an MTP
    layer: the same tensors in DCP, byte-identical Hugging Face files, and each rank wrote a share."""
    ranks, _ = layout(world)
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


def sharded_load(world: int, **sizes) -> dict:
    """``--load`` across ranks as the loop does it: the policy built on the meta device, placed for the layout, each
    rank reading only its shards (policy and KL reference), the engine's empty copy filled by the first sync; against
    the checkpoint's weights read whole."""
    from league.config import apply_overrides
    from league.engine.config import EngineConfig
    from league.engine.engine import LLMEngine
    from league.recipes import get_recipe
    from league.rl.setup import build_policy, materialize, place_policy, sync_weights

    ranks, dims = layout(world, **sizes)
    root = shared_folder(ranks)
    if ranks.main:
        save_hf(build(3), root / "hf", tokenizer_from=build_tiny_tokenizer())
        hf_to_dcp(root / "hf", root / "dcp")
    dist.barrier()
    job = apply_overrides(get_recipe("tiny"), {"load": str(root / "dcp"), "use_kl_loss": True, "recompute": False})
    whole = dict(build(3).named_parameters())
    model, _ = build_policy(job.model, 0, job.checkpoint.load, on_meta=True)
    on_meta = all(p.is_meta for p in model.parameters())
    placed = place_policy(model, job, dims, ranks, torch.device("cpu"))
    materialize(placed.engine_model, torch.device("cpu"))  # the engine's copy, made on the meta device: allocated
    engine = LLMEngine(placed.engine_model, EngineConfig(max_running_requests=4, context_length=64, num_slots=4))
    sync_weights(engine, model, None, ranks)
    policy, ref = whole_parameters(model, ranks), whole_parameters(placed.ref_model, ranks)
    synced = dict(engine.model.named_parameters())
    result = {
        "built_on_meta": on_meta,
        "sharded": any(isinstance(p, torch.distributed.tensor.DTensor) for p in model.parameters()),
        "policy": policy.keys() == whole.keys() and all(torch.equal(policy[n], whole[n]) for n in whole),
        "ref": ref.keys() == whole.keys() and all(torch.equal(ref[n], whole[n]) for n in whole),
        "engine": all(torch.equal(synced[n].detach(), whole[n]) for n in whole),
        "rope": torch.equal(engine.model.inv_freq, build().inv_freq),
    }
    if placed.pipeline is not None and placed.pipeline.last:
        result["mtp_embedding"] = torch.equal(placed.pipeline.module.mtp_embedding, whole["tok_embeddings.weight"])
    dist.barrier()
    if ranks.main:
        shutil.rmtree(root)
    return result


@check(world=4)
def sharded_load_pp2_ep2(world: int) -> dict:
    return sharded_load(world, pp=2, ep=2)


@check(world=4)
def sharded_load_tp2_ep2(world: int) -> dict:
    return sharded_load(world, tp=2, ep=2)
