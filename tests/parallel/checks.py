"""The checks run inside the launched processes (``worlds.run_world``): each builds the same tiny model on every
rank, runs the one-process computation and the sharded one side by side, and returns how far apart they are."""

import copy
import functools
import os

import torch

from league.models.qwen3_5_moe import Transformer
from league.models.qwen3_5_moe.presets import TINY
from league.parallel.blocks import in_blocks
from league.parallel.dims import ParallelConfig, ParallelDims
from league.parallel.launch import Ranks, make_ranks
from league.parallel.parallelize import full_parameters, parallelize_qwen3_5_moe
from league.parallel.pipeline import Pipeline
from league.parallel.recompute import Recompute
from league.rl.optim import OptimConfig
from league.rl.trainer import AlgorithmConfig, TrainConfig, Trainer
from tests.parallel.worlds import check
from tests.rl.test_trainer import make_samples

# head and expert counts divisible by 4, so that every layout up to 4 ranks splits them
ARGS = TINY.replace(
    vocab_size=96,
    dim=64,
    num_heads=4,
    num_kv_heads=4,
    head_dim=16,
    linear_num_key_heads=4,
    linear_num_value_heads=8,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    num_experts=8,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
)
GBS = 8
BUDGET = 32  # tokens per micro-batch: several micro-batches, a different number on each rank (3 and 2)


def build(seed: int = 0) -> Transformer:
    model = Transformer(ARGS)
    model.init_weights(seed, std=0.05)
    return model.to(torch.float64 if os.environ.get("LEAGUE_CHECK_FP64") else torch.float32)


def trainer(
    model: Transformer, ref: Transformer, ranks: Ranks | None = None, offload: bool = False, pipelines=(None, None)
) -> Trainer:
    """The step's trainer (``offload``: fp32 masters on the CPU, beside the parameters; ``pipelines``: the policy's
    and the reference's stage, with pipeline parallelism)."""
    ranks = ranks or Ranks()
    return Trainer(
        model,
        TrainConfig(global_batch_size=GBS, max_tokens_per_gpu=BUDGET, recompute=False),
        AlgorithmConfig(
            eps_clip_high=0.28,
            enable_mtp_training=True,
            use_kl_loss=True,
            kl_loss_coef=0.1,
            entropy_coef=0.01,
            use_tis=True,
        ),
        # Adam's epsilon large enough that its first update is smooth in the gradient: with a tiny epsilon the update
        # of an element whose gradient is near 0 is near its sign, which rounding flips
        OptimConfig(lr=1e-2, weight_decay=0.01, clip_grad=1.0, adam_eps=1e-3, optimizer_cpu_offload=offload),
        total_steps=4,
        group=ranks.data_group,
        ref_model=ref,
        shard_group=ranks.group,
        loss_scale=1 / ranks.token_size,
        pipeline=pipelines[0],
        ref_pipeline=pipelines[1],
    )


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@functools.cache
def layout(world: int, ep: int = 1, tp: int = 1, cp: int = 1, pp: int = 1, etp: int = 1) -> tuple[Ranks, ParallelDims]:
    """The ranks (meshes made once per layout) and dims of a layout of ``world`` ranks."""
    dims = ParallelConfig(ep=ep, tp=tp, cp=cp, pp=pp, etp=etp).resolve(world)
    return make_ranks("cpu", world, ep, tp * cp, pp, etp), dims


def parallel_policy(world: int, recompute: bool | Recompute = False, seed: int = 0, **sizes) -> tuple:
    """The policy and a (different) reference model, each parallelized for the layout as a run does, and their
    pipeline stages (``(None, None)`` without pipeline parallelism)."""
    ranks, dims = layout(world, **sizes)
    model, ref = build(seed), build(seed + 1).requires_grad_(False)
    meshes = (ranks.stage_mesh, ranks.expert_mesh, ranks.token_group)
    runs = parallelize_qwen3_5_moe(model, dims, recompute, *meshes, stage=ranks.stage)
    ref_runs = parallelize_qwen3_5_moe(ref, dims, False, *meshes, stage=ranks.stage)
    if dims.pp == 1:
        return model, ref, (None, None)
    pipes = (Pipeline(m, ranks.stage, dims.pp, ranks.pp_group) for m in (runs, ref_runs))
    return model, ref, tuple(pipes)


def sharded_policy(world: int, recompute: bool = False, seed: int = 0, **sizes) -> tuple[Transformer, Transformer]:
    """The policy and a (different) reference model, each parallelized for the layout (without pipeline stages)."""
    return parallel_policy(world, recompute, seed, **sizes)[:2]


