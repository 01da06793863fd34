"""Building the pieces of a run from its JobConfig: the policy (and its placement across ranks), prompts, reward,
engine, and the run's bookkeeping (run folder, seeds, evaluation, rollout metrics).

Not responsible for the checks before a run (``rl.preflight``), for the order of the loop (``rl.loop``), for
checkpoints (``rl.checkpoints``) nor for the math of any step.
"""

import dataclasses
import random
import shutil
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from rich.console import Console

from league.config import EvalConfig, JobConfig, ModelConfig
from league.engine.engine import LLMEngine
from league.engine.request import SamplingParams
from league.models.qwen3_5_moe import Transformer
from league.parallel.dims import ParallelDims
from league.parallel.inference import EngineLayout
from league.parallel.launch import Ranks
from league.rl.metrics import METRICS_FILE
from league.rl.preflight import BUILTIN

STATUS = {"stop": "completed", "length": "truncated", "abort": "aborted"}


@dataclass(kw_only=True, slots=True)
class Prompt:
    """A prompt ready to generate from."""

    prompt_ids: list[int]
    label: str | None
    metadata: dict[str, Any] = field(default_factory=dict)


@contextmanager
def run_folder(path: Path, owner: bool = True) -> Iterator[Path]:
    """The run folder, created if absent. When the block fails before any step's metrics are written, a folder
    made here (with the parents made for it) is removed again; a folder that was already there is kept. Only the
    ``owner`` (rank 0 of a run across processes) creates and removes it."""
    if not owner:
        yield path
        return
    made = path
    while not made.parent.exists():
        made = made.parent
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except BaseException:
        if created and not (path / METRICS_FILE).exists():
            shutil.rmtree(made, ignore_errors=True)
        raise


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def set_num_threads(num_threads: int | None) -> None:
    """Run torch's CPU operators on ``num_threads`` threads (None: leave torch's setting as it is)."""
    if num_threads is not None:
        torch.set_num_threads(num_threads)


def build_policy(
    config: ModelConfig, seed: int, load: str | None = None, unsafe_pickle: bool = False, on_meta: bool = False
) -> tuple[Transformer, Any]:
    """The policy model and its tokenizer: a DCP checkpoint's (``load``, see ``rl.checkpoints.load_policy``; with
    ``on_meta``, on the meta device, read by :func:`place_policy` once placed), a Hugging Face checkpoint, or a
    randomly initialised preset (the settings checked by ``preflight.check_policy``)."""
    from league.checkpoint.hf import resolve_device_dtype

    device, dtype = resolve_device_dtype(config.device, config.dtype)
    if load:
        from league.rl.checkpoints import load_policy

        model, tokenizer = load_policy(load, device, dtype, config.mtp_num_layers, unsafe_pickle, on_meta)
    elif config.hf_checkpoint:
        from league.checkpoint.hf import load_model
        from league.tokenizer import load_tokenizer

        path = Path(config.hf_checkpoint)
        model = load_model(path, device=device, dtype=dtype)
        tokenizer = load_tokenizer(path)
    else:
        from league.models.qwen3_5_moe.presets import PRESETS
        from league.tokenizer import build_tiny_tokenizer

        tokenizer = build_tiny_tokenizer()
        model = Transformer(PRESETS[config.model_preset])
        model.init_weights(seed)
        model = model.to(device=device, dtype=dtype)
    if config.mtp_num_layers == 0:
        model.mtp, model.args = None, model.args.replace(mtp_num_layers=0)
    return model.eval(), tokenizer


def builtin_problems(spec: str, seed: int):
    from league.rl.tasks import make_problems

    return make_problems(spec.removeprefix(BUILTIN), num=100, seed=seed)


def render(tokenizer, question: str, apply_chat_template: bool) -> list[int]:
    if apply_chat_template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = question
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def load_prompts(data, tokenizer, seed: int) -> list[Prompt]:
    """Prompts of the training set (a JSONL/Parquet file, or ``builtin:<task>``)."""
    if data.prompt_data.startswith(BUILTIN):
        return [
            Prompt(prompt_ids=render(tokenizer, p.question, data.apply_chat_template), label=p.answer)
            for p in builtin_problems(data.prompt_data, seed)
        ]
    from league.rl.data import PromptDataset

    dataset = PromptDataset(data, tokenizer)
    return [Prompt(prompt_ids=r.prompt_ids, label=r.label, metadata=r.metadata) for r in dataset]


