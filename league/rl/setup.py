"""Building the pieces of a run from its JobConfig: the policy, prompts, reward, engine, and the run's
bookkeeping (run folder, seeds, evaluation, rollout metrics).

Not responsible for the order of the loop (``rl.loop``), for checkpoints (``rl.checkpoints``) nor for the math of
any step.
"""

import dataclasses
import os
import random
import shutil
import statistics
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from rich.console import Console

from league.checks import SEED_MAX, check_writable
from league.config import EvalConfig, JobConfig, ModelConfig
from league.engine.engine import LLMEngine
from league.engine.request import SamplingParams
from league.models.qwen3_5_moe import ModelArgs, Transformer
from league.parallel.dims import ParallelDims
from league.parallel.launch import Ranks
from league.rl.metrics import METRICS_FILE

STATUS = {"stop": "completed", "length": "truncated", "abort": "aborted"}
BUILTIN = "builtin:"


@dataclass(kw_only=True, slots=True)
class Prompt:
    """A prompt ready to generate from."""

    prompt_ids: list[int]
    label: str | None
    metadata: dict[str, Any] = field(default_factory=dict)


def run_dir_path(job: JobConfig) -> Path:
    return Path(job.run.run_dir or f"runs/{job.recipe}-{time.strftime('%Y%m%d-%H%M%S')}")


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


def check_prompt_source(flag: str, spec: str) -> None:
    """A prompt set exists: ``builtin:<task>`` names a task, anything else is a .jsonl or .parquet file."""
    if spec.startswith(BUILTIN):
        from league.rl.tasks import TASKS

        if spec.removeprefix(BUILTIN) not in TASKS:
            expected = [BUILTIN + task for task in TASKS]
            raise ValueError(f"`{flag}` {spec!r}: unknown built-in task; expected one of {expected}")
        return
    from league.rl.data import check_data_file

    check_data_file(spec)


def check_policy(job: JobConfig) -> None:
    """The policy can be built as configured: its checkpoint folder (``--load``'s DCP checkpoint, else
    ``--hf-checkpoint``) with config.json and a tokenizer, or its preset, exists, and the MTP, head- and
    expert-parallel settings agree with it."""
    from league.checkpoint.dcp import find_checkpoint
    from league.models.qwen3_5_moe.presets import PRESETS
    from league.tokenizer import has_tokenizer

    config = job.model
    if job.checkpoint.load:
        path = find_checkpoint(job.checkpoint.load)
        args = ModelArgs.from_dir(path)
        if not has_tokenizer(path):
            raise ValueError(
                f"`--load` {path}: the checkpoint holds no tokenizer; convert a Hugging Face folder that has one "
                "(`league convert hf-to-dcp` copies it)"
            )
        if config.hf_checkpoint:
            warnings.warn(
                f"`--hf-checkpoint` {config.hf_checkpoint} is not read: `--load` gives the policy (architecture, "
                "weights and tokenizer)",
                stacklevel=2,
            )
    elif config.hf_checkpoint:
        path = Path(config.hf_checkpoint)
        if not path.is_dir():
            raise ValueError(f"`--hf-checkpoint` {path}: no such folder")
        args = ModelArgs.from_dir(path)
        if not has_tokenizer(path):
            raise ValueError(f"`--hf-checkpoint` {path}: the folder holds no tokenizer")
    elif config.model_preset in PRESETS:
        args = PRESETS[config.model_preset]
    else:
        raise ValueError(f"unknown `--model-preset` {config.model_preset!r}; expected one of {sorted(PRESETS)}")
    num_mtp = args.mtp_num_layers
    if config.mtp_num_layers not in (None, 0, num_mtp):
        raise ValueError(
            f"`--mtp-num-layers` {config.mtp_num_layers} does not match the checkpoint's mtp_num_hidden_layers "
            f"({num_mtp})"
        )
    uses_mtp = num_mtp if config.mtp_num_layers is None else config.mtp_num_layers
    if job.parallel.tp * job.parallel.cp > 1:
        from league.parallel.heads import check_head_split

        check_head_split(args, job.parallel.tp * job.parallel.cp)
    if job.parallel.pp > 1:
        from league.parallel.pipeline import check_pipeline_split

        check_pipeline_split(args, job.parallel.pp)
    if args.num_experts % job.parallel.ep:
        raise ValueError(
            f"`--ep` {job.parallel.ep} does not divide the policy's {args.num_experts} routed experts: choose a "
            "divisor of it"
        )
    if args.moe_intermediate_size % job.parallel.etp:
        raise ValueError(
            f"`--etp` {job.parallel.etp} does not divide the policy's expert intermediate size "
            f"(moe_intermediate_size {args.moe_intermediate_size}): choose a divisor of it"
        )
    if job.engine.speculative_algorithm and not job.rollout.rollout_engine and not uses_mtp:
        raise ValueError("`--speculative-algorithm` needs the policy's MTP layer, which this run has none of")


