"""The RL loop, top to bottom: rollout -> reward -> advantages -> train -> weight sync -> eval -> checkpoint.

Not responsible for the math of any step (engine, rewards, algorithms, trainer own it): this file only
wires them in order and keeps the run's bookkeeping (metrics, checkpoints, resume).
"""

import random
import time
from pathlib import Path

import torch
from rich.console import Console

from league.checkpoint.hf import resolve_device_dtype
from league.config import JobConfig, write_config
from league.engine.request import SamplingParams
from league.ops.numerics import Numerics
from league.parallel.dims import ParallelDims
from league.parallel.launch import Ranks, distributed
from league.rl import algorithms as algo
from league.rl import checkpoints, preflight, setup
from league.rl.metrics import MetricsLogger, plot_run, progress_bar
from league.rl.sample import Sample
from league.rl.trainer import Trainer


def train(job: JobConfig) -> Path:
    """Run ``job``; returns the run folder (metrics.jsonl, config.json, curves.png, checkpoints).

    Every start-up check (:func:`preflight.check_job`) runs before anything is built or written. A run folder made by
    this run is removed again when the run fails before its first step is logged. Under torchrun every rank runs
    this; rank 0 writes the run folder and the console."""
    dims = preflight.check_job(job)
    device, _ = resolve_device_dtype(job.model.device, job.model.dtype)
    with distributed(device.type, dims.ep, dims.tp * dims.cp, dims.pp, dims.etp) as ranks:
        run_dir = ranks.broadcast(preflight.run_dir_path(job))
        with setup.run_folder(run_dir, owner=ranks.main):
            if ranks.main:
                write_config(job, run_dir / "config.json")
            run_steps(job, dims, run_dir, ranks)
    return run_dir