def make_sampler(data, num_prompts: int, batch_size: int):
    from league.rl.data import PromptSampler

    return PromptSampler(num_prompts, batch_size, shuffle=data.rollout_shuffle, seed=data.rollout_seed)


def load_eval_sets(config: EvalConfig, data, tokenizer, seed: int) -> dict[str, list[Prompt]]:
    sets = {}
    pairs = list(zip(config.eval_prompt_data[::2], config.eval_prompt_data[1::2]))
    for name, path in pairs:
        if path.startswith(BUILTIN):
            problems = builtin_problems(path, seed + 1)
            sets[name] = [
                Prompt(prompt_ids=render(tokenizer, p.question, data.apply_chat_template), label=p.answer)
                for p in problems
            ]
        else:
            sets[name] = load_prompts(dataclasses.replace(data, prompt_data=path), tokenizer, seed)
    return sets


def build_reward(config):
    from league.rl.rewards import RewardModel

    return RewardModel(config)


def describe_start(job: JobConfig, run_dir: Path, ranks: int = 1) -> str:
    """The first console line of a run: what it is, where it writes, and that the policy is being built."""
    config = job.model
    if job.checkpoint.load:
        source = f"checkpoint {job.checkpoint.load}"
    else:
        source = config.hf_checkpoint or f"preset {config.model_preset}, random init"
    threads = f"{torch.get_num_threads()} CPU threads"
    if ranks > 1:
        threads += f" on each of {ranks} ranks"
    return (
        f"league train: recipe {job.recipe}, seed {job.run.seed}, {threads}, "
        f"run folder {run_dir}; building the policy ({source}) ..."
    )


def describe_plan(job: JobConfig, model: Transformer) -> str:
    """What the run will do with the built policy: the warm-up (when there is one) and the rollout steps."""
    num_params = sum(p.numel() for p in model.parameters())
    steps = [
        f"{job.rollout.num_rollout} GRPO steps of {job.rollout.rollout_batch_size} prompts x "
        f"{job.rollout.n_samples_per_prompt} samples"
    ]
    if job.model.sft_warmup_steps and not job.checkpoint.load:
        steps.insert(
            0,
            f"a supervised warm-up of {job.model.sft_warmup_steps} steps of {job.model.sft_warmup_batch_size} "
            f"examples on {job.data.prompt_data}",
        )
    return f"policy: {num_params / 1e6:.2f}M parameters; then " + ", then ".join(steps)