def policy_architecture(job: JobConfig) -> tuple[ModelArgs, str]:
    """The policy's architecture as the run builds it, and where it comes from: ``--load``'s checkpoint, the
    ``--hf-checkpoint`` folder's config.json, or the preset. A folder that is not there (yet) gives way to the preset,
    and the description says so: the memory plan of a job is made before its model is downloaded."""
    from league.checkpoint.dcp import find_checkpoint
    from league.models.qwen3_5_moe.presets import PRESETS

    config, load = job.model, job.checkpoint.load
    if load and Path(load).exists():
        path = find_checkpoint(load)
        args, source = ModelArgs.from_dir(path), f"config.json of {path}"
    elif not load and config.hf_checkpoint and (Path(config.hf_checkpoint) / "config.json").is_file():
        args, source = ModelArgs.from_dir(config.hf_checkpoint), f"config.json of {config.hf_checkpoint}"
    else:
        if config.model_preset not in PRESETS:
            raise ValueError(f"unknown `--model-preset` {config.model_preset!r}; expected one of {sorted(PRESETS)}")
        args, source = PRESETS[config.model_preset], f"preset {config.model_preset}"
        if load or config.hf_checkpoint:
            source += f" ({f'--load {load}' if load else f'--hf-checkpoint {config.hf_checkpoint}'} is not here)"
    if config.mtp_num_layers == 0:
        args = args.replace(mtp_num_layers=0)
    return args, source


def memory_plan(job: JobConfig) -> str | None:
    """The job's memory plan at its world size (``parallel.plan``: every rank's bytes from the real placement of the
    policy on the meta device), as lines to print; None in one process. Raises the run's own error for a layout
    that does not divide the world or the model."""
    from league.parallel.launch import run_world_size, under_torchrun
    from league.parallel.plan import PlanSettings, format_plan, plan_memory

    world = run_world_size(job.parallel.nproc_per_node)
    dims = job.parallel.resolve(world)
    if world == 1:
        return None
    if dims.pp > 1:
        return (
            f"memory plan: not made for pipeline stages (--pp {dims.pp}) in this version; leave --pp out of the dry "
            "run for the plan of the other dimensions (each stage holds about 1/pp of the layers)"
        )
    args, source = policy_architecture(job)
    config, engine = job.model, job.engine
    if config.dtype != "auto":
        dtype = getattr(torch, config.dtype)
    else:  # as resolve_device_dtype picks it, without asking for this machine's GPU
        on_gpu = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
        dtype = torch.bfloat16 if on_gpu else torch.float32
    min_slots = job.rollout.n_samples_per_prompt
    if job.eval.eval_interval and job.eval.eval_prompt_data:
        min_slots = max(min_slots, job.eval.n_samples_per_eval_prompt)
    settings = PlanSettings(
        dtype=dtype,
        recompute=job.train.recompute,
        max_tokens=job.train.max_tokens_per_gpu,
        optimizer_cpu_offload=job.optim.optimizer_cpu_offload,
        kl_reference=job.algo.use_kl_loss,
        engine_slots=engine.num_slots or engine.max_running_requests,
        engine_slots_fixed=engine.num_slots is not None,
        engine_min_slots=min_slots,
        engine_slot_len=min(engine.context_length, args.max_position_embeddings) + engine.num_spec_steps + 1,
        engine_state_dtype=getattr(torch, engine.mamba_ssm_dtype),
        mem_fraction_static=engine.mem_fraction_static,
        ranks_per_node=int(os.environ.get("LOCAL_WORLD_SIZE", world)) if under_torchrun() else world,
        sharded_load=bool(job.checkpoint.load),
    )
    return format_plan(plan_memory(args, dims, settings), source)


def check_eval_sets(job: JobConfig) -> None:
    for name, path in zip(job.eval.eval_prompt_data[::2], job.eval.eval_prompt_data[1::2]):
        check_prompt_source(f"--eval-prompt-data {name}", path)


def check_samples_fit(flag: str, n: int, job: JobConfig) -> None:
    """The in-process engine holds all ``n`` samples of a prompt at once."""
    engine = job.engine
    most = min(engine.max_running_requests, engine.num_slots or engine.max_running_requests)
    if not job.rollout.rollout_engine and n > most:
        raise ValueError(
            f"`{flag}` ({n}) exceeds the requests the engine runs at once ({most}: `--max-running-requests`"
            f"{' and `--num-slots`' if engine.num_slots else ''}); raise it or sample fewer"
        )


