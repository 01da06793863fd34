"""Building the pieces of a run from its JobConfig: the policy, prompts, reward, engine, and the run's
bookkeeping (run folder, seeds, checkpoints, resume, evaluation, rollout metrics).

Not responsible for the order of the loop (``rl.loop``) nor for the math of any step.
"""

import random
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from league.config import EvalConfig, JobConfig, ModelConfig
from league.engine.engine import LLMEngine
from league.engine.request import SamplingParams
from league.models.qwen3_5_moe import Transformer

STATUS = {"stop": "completed", "length": "truncated", "abort": "aborted"}
BUILTIN = "builtin:"


@dataclass(kw_only=True, slots=True)
class Prompt:
    """A prompt ready to generate from."""

    prompt_ids: list[int]
    label: str | None
    metadata: dict[str, Any] = field(default_factory=dict)


def make_run_dir(job: JobConfig) -> Path:
    run_dir = Path(job.run.run_dir or f"runs/{job.recipe}-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def set_num_threads(num_threads: int | None) -> None:
    """Run torch's CPU operators on ``num_threads`` threads (None: leave torch's setting as it is)."""
    if num_threads is not None:
        torch.set_num_threads(num_threads)


def build_policy(config: ModelConfig, seed: int) -> tuple[Transformer, Any]:
    """The policy model and its tokenizer: a Hugging Face checkpoint, or a randomly initialised preset."""
    from league.checkpoint.hf import resolve_device_dtype

    device, dtype = resolve_device_dtype(config.device, config.dtype)
    if config.hf_checkpoint:
        from league.checkpoint.hf import load_model
        from league.tokenizer import load_tokenizer

        path = Path(config.hf_checkpoint)
        if not path.is_dir():
            raise ValueError(f"`--hf-checkpoint` {path}: no such folder")
        model = load_model(path, device=device, dtype=dtype)
        tokenizer = load_tokenizer(path)
        if tokenizer is None:
            raise ValueError(f"`--hf-checkpoint` {path}: the folder holds no tokenizer")
    else:
        from league.models.qwen3_5_moe.presets import PRESETS
        from league.tokenizer import build_tiny_tokenizer

        if config.model_preset not in PRESETS:
            raise ValueError(f"unknown `--model-preset` {config.model_preset!r}; expected one of {sorted(PRESETS)}")
        tokenizer = build_tiny_tokenizer()
        model = Transformer(PRESETS[config.model_preset])
        model.init_weights(seed)
        model = model.to(device=device, dtype=dtype)
    if config.mtp_num_layers is not None and config.mtp_num_layers != model.args.mtp_num_layers:
        if config.mtp_num_layers != 0:
            raise ValueError(
                f"`--mtp-num-layers` {config.mtp_num_layers} does not match the checkpoint's "
                f"mtp_num_hidden_layers ({model.args.mtp_num_layers})"
            )
        model.mtp = None
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
            import dataclasses

            sets[name] = load_prompts(dataclasses.replace(data, prompt_data=path), tokenizer, seed)
    return sets


def build_reward(config):
    from league.rl.rewards import RewardModel

    return RewardModel(config)


def describe_start(job: JobConfig, run_dir: Path) -> str:
    """The first console line of a run: what it is, where it writes, and that the policy is being built."""
    config = job.model
    source = config.hf_checkpoint or f"preset {config.model_preset}, random init"
    return (
        f"league train: recipe {job.recipe}, seed {job.run.seed}, {torch.get_num_threads()} CPU threads, "
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

    if not job.data.prompt_data.startswith(BUILTIN):
        raise ValueError("`--sft-warmup-steps` needs a built-in task as `--prompt-data` (builtin:<task>)")
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


def build_engine(job: JobConfig, model: Transformer, tokenizer):
    if job.rollout.rollout_engine:
        from league.engine.client import EngineClient

        return EngineClient(job.rollout.rollout_engine)
    return LLMEngine(model, job.engine, tokenizer)


def sync_weights(engine, model: Transformer, run_dir: Path) -> None:
    """Colocated: nothing to copy (the engine holds the same module). Remote: save and ask it to reload."""
    if isinstance(engine, LLMEngine):
        return
    from league.checkpoint.hf import save_hf

    folder = run_dir / "weights_for_engine"
    save_hf(model, folder, force=True)
    engine.update_weights_from_disk(str(folder.resolve()))


def evaluate(engine, tokenizer, reward, eval_sets: dict[str, list[Prompt]], job: JobConfig, step: int):
    """avg@k reward of each evaluation set."""
    config, metrics = job.eval, {}
    temperature = job.rollout.rollout_temperature if config.eval_temperature is None else config.eval_temperature
    for name, prompts in eval_sets.items():
        params = SamplingParams(
            max_new_tokens=config.eval_max_response_len or job.rollout.rollout_max_response_len,
            temperature=temperature,
            top_p=config.eval_top_p,
            seed=job.run.seed + step,
        )
        outs = engine.generate([p.prompt_ids for p in prompts], params, n=config.n_samples_per_eval_prompt)
        k = config.n_samples_per_eval_prompt
        texts = [tokenizer.decode(o.output_ids, skip_special_tokens=True) for o in outs]
        result = reward.score(
            texts, [p.label for p in prompts for _ in range(k)], [p.metadata for p in prompts for _ in range(k)]
        )
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


# checkpoints ----------------------------------------------------------------------------------------------

LATEST = "latest"


def save_checkpoint(root: Path, step: int, model: Transformer, trainer, sampler, tokenizer) -> Path:
    """``root/step_000k``: the model in Hugging Face format, the reference model when there is one, and
    the train state (optimizer, step, data position, RNG). Written into a temporary folder and renamed,
    so a crash never leaves a half checkpoint; ``root/latest`` names the newest."""
    from league.checkpoint.hf import save_hf

    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step + 1:06d}"
    tmp = root / f".tmp_step_{step + 1:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_hf(model, tmp / "model", tokenizer_from=tokenizer)
    if trainer.ref_model is not None:
        save_hf(trainer.ref_model, tmp / "ref")
    torch.save(
        {
            "step": step,
            "trainer": trainer.state_dict(),
            "sampler": sampler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
        },
        tmp / "train_state.pt",
    )
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    latest_tmp = root / (LATEST + ".tmp")
    latest_tmp.write_text(final.name + "\n")
    latest_tmp.replace(root / LATEST)
    return final


def find_checkpoint(path: Path) -> Path:
    if (path / "train_state.pt").is_file():
        return path
    if (path / LATEST).is_file():
        return path / (path / LATEST).read_text().strip()
    raise ValueError(f"`--load` {path}: neither a checkpoint (train_state.pt) nor a folder with a `latest` file")


def resume(load: str, model: Transformer, trainer, sampler) -> int:
    """Restore a checkpoint in place; returns the first rollout step to run."""
    from league.checkpoint.hf import load_hf_weights

    folder = find_checkpoint(Path(load))
    state = torch.load(folder / "train_state.pt", weights_only=False)
    load_hf_weights(model, folder / "model")
    if trainer.ref_model is not None and (folder / "ref").is_dir():
        load_hf_weights(trainer.ref_model, folder / "ref")
    trainer.load_state_dict(state["trainer"])
    sampler.load_state_dict(state["sampler"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    return state["step"] + 1