def warmup(model: Transformer, tokenizer, job: JobConfig, console: Console) -> list[float]:
    """The built-in task's short supervised warm-up on correct answers (format and a first skill); returns the
    loss of each step. On ``console``: a progress bar with the loss, then one summary line (and where the console is
    not a terminal, such as a pipe or a log file, which shows no bar, a line every tenth of the steps)."""
    from league.rl.metrics import progress_bar
    from league.rl.tasks import supervised_warmup

    problems = builtin_problems(job.data.prompt_data, job.run.seed)
    eos = tokenizer.eos_token
    examples = [
        (
            render(tokenizer, p.question, job.data.apply_chat_template),
            tokenizer(p.answer + eos, add_special_tokens=False)["input_ids"],
        )
        for p in problems
    ]
    steps = job.model.sft_warmup_steps
    start = time.perf_counter()
    with progress_bar(console, "warm-up", "loss") as progress:
        bar = progress.add_task("warm-up", total=steps, loss="-")

        def on_step(step: int, loss: float) -> None:
            progress.update(bar, advance=1, loss=f"{loss:.3f}")
            if not console.is_terminal and (step + 1) % max(1, steps // 10) == 0:
                console.print(f"warm-up {step + 1}/{steps}  loss {loss:.3f}")

        losses = supervised_warmup(
            model,
            examples,
            steps=steps,
            lr=job.model.sft_warmup_lr,
            batch_size=job.model.sft_warmup_batch_size,
            seed=job.run.seed,
            label_smoothing=job.model.sft_warmup_label_smoothing,
            on_step=on_step,
        )
    console.print(
        f"warm-up: {steps} steps in {time.perf_counter() - start:.0f} s, loss {losses[0]:.3f} -> {losses[-1]:.3f}"
    )
    return losses


class Placement(NamedTuple):
    """Where the policy's parts live once placed for the ranks (:func:`place_policy`)."""

    engine_model: Transformer
    """The engine's model: the policy itself in one process, else an empty copy on the meta device, which
    :func:`build_engine` lays out for the engine's ranks and allocates and the first :func:`sync_weights` fills."""
    ref_model: Transformer | None
    """The frozen KL reference (None without a KL term; the trainer then copies the policy in one process)."""
    pipeline: Any = None
    """With pipeline stages: this rank's stage of the policy (``parallel.pipeline.Pipeline``)."""
    ref_pipeline: Any = None
    """With pipeline stages: this rank's stage of the reference."""


def place_policy(
    model: Transformer, job: JobConfig, dims: ParallelDims, ranks: Ranks, device: torch.device | None = None
) -> Placement:
    """Prepare the policy for training on ``dims`` (``parallelize_qwen3_5_moe``).

    One process: the engine reads the policy in place. Across ranks the policy is sharded (and with pipeline stages,
    each rank keeps its stage's part), so the engine gets its own copy (on the meta device here: laid out for the
    engine's ranks and allocated by :func:`build_engine`, filled and kept in step by :func:`sync_weights`) and the
    reference is a copy placed like the policy. A policy built whole is copied before it is placed, every rank
    starting from rank 0's weights. A policy on the meta device (``--load`` across ranks) is placed there, then each
    rank allocates its shards on ``device`` and reads them from the checkpoint (policy and reference), never holding
    the whole model."""
    import copy

    from league.parallel.parallelize import parallelize_qwen3_5_moe
    from league.parallel.pipeline import Pipeline

    if ranks.world == 1:
        parallelize_qwen3_5_moe(model, dims, recompute=job.train.recompute_policy or False)
        return Placement(model, None)
    from league.checkpoint.hf import meta_model

    on_meta = model.inv_freq.is_meta
    if not on_meta:
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                torch.distributed.broadcast(tensor, src=0, group=ranks.group)
    engine_model = meta_model(model.args, next(model.parameters()).dtype)
    ref_model = copy.deepcopy(model).requires_grad_(False) if job.algo.use_kl_loss else None
    meshes = (ranks.stage_mesh, ranks.expert_mesh, ranks.token_group)
    stage = parallelize_qwen3_5_moe(model, dims, job.train.recompute_policy or False, *meshes, stage=ranks.stage)
    ref_stage = None
    if ref_model is not None:
        ref_stage = parallelize_qwen3_5_moe(ref_model, dims, False, *meshes, stage=ranks.stage)
    pipelines, placed_stages = [None, None], (stage, ref_stage)
    if dims.pp > 1:
        pipelines = [
            None if m is None else Pipeline(m, ranks.stage, dims.pp, ranks.pp_group) for m in (stage, ref_stage)
        ]
    if on_meta:
        from league.rl.checkpoints import load_shards

        for module in placed_stages:
            if module is not None:
                materialize(module, device)
        load_shards(job.checkpoint.load, [m for m in (model, ref_model) if m is not None], ranks)
        for pipeline in pipelines:
            if pipeline is not None:
                pipeline.refresh_embedding()
    return Placement(engine_model, ref_model, *pipelines)


@torch.no_grad()
def materialize(module: torch.nn.Module, device: torch.device) -> None:
    """Allocate a placed module's parameters and buffers on ``device`` (uninitialised: a checkpoint fills the
    parameters) and fill the buffers derived from the architecture (the RoPE frequencies)."""
    from league.ops.rope import rope_inv_freq

    module.to_empty(device=device)
    for sub in module.modules():
        if isinstance(sub, Transformer):
            sub.inv_freq.copy_(rope_inv_freq(sub.args.rotary_dim, sub.args.rope_theta))


def engine_layout(job: JobConfig, ranks: Ranks, args, device_type: str) -> EngineLayout:
    """This rank's place among the run's rollout engines: one per rank, or engines over several ranks
    (``--rollout-num-gpus-per-engine``, ``--sglang-tp-size``, ``--sglang-ep-size``; ``parallel.inference``). Every
    rank calls it together."""
    from league.parallel.inference import make_engine_layout
    from league.rl.preflight import check_engine

    tp, ep = check_engine(job, ranks.world)
    if ranks.world == 1:
        return EngineLayout()
    return make_engine_layout(args, tp, ep, device_type, ranks.group)


def build_engine(
    job: JobConfig,
    model: Transformer,
    tokenizer,
    layout: EngineLayout | None = None,
    device: torch.device | None = None,
    policy: Transformer | None = None,
):
    """The rollout engine: a client of ``--rollout-engine``, or an engine on ``model`` (the policy itself in one
    process; across ranks a copy on the meta device, laid out here over the engine's ranks and allocated on
    ``device``, for :func:`sync_weights` to fill). With the sharded ``policy`` (no pipeline stages), expert blocks
    laid out alike on both sides are read from the policy in place (``parallel.inference.shared_expert_blocks``)."""
    if job.rollout.rollout_engine:
        from league.engine.client import EngineClient

        return EngineClient(job.rollout.rollout_engine)
    layout = layout or EngineLayout()
    config = dataclasses.replace(job.engine, tp_size=layout.tp, ep_size=layout.ep)
    if job.algo.use_rollout_routing_replay:  # the engine keeps its routing for the trainer to replay
        config = dataclasses.replace(config, enable_return_routed_experts=True)
    if model.inv_freq.is_meta:  # the copy of a run across ranks: laid out, then allocated (weights synced next)
        from league.parallel.inference import place_engine_model

        materialize(place_engine_model(model, layout), device)
    engine = LLMEngine(model, config, tokenizer, layout)
    if policy is not None:
        from league.parallel.inference import shared_expert_blocks

        engine.runner.shared = set(shared_expert_blocks(model, policy, layout))
    return engine


def offloaded_tags(job: JobConfig, engine, model: Transformer) -> set[str]:
    """What the in-process engine gives back while the trainer runs (``--offload-rollout``, by default on a GPU):
    the memory tags of ``--offload-rollout-level`` (``weight``: only an engine with its own copy, whose weights
    the sync after the step rewrites); none for a served engine."""
    if not isinstance(engine, LLMEngine):
        return set()
    on = job.rollout.offload_rollout
    if on is None:
        on = engine.device.type == "cuda"
    if not on:
        return set()
    levels = set(job.rollout.offload_rollout_level)
    tags = {"kv_cache", "cuda_graph"} if "kv_cache" in levels else set()
    if "weight" in levels and engine.model is not model:
        tags |= {"weights", "weights_drafter"}
    return tags


def engine_block(items: list, layout: EngineLayout) -> list:
    """The block of ``items`` that this rank's engine serves (every rank of an engine the same block)."""
    from league.parallel.launch import block_bounds

    start, stop = block_bounds(len(items), layout.engine, layout.num_engines)
    return list(items[start:stop])


def sync_weights(engine, model: Transformer, run_dir: Path, ranks: Ranks | None = None) -> None:
    """The trained weights into the engine, one way for every engine: nothing to do when it holds the same module
    (colocated); otherwise each parameter, whole (gathered from the ranks that shard it; with pipeline stages, each
    stage's from its ranks to the pipeline's), goes through ``engine.update_weights``: copied in place by an
    in-process replica, handed over by reference to a served engine (``/update_weights_from_tensor``)."""
    if isinstance(engine, LLMEngine) and engine.model is model:
        engine.flush_cache()  # its prefix cache holds keys of the old weights
        return
    from league.parallel.parallelize import full_parameters, pipeline_parameters

    ranks = ranks or Ranks()
    shared = engine.runner.shared if isinstance(engine, LLMEngine) else set()  # read in place: nothing to copy
    whole = full_parameters(model, shared)
    if ranks.pp_group is not None:
        whole = pipeline_parameters(model, ranks.stage, ranks.pp_size, ranks.pp_group, engine.device)
    if isinstance(engine, LLMEngine):
        for name, tensor in whole:  # one at a time: a replica beside sharded ranks holds no second copy
            engine.update_weights([(name, tensor)])
        return
    engine.update_weights((name, tensor.detach()) for name, tensor in whole)


def score(tokenizer, reward, prompts: list[Prompt], outputs, n: int):
    """The rewards of ``outputs``, ``n`` consecutive samples of each of ``prompts``."""
    texts = [tokenizer.decode(o.output_ids, skip_special_tokens=True) for o in outputs]
    labels = [p.label for p in prompts for _ in range(n)]
    return reward.score(texts, labels, [p.metadata for p in prompts for _ in range(n)])


def gather_scored(outputs, result, ranks: Ranks, layout: EngineLayout | None = None):
    """Every engine's block of outputs and rewards (``result`` None on the ranks that do not lead an engine, whose
    outputs are their leader's), joined in engine order (one process: unchanged)."""
    if ranks.world == 1:
        return outputs, result
    from league.rl.rewards.pool import RewardResult

    leads = layout is None or layout.leads
    blocks = [b for b in ranks.gather_blocks([(outputs, result) if leads else None]) if b is not None]
    joined = RewardResult(
        rewards=[r for _, res in blocks for r in res.rewards],
        failures=sum(res.failures for _, res in blocks),
        timeouts=sum(res.timeouts for _, res in blocks),
        errors=[e for _, res in blocks for e in res.errors],
    )
    return [o for outs, _ in blocks for o in outs], joined


def evaluate(
    engine,
    tokenizer,
    reward,
    eval_sets: dict[str, list[Prompt]],
    job: JobConfig,
    step: int,
    ranks: Ranks | None = None,
    layout: EngineLayout | None = None,
):
    """avg@k reward of each evaluation set (across ranks, each engine generates a block of the prompts and its
    leading rank scores it)."""
    ranks, layout = ranks or Ranks(), layout or EngineLayout()
    config, metrics = job.eval, {}
    temperature = job.rollout.rollout_temperature if config.eval_temperature is None else config.eval_temperature
    for name, prompts in eval_sets.items():
        params = SamplingParams(
            max_new_tokens=config.eval_max_response_len or job.rollout.rollout_max_response_len,
            temperature=temperature,
            top_p=config.eval_top_p,
            seed=job.run.seed + step,
        )
        k = config.n_samples_per_eval_prompt
        mine = engine_block(prompts, layout)
        outs = engine.generate([p.prompt_ids for p in mine], params, n=k)
        result = score(tokenizer, reward, mine, outs, k) if layout.leads else None
        outs, result = gather_scored(outs, result, ranks, layout)
        metrics[f"eval/{name}/reward_mean"] = statistics.fmean(result.rewards)
        metrics[f"eval/{name}/response_len_mean"] = statistics.fmean(len(o.output_ids) for o in outs)
    if len(eval_sets) == 1:
        metrics["eval/reward_mean"] = next(v for k, v in metrics.items() if k.endswith("/reward_mean"))
    return metrics


def rollout_metrics(outputs, result, engine) -> dict[str, float]:
    lengths = [len(o.output_ids) for o in outputs]
    rewards = result.rewards
    spec_steps = sum(o.spec.verify_steps for o in outputs)
    metrics = {
        "rollout/reward_mean": statistics.fmean(rewards),
        "rollout/reward_std": statistics.pstdev(rewards),
        "rollout/response_len_mean": statistics.fmean(lengths),
        "rollout/response_len_max": max(lengths),
        "rollout/truncated_ratio": statistics.fmean(o.finish_reason == "length" for o in outputs),
        "rollout/reward_failures": result.failures,
        "rollout/reward_timeouts": result.timeouts,
        # the prefix cache's share of the prompts (a prompt's samples share its prefill: counted once each), and
        # requests preempted when the engine's KV pool ran out
        "rollout/cached_tokens_ratio": sum(o.cached_tokens for o in outputs)
        / max(1, sum(len(o.prompt_ids) for o in outputs)),
        "rollout/preemptions": sum(o.num_retractions for o in outputs),
    }
    if spec_steps:
        metrics["rollout/spec_accept_length"] = sum(o.spec.verified_output_tokens for o in outputs) / spec_steps
        metrics["rollout/spec_accept_rate"] = sum(o.spec.accepted_tokens for o in outputs) / max(
            1, sum(o.spec.draft_tokens for o in outputs)
        )
    return metrics
