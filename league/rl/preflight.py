"""Every check a run makes before it builds or writes anything (``league train``, ``league eval``, their
``--dry-run``): the parallel layout, the batch sizes' consistency, the policy's checkpoint, the prompt and
evaluation sets, the reward, the folders it writes, and (across ranks) the memory plan of the layout. Each failure is
one ``ValueError`` naming the flag, the value and the fix.

Not responsible for building anything (``rl.setup``).
"""

import os
import time
import warnings
from pathlib import Path

import torch

from league.checks import SEED_MAX, check_writable
from league.config import JobConfig
from league.models.qwen3_5_moe import ModelArgs
from league.models.qwen3_5_moe.megatron_args import check_architecture
from league.parallel.dims import ParallelDims

BUILTIN = "builtin:"
"""The prefix of a built-in task's name in ``--prompt-data`` (``builtin:<task>``)."""


def run_dir_path(job: JobConfig) -> Path:
    return Path(job.run.run_dir or f"runs/{job.recipe}-{time.strftime('%Y%m%d-%H%M%S')}")


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


def check_engine(job: JobConfig, world: int) -> tuple[int, int]:
    """The rollout engine's ``(tp, ep)`` over the run's ``world`` ranks (``parallel.inference.resolve_engine_sizes``),
    checked against the policy's head and expert counts; a remote engine (``--rollout-engine``) keeps its own."""
    from league.parallel.inference import check_engine_layout, resolve_engine_sizes

    rollout, engine = job.rollout, job.engine
    tp, ep = resolve_engine_sizes(rollout.rollout_num_gpus_per_engine, engine.tp_size, engine.ep_size, world)
    if max(tp, ep) > 1 and rollout.rollout_engine:
        raise ValueError(
            f"`--rollout-engine` {rollout.rollout_engine} generates with the server's own layout; leave out "
            "`--rollout-num-gpus-per-engine`, `--sglang-tp-size` and `--sglang-ep-size`"
        )
    try:
        check_engine_layout(policy_architecture(job)[0], tp, ep)
    except ValueError as e:
        raise ValueError(
            str(e).replace("`--tp-size`", "`--sglang-tp-size`").replace("`--ep-size`", "`--sglang-ep-size`")
        ) from None
    return tp, ep


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


def recompute_label(policy) -> str | None:
    """How the memory plan names a recompute it estimates as none (an upper bound); None for full or none."""
    if policy is None or policy.every_layer:
        return None
    if policy.granularity == "selective":
        what = "selective"
    elif policy.method == "block":
        what = f"block of {policy.num_layers} layers"
    else:
        what = f"uniform runs of {policy.num_layers} layers"
    return f"{what} recompute (estimated as none: an upper bound)"


def memory_plan(job: JobConfig) -> str | None:
    """The job's memory plan at its world size (``parallel.plan``: every rank's bytes from the real placement of the
    policy on the meta device), as lines to print; None in one process. Raises the run's own error for a layout
    that does not divide the world or the model."""
    from league.parallel.inference import resolve_engine_sizes
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
    try:  # the engine's layout as the run would make it (a layout it refuses is reported by the checks after)
        engine_tp, engine_ep = resolve_engine_sizes(
            job.rollout.rollout_num_gpus_per_engine, engine.tp_size, engine.ep_size, world
        )
    except ValueError:
        engine_tp, engine_ep = 1, 1
    min_slots = job.rollout.n_samples_per_prompt
    if job.eval.eval_interval and job.eval.eval_prompt_data:
        min_slots = max(min_slots, job.eval.n_samples_per_eval_prompt)
    settings = PlanSettings(
        dtype=dtype,
        recompute=job.train.recompute_policy is not None and job.train.recompute_policy.every_layer,
        recompute_label=recompute_label(job.train.recompute_policy),
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
        engine_tp=engine_tp,
        engine_ep=engine_ep,
        engine_snapshots=engine.num_snapshots,
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
    check_architecture(job.architecture, *policy_architecture(job))
    check_engine(job, dims.dp * dims.tp * dims.cp * dims.pp)
    if job.algo.use_rollout_routing_replay and dims.tp * dims.cp * dims.pp > 1:
        raise ValueError(
            f"`--use-rollout-routing-replay` runs with data and expert parallelism only (FSDP2, `--ep`, `--etp`); "
            f"this layout has --tp {dims.tp} --cp {dims.cp} --pp {dims.pp}"
        )
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


def check_reward(config) -> None:
    """The reward resolves: a known rule, or a custom function that imports."""
    from league.rl.rewards.registry import resolve_reward

    resolve_reward(config.rm_type, config.custom_rm_path)