def check_job(job: JobConfig) -> ParallelDims:
    """Every check ``league train`` makes before it builds anything, so that a bad run stops at once and
    ``--dry-run`` refuses what the run would: the parallel layout, the batch sizes' consistency, that the output
    folders can be written and the inputs (prompt sets, checkpoint folders, reward, ``--load``) exist. File
    contents (prompt rows, weights, train state) are checked as they load.

    Returns:
        ``ParallelDims`` of the run at its world size (``--nproc-per-node``, or torchrun's).
    """
    from league.parallel.launch import run_world_size

    dims = job.parallel.resolve(run_world_size(job.parallel.nproc_per_node))
    rollout, gbs = job.rollout, job.train.global_batch_size
    num_samples = rollout.rollout_batch_size * rollout.n_samples_per_prompt
    if num_samples % gbs:
        raise ValueError(
            f"`--rollout-batch-size` x `--n-samples-per-prompt` ({rollout.rollout_batch_size} x "
            f"{rollout.n_samples_per_prompt} = {num_samples}) must be a multiple of `--global-batch-size` ({gbs}): "
            "each rollout step trains on whole global batches"
        )
    check_samples_fit("--n-samples-per-prompt", rollout.n_samples_per_prompt, job)
    if dims.dp * dims.tp * dims.cp * dims.pp > 1:
        check_data_parallel(job, dims.dp * dims.tp * dims.cp * dims.pp, dims.dp)
    if job.eval.eval_interval and job.eval.eval_prompt_data:
        check_samples_fit("--n-samples-per-eval-prompt", job.eval.n_samples_per_eval_prompt, job)
        last_seed = job.run.seed + rollout.num_rollout - 1 + job.eval.n_samples_per_eval_prompt - 1
        if last_seed > SEED_MAX:
            raise ValueError(
                f"`--seed` {job.run.seed} is too large: evaluations sample with seed + step + i, up to {last_seed}, "
                "past 2**63 - 1"
            )
    check_writable("--run-dir", run_dir_path(job))
    if job.checkpoint.save:
        check_writable("--save", Path(job.checkpoint.save))
    check_policy(job)
    check_prompt_source("--prompt-data", job.data.prompt_data)
    if job.model.sft_warmup_steps and not job.checkpoint.load and not job.data.prompt_data.startswith(BUILTIN):
        raise ValueError("`--sft-warmup-steps` needs a built-in task as `--prompt-data` (builtin:<task>)")
    check_eval_sets(job)
    check_reward(job.reward)
    return dims


def check_data_parallel(job: JobConfig, ranks: int, dp: int) -> None:
    """What a run over ``ranks`` processes (``dp`` data-parallel ranks) needs beyond a one-process run's checks."""
    if job.train.global_batch_size % dp:
        raise ValueError(
            f"`--global-batch-size` {job.train.global_batch_size} does not split over {dp} data-parallel ranks: "
            f"make it a multiple of {dp}"
        )
    if job.rollout.rollout_engine:
        raise ValueError(
            f"`--rollout-engine` with {ranks} ranks is not available in this version (a remote engine needs the "
            "sharded policy's weights gathered to it); run it on one process"
        )
    from league.checkpoint.hf import resolve_device_dtype

    device, _ = resolve_device_dtype(job.model.device, job.model.dtype)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", ranks))  # the processes on this machine
    if device.type == "cuda" and torch.cuda.device_count() < local:
        raise ValueError(f"{local} processes on this machine need a GPU each; it has {torch.cuda.device_count()}")