def run_steps(job: JobConfig, dims: ParallelDims, run_dir: Path, ranks: Ranks | None = None) -> None:
    """The run itself, once checked, in its folder (every rank runs it; rank 0 logs). Default ``ranks``: one
    process."""
    ranks = ranks or Ranks()
    setup.set_num_threads(job.run.num_threads)
    console = Console(quiet=not ranks.main)
    console.print(setup.describe_start(job, run_dir, ranks.world), soft_wrap=True)
    setup.seed_everything(job.run.seed)
    load, unsafe_pickle = job.checkpoint.load, job.checkpoint.load_unsafe_pickle
    # across ranks a checkpoint's policy is built on the meta device and each rank reads only its shards, once placed
    sharded_load = bool(load) and ranks.world > 1
    model, tokenizer = setup.build_policy(job.model, job.run.seed, load, unsafe_pickle, on_meta=sharded_load)
    console.print(setup.describe_plan(job, model), soft_wrap=True)
    prompts = setup.load_prompts(job.data, tokenizer, job.run.seed)
    sampler = setup.make_sampler(job.data, len(prompts), job.rollout.rollout_batch_size)
    eval_sets = setup.load_eval_sets(job.eval, job.data, tokenizer, job.run.seed)
    reward = setup.build_reward(job.reward)
    if job.model.sft_warmup_steps and not load and ranks.main:  # the other ranks get its weights when placed
        setup.warmup(model, tokenizer, job, console)
    # the engine's and the reference's weights: the policy itself in one process; whole copies beside the ranks'
    # shards (taken before sharding) across ranks
    device, _ = resolve_device_dtype(job.model.device, job.model.dtype)
    placed = setup.place_policy(model, job, dims, ranks, device)
    steps_per_rollout = job.rollout.rollout_batch_size * job.rollout.n_samples_per_prompt // job.train.global_batch_size
    trainer = Trainer(
        model,
        job.train,
        job.algo,
        job.optim,
        total_steps=job.rollout.num_rollout * steps_per_rollout,
        temperature=job.rollout.rollout_temperature,
        numerics=Numerics(job.engine.numerics),  # the trainer computes as the engine does
        group=ranks.data_group,
        ref_model=placed.ref_model,
        shard_group=ranks.group,
        loss_scale=1 / ranks.token_size,
        pipeline=placed.pipeline,
        ref_pipeline=placed.ref_pipeline,
    )
    layout = setup.engine_layout(job, ranks, model.args, device.type)
    policy = model if ranks.world > 1 and dims.pp == 1 else None  # its expert shards, where the engine's are alike
    engine = setup.build_engine(job, placed.engine_model, tokenizer, layout, device, policy)
    if ranks.world > 1:  # the engine's copy was allocated empty
        setup.sync_weights(engine, model, run_dir, ranks)
    # the policy's weights came with it; the rest of the train state (none in a converted checkpoint) now
    start = checkpoints.resume(load, trainer, sampler, ranks, unsafe_pickle) if load else 0
    offload = setup.offloaded_tags(job, engine, model)  # given back by the engine while the trainer runs
    logger = MetricsLogger(run_dir, tensorboard=job.run.tensorboard, console=console) if ranks.main else None
    n = job.rollout.n_samples_per_prompt
    with progress_bar(console, "league train") as progress:
        bar = progress.add_task("rollout", total=job.rollout.num_rollout, completed=start)
        for step in range(start, job.rollout.num_rollout):
            t0 = time.perf_counter()
            # 1. rollout: n samples of each prompt, with per-request seeds fixed by (run seed, step, prompt); across
            # ranks each engine (one rank's, or several ranks' in lock-step) generates a block of the prompts
            batch = [prompts[i] for i in sampler.next_batch()]
            params = [rollout_params(job, step, i) for i in range(len(batch))]
            my_batch, my_params = setup.engine_block(batch, layout), setup.engine_block(params, layout)
            routes = 0 if job.algo.use_rollout_routing_replay else None  # the experts of every position (R3)
            outputs = engine.generate([p.prompt_ids for p in my_batch], my_params, n=n, routed_experts_start_len=routes)
            t1 = time.perf_counter()
            # 2. reward (by each engine's leading rank); then every rank has the whole rollout, in order
            result = setup.score(tokenizer, reward, my_batch, outputs, n) if layout.leads else None
            outputs, result = setup.gather_scored(outputs, result, ranks, layout)
            t2 = time.perf_counter()
            # 3. advantages: group-normalised rewards, broadcast to every response token
            advantages = algo.grpo_advantages(
                torch.tensor(result.rewards, dtype=torch.float32),
                n,
                std_normalization=not job.algo.disable_grpo_std_normalization,
            )
            samples = [
                Sample(
                    prompt_ids=o.prompt_ids,
                    response_ids=o.output_ids,
                    rollout_logprobs=o.output_logprobs,
                    reward=r,
                    advantage=float(a),
                    status=setup.STATUS[o.finish_reason],
                    group_index=k // n,
                    index=k,
                    label=batch[k // n].label,
                    metadata=batch[k // n].metadata,
                    routed_experts=o.routed_experts,
                )
                for k, (o, r, a) in enumerate(zip(outputs, result.rewards, advantages))
            ]
            # 4. train: log-prob passes, loss, backward, optimizer step(s); each rank its part of every step; the
            # engine's cache (and its own weights) given back meanwhile (--offload-rollout)
            freed = engine.release_memory(offload, discard=offload) if offload else 0
            train_metrics = trainer.train(ranks.step_share(samples, job.train.global_batch_size))
            t3 = time.perf_counter()
            # 5. weight sync: the in-process engine reads the trained parameters in place; an engine beside sharded
            # ranks copies its part of each; a remote engine reloads
            if offload:
                engine.resume_memory(offload)
            setup.sync_weights(engine, model, run_dir, ranks)
            t4 = time.perf_counter()
            # 6. eval and checkpoint
            last = step + 1 == job.rollout.num_rollout
            eval_metrics = {}
            if eval_sets and job.eval.eval_interval and ((step + 1) % job.eval.eval_interval == 0 or last):
                eval_metrics = setup.evaluate(engine, tokenizer, reward, eval_sets, job, step, ranks, layout)
            t5 = time.perf_counter()
            interval = job.checkpoint.save_interval
            if job.checkpoint.save and (last or (interval and (step + 1) % interval == 0)):
                root, keep_last = Path(job.checkpoint.save), job.checkpoint.keep_last
                checkpoints.save_checkpoint(root, step, model, trainer, sampler, tokenizer, ranks, keep_last)
            metrics = {
                **setup.rollout_metrics(outputs, result, engine),
                **train_metrics,
                **eval_metrics,
                "perf/rollout_time": t1 - t0,
                "perf/reward_time": t2 - t1,
                "perf/train_time": t3 - t2,
                "perf/weight_sync_s": t4 - t3,
                **({"perf/offloaded_gib": freed / 2**30} if offload else {}),
                "perf/eval_time": t5 - t4,
                "perf/step_time": time.perf_counter() - t0,
                "perf/rollout_tokens_per_s": sum(len(o.output_ids) for o in outputs) / max(t1 - t0, 1e-9),
                "perf/train_tokens_per_s": sum(len(s.prompt_ids) + len(s.response_ids) for s in samples)
                / max(t3 - t2, 1e-9),
            }
            if logger is not None:
                logger.log(step, metrics)
            progress.update(bar, advance=1)
    reward.close()
    if logger is not None:
        logger.close()
        plot_run(run_dir)


def rollout_params(job: JobConfig, step: int, prompt_index: int) -> SamplingParams:
    """Sampling parameters of one prompt's group; sample i of the group uses seed ``seed + i``."""
    seed = random.Random(f"{job.run.seed}/{step}/{prompt_index}").getrandbits(48)
    return SamplingParams(
        max_new_tokens=job.rollout.rollout_max_response_len,
        temperature=job.rollout.rollout_temperature,
        top_p=job.rollout.rollout_top_p,
        top_k=job.rollout.rollout_top_k,
        seed=seed,
    )
