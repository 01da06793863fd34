"""The checks run inside the launched processes (``worlds.run_world``): each builds the same tiny model on every
rank, runs the one-process computation and the sharded one side by side, and returns how far apart they are."""

import copy

import torch

from league.models.qwen3_5_moe import Transformer
from league.models.qwen3_5_moe.presets import TINY
from league.parallel.launch import Ranks
from league.parallel.parallelize import apply_fsdp, full_parameters
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
    return model.float()


def trainer(model: Transformer, ref: Transformer, ranks: Ranks | None = None, offload: bool = False) -> Trainer:
    """The step's trainer (``offload``: fp32 masters on the CPU, beside the parameters)."""
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
        group=None if ranks is None else ranks.group,
        ref_model=ref,
    )


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def sharded_policy(ranks: Ranks, seed: int = 0) -> tuple[Transformer, Transformer]:
    """The policy and a (different) reference model, sharded with FSDP2 over the ranks."""
    model, ref = build(seed), build(seed + 1).requires_grad_(False)
    apply_fsdp(model, ranks.mesh)
    apply_fsdp(ref, ranks.mesh)
    return model, ref


@check(world=2)
def dp_train_step(ranks: Ranks) -> dict:
    """One optimizer step (MTP, KL, entropy and TIS terms on) at one process and at FSDP2 over the ranks: the
    metrics, the gathered gradients and the updated parameters."""
    samples = make_samples(GBS, ARGS.vocab_size, seed=3)
    single = build()
    single_trainer = trainer(single, build(1).requires_grad_(False))
    expected = single_trainer.train(samples)
    grads = {n: p.grad for n, p in single.named_parameters() if p.grad is not None}

    model, ref = sharded_policy(ranks)
    sharded_trainer = trainer(model, ref, ranks)
    mine = ranks.step_share(samples, GBS)
    got = sharded_trainer.train(mine)
    grad_errors, param_errors = {}, {}
    for (name, param), (_, grad) in zip(full_parameters(model), gathered_grads(model)):
        param_errors[name] = rel(param, dict(single.named_parameters())[name].detach())
        if name in grads:
            grad_errors[name] = rel(grad, grads[name])
    return {
        "metrics": {k: [got[k], v] for k, v in expected.items()},
        "grad_errors": grad_errors,
        "param_errors": param_errors,
        "num_grads": len(grads),
        "num_params": sum(1 for _ in single.parameters()),
        "micro_batches": len(sharded_trainer._micro_batches(mine, BUDGET)),
    }


def gathered_grads(model: Transformer):
    for name, param in model.named_parameters():
        grad = param.grad
        yield name, None if grad is None else (grad.full_tensor() if hasattr(grad, "full_tensor") else grad)


@check(world=2)
def dp_logprobs(ranks: Ranks) -> dict:
    """Forward-only log-probs (the old and the reference policy's) of each rank's samples, gathered in order, equal
    the one-process ones."""
    samples = make_samples(2 * GBS, ARGS.vocab_size, seed=5)
    single = build()
    expected = trainer(single, build(1)).compute_logprobs(samples)
    model, ref = sharded_policy(ranks)
    sharded = trainer(model, ref, ranks)
    mine = ranks.block(samples)
    got = ranks.gather_blocks([lp.tolist() for lp in sharded.compute_logprobs(mine)])
    return {"errors": [rel(torch.tensor(g, dtype=e.dtype), e) for g, e in zip(got, expected)], "count": len(got)}


@check(world=2)
def dp_engine_replica_sync(ranks: Ranks) -> dict:
    """After a sharded step, the engine's whole replica, synced by ``setup.sync_weights``, holds the policy's
    updated weights exactly (and differs from the weights before the step)."""
    from league.engine.config import EngineConfig
    from league.engine.engine import LLMEngine
    from league.rl.setup import sync_weights

    model = build()
    replica = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in replica.named_parameters()}
    apply_fsdp(model, ranks.mesh)
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