def train_step(world: int, recompute: bool | Recompute = False, **sizes) -> dict:
    """One optimizer step (MTP, KL, entropy and TIS terms on) at one process and at the layout (``sizes``: ep, tp,
    cp, pp, etp): the metrics, the gathered gradients and the updated parameters. With pipeline stages, each rank
    compares the parameters its stage holds, and the whole-vector errors add up the stages' squared sums."""
    ranks, _ = layout(world, **sizes)
    samples = make_samples(GBS, ARGS.vocab_size, seed=3)
    single = build()
    single_trainer = trainer(single, build(1).requires_grad_(False))
    expected = single_trainer.train(samples)
    grads = {n: p.grad for n, p in single.named_parameters() if p.grad is not None}

    model, ref, pipes = parallel_policy(world, recompute, **sizes)
    sharded_trainer = trainer(model, ref, ranks, pipelines=pipes)
    mine = ranks.step_share(samples, GBS)
    got = sharded_trainer.train(mine)
    grad_errors, param_errors = {}, {}
    squares = torch.zeros(4, dtype=torch.float64)  # |grad - ref|^2, |ref grad|^2, |param - ref|^2, |ref param|^2
    for (name, param), (_, grad) in zip(full_parameters(model), gathered_grads(model)):
        reference = dict(single.named_parameters())[name].detach()
        param_errors[name] = rel(param, reference)
        squares[2:] += torch.stack([sq(param - reference), sq(reference)])
        if name in grads:
            grad_errors[name] = rel(grad, grads[name])
            squares[:2] += torch.stack([sq(grad - grads[name]), sq(grads[name])])
    if ranks.pp_group is not None:  # the stages' parameters are disjoint
        torch.distributed.all_reduce(squares, group=ranks.pp_group)
        for errors in (grad_errors, param_errors):
            stages = [None] * ranks.pp_size
            torch.distributed.all_gather_object(stages, errors, group=ranks.pp_group)
            errors.update({k: v for stage in stages for k, v in stage.items()})
    embedding_copy = None  # the last stage's copy of the embedding, for the MTP head: the updated one
    if pipes[0] is not None and pipes[0].last:
        embedding_copy = rel(pipes[0].module.mtp_embedding, single.tok_embeddings.weight.detach())
    return {
        "metrics": {k: [got[k], v] for k, v in expected.items()},
        "embedding_copy_error": embedding_copy,
        "grad_error": float((squares[0] / squares[1]).sqrt()),
        "param_error": float((squares[2] / squares[3]).sqrt()),
        "grad_errors": grad_errors,
        "param_errors": param_errors,
        "num_grads": len(grads),
        "num_params": sum(1 for _ in single.parameters()),
        "micro_batches": len(sharded_trainer._micro_batches(mine, BUDGET)),
    }


def sq(x: torch.Tensor) -> torch.Tensor:
    return x.double().square().sum()


def gathered_grads(model: Transformer):
    for name, param in model.named_parameters():
        grad = param.grad
        yield name, None if grad is None else (in_blocks(grad).full_tensor() if hasattr(grad, "full_tensor") else grad)


@check(world=2)
def dp2_train_step(world: int) -> dict:
    return train_step(world)


@check(world=2)
def ep2_train_step(world: int) -> dict:
    return train_step(world, ep=2, recompute=True)


@check(world=4)
def ep4_train_step(world: int) -> dict:
    return train_step(world, ep=4)


@check(world=4)
def dp4_ep2_train_step(world: int) -> dict:
    return train_step(world, ep=2)


@check(world=2)
def tp2_train_step(world: int) -> dict:
    return train_step(world, tp=2)


@check(world=2)
def cp2_train_step(world: int) -> dict:
    return train_step(world, cp=2, recompute=True)


@check(world=4)
def dp2_tp2_train_step(world: int) -> dict:
    return train_step(world, tp=2)


@check(world=4)
def tp2_cp2_train_step(world: int) -> dict:
    return train_step(world, tp=2, cp=2)


@check(world=4)
def tp2_ep2_train_step(world: int) -> dict:
    return train_step(world, tp=2, ep=2)


@check(world=4)
def cp2_ep2_train_step(world: int) -> dict:
    return train_step(world, cp=2, ep=2)


@check(world=4)
def tp2_cp2_ep4_train_step(world: int) -> dict:
    return train_step(world, tp=2, cp=2, ep=4)


@check(world=2)
def etp2_train_step(world: int) -> dict:
    return train_step(world, etp=2)


@check(world=4)
def ep2_etp2_train_step(world: int) -> dict:
    return train_step(world, ep=2, etp=2)


@check(world=4)
def tp2_etp2_train_step(world: int) -> dict:
    return train_step(world, tp=2, etp=2)