def check_eval_job(job: JobConfig) -> None:
    """Every check ``league eval`` makes before it builds anything (see :func:`check_job`)."""
    if not job.eval.eval_prompt_data:
        raise ValueError("`league eval` needs evaluation sets: --eval-prompt-data NAME,PATH[,NAME,PATH...]")
    check_samples_fit("--n-samples-per-eval-prompt", job.eval.n_samples_per_eval_prompt, job)
    check_writable("--run-dir", run_dir_path(job))
    check_policy(job)
    check_eval_sets(job)
    check_reward(job.reward)


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
    randomly initialised preset (the settings checked by :func:`check_policy`)."""
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


def check_reward(config) -> None:
    """The reward resolves: a known rule, or a custom function that imports."""
    from league.rl.rewards.registry import resolve_reward

    resolve_reward(config.rm_type, config.custom_rm_path)


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
    """The engine's model: the policy itself in one process, else a whole copy."""
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
    each rank keeps its stage's part), so the engine gets a whole copy (kept in step by :func:`sync_weights`) and the
    reference is a copy placed like the policy. A policy built whole is copied before it is placed, every rank
    starting from rank 0's weights. A policy on the meta device (``--load`` across ranks) is placed there, then each
    rank allocates its shards on ``device`` and reads them from the checkpoint (policy and reference), never holding
    the whole model; the engine's copy is allocated empty and filled by the first :func:`sync_weights`."""
    import copy

    from league.parallel.parallelize import parallelize_qwen3_5_moe
    from league.parallel.pipeline import Pipeline

    if ranks.world == 1:
        parallelize_qwen3_5_moe(model, dims, recompute=job.train.recompute)
        return Placement(model, None)
    on_meta = model.inv_freq.is_meta
    if on_meta:
        from league.checkpoint.hf import empty_model

        engine_model = empty_model(model.args, device, next(model.parameters()).dtype)
    else:
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                torch.distributed.broadcast(tensor, src=0, group=ranks.group)
        engine_model = copy.deepcopy(model)
    ref_model = copy.deepcopy(model).requires_grad_(False) if job.algo.use_kl_loss else None
    meshes = (ranks.stage_mesh, ranks.expert_mesh, ranks.token_group)
    stage = parallelize_qwen3_5_moe(model, dims, job.train.recompute, *meshes, stage=ranks.stage)
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


def build_engine(job: JobConfig, model: Transformer, tokenizer):
    if job.rollout.rollout_engine:
        from league.engine.client import EngineClient

        return EngineClient(job.rollout.rollout_engine)
    return LLMEngine(model, job.engine, tokenizer)


def sync_weights(engine, model: Transformer, run_dir: Path, ranks: Ranks | None = None) -> None:
    """Colocated: nothing to copy (the engine holds the same module). A whole replica beside sharded ranks: each
    parameter gathered (every rank in the same order; with pipeline stages, each stage's from its ranks to the
    pipeline's) and copied in. Remote: save and ask it to reload."""
    if isinstance(engine, LLMEngine):
        if engine.model is not model:
            from league.parallel.parallelize import full_parameters, pipeline_parameters

            ranks = ranks or Ranks()
            whole = full_parameters(model)
            if ranks.pp_group is not None:
                whole = pipeline_parameters(model, ranks.stage, ranks.pp_size, ranks.pp_group, engine.device)
            for name, tensor in whole:
                engine.update_weights([(name, tensor)])
        return
    from league.checkpoint.hf import save_hf

    folder = run_dir / "weights_for_engine"
    save_hf(model, folder, force=True)
    engine.update_weights_from_disk(str(folder.resolve()))


def score(tokenizer, reward, prompts: list[Prompt], outputs, n: int):
    """The rewards of ``outputs``, ``n`` consecutive samples of each of ``prompts``."""
    texts = [tokenizer.decode(o.output_ids, skip_special_tokens=True) for o in outputs]
    labels = [p.label for p in prompts for _ in range(n)]
    return reward.score(texts, labels, [p.metadata for p in prompts for _ in range(n)])


def gather_scored(outputs, result, ranks: Ranks):
    """Every rank's block of outputs and rewards, joined in rank order (one process: unchanged)."""
    if ranks.world == 1:
        return outputs, result
    from league.rl.rewards.pool import RewardResult

    blocks = ranks.gather_blocks([(outputs, result)])
    joined = RewardResult(
        rewards=[r for _, res in blocks for r in res.rewards],
        failures=sum(res.failures for _, res in blocks),
        timeouts=sum(res.timeouts for _, res in blocks),
        errors=[e for _, res in blocks for e in res.errors],
    )
    return [o for outs, _ in blocks for o in outs], joined


def evaluate(
    engine, tokenizer, reward, eval_sets: dict[str, list[Prompt]], job: JobConfig, step: int, ranks: Ranks | None = None
):
    """avg@k reward of each evaluation set (across ranks, each rank generates and scores a block of its prompts)."""
    ranks = ranks or Ranks()
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
        mine = ranks.block(prompts)
        outs = engine.generate([p.prompt_ids for p in mine], params, n=k)
        outs, result = gather_scored(outs, score(tokenizer, reward, mine, outs, k), ranks)
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
    }
    if spec_steps:
        metrics["rollout/spec_accept_length"] = sum(o.spec.verified_output_tokens for o in outputs) / spec_steps
        metrics["rollout/spec_accept_rate"] = sum(o.spec.accepted_tokens for o in outputs) / max(
            1, sum(o.spec.draft_tokens for o in outputs)
        )
    return metrics
