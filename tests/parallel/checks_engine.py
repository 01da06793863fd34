"""Engine checks run inside the launched processes (``worlds.run_world``): the engine laid out over the ranks
(``parallel.inference``) against the one-process engine on the same weights and prompts, and a trainer's weights
synced into an engine of another layout."""

import copy

import torch

from league.engine.config import EngineConfig
from league.engine.engine import LLMEngine
from league.engine.request import SamplingParams
from league.ops.numerics import Numerics
from league.parallel.inference import EngineLayout, make_engine_layout, place_engine_model
from league.parallel.launch import block_bounds
from league.parallel.parallelize import full_parameters
from league.rl import setup
from league.rl.optim import OptimConfig
from league.rl.sample import Sample
from league.rl.trainer import AlgorithmConfig, TrainConfig, Trainer
from tests.parallel.checks import ARGS, GBS, build, layout, sharded_policy
from tests.parallel.worlds import check
from tests.rl.test_trainer import make_samples

PROMPTS = [[3 + i, 17, 5 + 2 * i, 40, 9, 61 - i][: 2 + i % 5] for i in range(6)]


def generate(
    model, layout: EngineLayout | None = None, numerics: str = "batch_invariant", spec: bool = False, block=None
) -> list[tuple[list[int], list[float]]]:
    """Greedy outputs of the engine's block of ``PROMPTS`` (``block``: its bounds; default: by ``layout``'s engine
    among data-parallel engines), then two seeded temperature-1 samples of each: tokens and log-probs."""
    layout = layout or EngineLayout()
    config = EngineConfig(
        numerics=numerics,
        tp_size=layout.tp,
        ep_size=layout.ep,
        max_running_requests=8,
        context_length=64,
        speculative_algorithm="EAGLE" if spec else None,
    )
    engine = LLMEngine(model, config, layout=layout)
    start, stop = block or block_bounds(len(PROMPTS), layout.engine, layout.num_engines)
    prompts = PROMPTS[start:stop]
    greedy = SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True)
    sampled = SamplingParams(max_new_tokens=10, temperature=1.0, seed=7, ignore_eos=True)
    outs = engine.generate(prompts, greedy) + engine.generate(prompts, sampled, n=2)
    return [(o.output_ids, o.output_logprobs) for o in outs]


def compare(got, expected) -> dict:
    diffs = [abs(a - b) for (_, la), (_, lb) in zip(got, expected) for a, b in zip(la, lb)]
    return {
        "tokens_equal": [t for t, _ in got] == [t for t, _ in expected],
        "logprobs_equal": [lp for _, lp in got] == [lp for _, lp in expected],
        "max_logprob_diff": max(diffs, default=0.0),
        "num_outputs": len(got),
    }


def engine_equals_one_process(tp: int, ep: int, spec: bool = False) -> dict:
    """The laid-out engine's outputs against one process's on the same prompts: bitwise under batch-invariant
    numerics, within rounding under fast numerics; with ``spec``, its speculative greedy tokens against one
    process's plain greedy ones."""
    engine_layout = make_engine_layout(ARGS, tp, ep, "cpu")
    block = block_bounds(len(PROMPTS), engine_layout.engine, engine_layout.num_engines)
    result = {"engine": engine_layout.engine, "num_engines": engine_layout.num_engines, "block": block}
    for numerics in ("batch_invariant", "fast"):
        expected = generate(build(), None, numerics, block=block)
        got = generate(place_engine_model(build(), engine_layout), engine_layout, numerics)
        result[numerics] = compare(got, expected)
    if spec:
        plain = generate(build(), None, block=block)
        speculative = generate(place_engine_model(build(), engine_layout), engine_layout, spec=True)
        greedy = block[1] - block[0]
        result["spec_greedy_tokens_equal"] = [t for t, _ in speculative[:greedy]] == [t for t, _ in plain[:greedy]]
    return result


@check(2)
def engine_tp2(world: int) -> dict:
    return engine_equals_one_process(tp=2, ep=1)


@check(2)
def engine_ep2(world: int) -> dict:
    return engine_equals_one_process(tp=1, ep=2)


@check(2)
def engine_tp2_ep2(world: int) -> dict:
    return engine_equals_one_process(tp=2, ep=2, spec=True)


@check(2)
def engine_dp2(world: int) -> dict:
    """Two data-parallel engines of one rank each, each serving a block of the prompts."""
    return engine_equals_one_process(tp=1, ep=1)


@check(4)
def engine_ep4(world: int) -> dict:
    return engine_equals_one_process(tp=1, ep=4, spec=True)


@check(4)
def engine_tp4(world: int) -> dict:
    return engine_equals_one_process(tp=4, ep=1)


@check(4)
def engine_dp2_tp2_ep2(world: int) -> dict:
    """Two data-parallel engines, each over two ranks at tp2 and ep2."""
    return engine_equals_one_process(tp=2, ep=2)