def logprobs(world: int, **sizes) -> dict:
    """Forward-only log-probs (the old and the reference policy's) of each rank's samples, gathered in order, equal
    the one-process ones."""
    ranks, _ = layout(world, **sizes)
    samples = make_samples(2 * GBS, ARGS.vocab_size, seed=5)
    single = build()
    expected = trainer(single, build(1)).compute_logprobs(samples)
    model, ref, pipes = parallel_policy(world, **sizes)
    sharded = trainer(model, ref, ranks, pipelines=pipes)
    # the ranks of a token group and the stages of a pipeline share their samples (only the last stage has the
    # log-probs): every data-parallel rank's block gathered in order
    dp_block = Ranks(rank=ranks.dp_rank, world=ranks.dp_size)
    got = [lp.tolist() for lp in sharded.compute_logprobs(dp_block.block(samples))]
    keep = ranks.rank % ranks.token_size == 0 and ranks.stage == ranks.pp_size - 1
    blocks = ranks.gather_blocks([(keep, ranks.dp_rank, got)])
    got = [lp for _, _, lps in sorted((b for b in blocks if b[0]), key=lambda b: b[1]) for lp in lps]
    return {"errors": [rel(torch.tensor(g, dtype=e.dtype), e) for g, e in zip(got, expected)], "count": len(got)}


@check(world=2)
def dp2_logprobs(world: int) -> dict:
    return logprobs(world)


@check(world=2)
def ep2_logprobs(world: int) -> dict:
    return logprobs(world, ep=2)


@check(world=2)
def tp2_logprobs(world: int) -> dict:
    return logprobs(world, tp=2)


@check(world=4)
def dp2_tp2_logprobs(world: int) -> dict:
    return logprobs(world, tp=2)


@check(world=4)
def ep2_etp2_logprobs(world: int) -> dict:
    return logprobs(world, ep=2, etp=2)


@check(world=2)
def ep2_engine_replica_sync(world: int) -> dict:
    """After a sharded step, the engine's whole replica, synced by ``setup.sync_weights``, holds the policy's
    updated weights exactly (and differs from the weights before the step)."""
    from league.engine.config import EngineConfig
    from league.engine.engine import LLMEngine
    from league.rl.setup import sync_weights

    ranks, dims = layout(world, ep=2)
    model = build()
    replica = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in replica.named_parameters()}
    parallelize_qwen3_5_moe(model, dims, False, ranks.mesh, ranks.expert_mesh)
    step = trainer(model, build(1).requires_grad_(False), ranks)
    step.train(ranks.step_share(make_samples(GBS, ARGS.vocab_size, seed=7), GBS))
    engine = LLMEngine(replica, EngineConfig(max_running_requests=4, context_length=64, num_slots=4))
    sync_weights(engine, model, run_dir=None)
    synced = {n: p.detach() for n, p in engine.model.named_parameters()}
    full = dict(full_parameters(model))
    return {
        "equal": all(torch.equal(synced[n], full[n]) for n in full),
        "changed": sum(not torch.equal(synced[n], before[n]) for n in full),
        "count": len(full),
    }


@check(world=2)
def pp2_train_step(world: int) -> dict:
    return train_step(world, pp=2)


@check(world=2)
def ep2_uniform2_train_step(world: int) -> dict:
    """Recompute in runs of 2 layers (FSDP2 gathers each layer's shards again inside the run's recompute)."""
    return train_step(world, ep=2, recompute=Recompute("full", "uniform", 2))


@check(world=2)
def pp2_uniform2_train_step(world: int) -> dict:
    """Runs of 2 layers within each pipeline stage's own layers."""
    return train_step(world, pp=2, recompute=Recompute("full", "uniform", 2))


@check(world=2)
def pp2_logprobs(world: int) -> dict:
    return logprobs(world, pp=2)


@check(world=4)
def pp2_ep2_train_step(world: int) -> dict:
    return train_step(world, recompute=True, pp=2, ep=2)


@check(world=4)
def dp2_pp2_logprobs(world: int) -> dict:
    return logprobs(world, pp=2)


@check(world=2)
def pp2_engine_replica_sync(world: int) -> dict:
    """After a step with 2 pipeline stages, the engine's whole replica on each rank, synced by
    ``setup.sync_weights``, holds every stage's updated weights exactly."""
    from league.engine.config import EngineConfig
    from league.engine.engine import LLMEngine
    from league.parallel.parallelize import pipeline_parameters
    from league.rl.setup import sync_weights

    ranks, _ = layout(world, pp=2)
    replica = build()
    before = {n: p.detach().clone() for n, p in replica.named_parameters()}
    model, ref, pipes = parallel_policy(world, pp=2)
    trainer(model, ref, ranks, pipelines=pipes).train(ranks.step_share(make_samples(GBS, ARGS.vocab_size, seed=7), GBS))
    engine = LLMEngine(replica, EngineConfig(max_running_requests=4, context_length=64, num_slots=4))
    sync_weights(engine, model, None, ranks)
    synced = {n: p.detach() for n, p in engine.model.named_parameters()}
    full = dict(pipeline_parameters(model, ranks.stage, ranks.pp_size, ranks.pp_group, torch.device("cpu")))
    return {
        "equal": full.keys() == synced.keys() and all(torch.equal(synced[n], full[n]) for n in full),
        "changed": sum(not torch.equal(synced[n], before[n]) for n in full),
        "count": len(full),
    }