def stepped_trainer(world: int):
    """A trainer of the policy sharded by FSDP2 over both ranks with its experts over ep2 (batch-invariant numerics),
    before its step; and the ranks."""
    ranks, _ = layout(world, ep=2)
    model, _ = sharded_policy(world, ep=2)
    trainer = Trainer(
        model,
        TrainConfig(global_batch_size=GBS, max_tokens_per_gpu=4096, recompute=False),
        AlgorithmConfig(eps_clip_high=0.28, enable_mtp_training=True),
        OptimConfig(lr=1e-2, adam_eps=1e-3),
        total_steps=2,
        numerics=Numerics("batch_invariant"),
        group=ranks.data_group,
        shard_group=ranks.group,
    )
    return trainer, ranks


def step(trainer: Trainer, ranks) -> None:
    trainer.train(ranks.step_share(make_samples(GBS, ARGS.vocab_size, seed=5), GBS))


def greedy_against_trainer(engine: LLMEngine, trainer: Trainer) -> tuple[list, float]:
    """The engine's greedy outputs of ``PROMPTS`` and the largest difference between their log-probs and the
    trainer's for the same tokens."""
    outs = engine.generate(PROMPTS, SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True))
    samples = [
        Sample(prompt_ids=o.prompt_ids, response_ids=o.output_ids, rollout_logprobs=o.output_logprobs, index=i)
        for i, o in enumerate(outs)
    ]
    engine_lp = torch.tensor([lp for o in outs for lp in o.output_logprobs], dtype=torch.float64)
    trainer_lp = torch.cat(trainer.compute_logprobs(samples)).double()
    return outs, float((engine_lp - trainer_lp).abs().max())


@check(2)
def sync_fsdp2_ep2_to_engine_tp2(world: int) -> dict:
    """A training step with the policy sharded by FSDP2 over both ranks and its experts over ep2, its weights synced
    into an engine at tp2 (``setup.sync_weights``): the engine's greedy tokens' log-probs against the trainer's for
    the same tokens, and against a one-process engine loaded with the same whole weights (bitwise)."""
    trainer, ranks = stepped_trainer(world)
    model = trainer.model
    step(trainer, ranks)
    engine_layout = make_engine_layout(ARGS, 2, 1, "cpu")
    engine_model = place_engine_model(build(seed=9), engine_layout)  # other weights: the sync must replace them
    config = EngineConfig(numerics="batch_invariant", tp_size=2, max_running_requests=8, context_length=64)
    engine = LLMEngine(engine_model, config, layout=engine_layout)
    setup.sync_weights(engine, model, None, ranks)
    outs, diff = greedy_against_trainer(engine, trainer)
    # one process: an engine on the whole trained weights
    whole = copy.deepcopy(build())
    with torch.no_grad():
        params = dict(whole.named_parameters())
        for name, tensor in full_parameters(model):
            params[name].copy_(tensor)
    single = LLMEngine(whole, EngineConfig(numerics="batch_invariant", max_running_requests=8, context_length=64))
    single_outs = single.generate(PROMPTS, SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True))
    return {
        "max_engine_trainer_diff": diff,
        "tokens_equal_one_process": [o.output_ids for o in outs] == [o.output_ids for o in single_outs],
        "logprobs_equal_one_process": [o.output_logprobs for o in outs] == [o.output_logprobs for o in single_outs],
        "step_changed_weights": any(
            not torch.equal(tensor, dict(build().named_parameters())[name]) for name, tensor in full_parameters(model)
        ),
    }


@check(2)
def engine_ep2_reads_fsdp2_ep2_experts_in_place(world: int) -> dict:
    """An engine at ep2 beside a trainer at FSDP2 + ep2 (FSDP2's expert unit over one rank): its expert blocks are
    the trainer's shards, read in place (``shared_expert_blocks``), so a sync copies only the rest; after a training
    step and a sync its log-probs equal the trainer's."""
    from league.parallel.inference import shared_expert_blocks

    trainer, ranks = stepped_trainer(world)
    model = trainer.model
    engine_layout = make_engine_layout(ARGS, 1, 2, "cpu")
    engine_model = place_engine_model(build(seed=9), engine_layout)
    config = EngineConfig(numerics="batch_invariant", ep_size=2, max_running_requests=8, context_length=64)
    engine = LLMEngine(engine_model, config, layout=engine_layout)
    engine.runner.shared = set(shared_expert_blocks(engine_model, model, engine_layout))
    setup.sync_weights(engine, model, None, ranks)
    step(trainer, ranks)
    setup.sync_weights(engine, model, None, ranks)
    trained = dict(model.named_parameters())
    shared = [(p, trained[n]) for n, p in engine_model.named_parameters() if n in engine.runner.shared]
    _, diff = greedy_against_trainer(engine, trainer)
    experts = {n for n, _ in engine_model.named_parameters() if ".experts." in n}
    return {
        "shared": sorted(engine.runner.shared),
        "all_experts_shared": engine.runner.shared == experts and bool(experts),
        "same_storage_after_step": all(p.data_ptr() == t.to_local().data_ptr() for p, t in shared),
        "max_engine_trainer_diff": diff,
    }
