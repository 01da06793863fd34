"""JobConfig: the whole run, composed of each component's own small config. Only the entry point
sees it; components receive their own part.

Not responsible for command-line flags (``league.flags`` makes them from these fields) nor for running
anything.
"""

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from league.checks import check_int, check_number, check_seed, check_top_k
from league.engine.config import EngineConfig
from league.models.qwen3_5_moe.megatron_args import MegatronModelArgs
from league.parallel.dims import ParallelConfig
from league.rl.data import DataConfig
from league.rl.optim import OptimConfig
from league.rl.rewards import RewardConfig
from league.rl.trainer import AlgorithmConfig, TrainConfig


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """Which policy to train."""

    hf_checkpoint: str | None = None
    """Hugging Face checkpoint folder of the policy (with its MTP layer); None builds the preset below. Not read with
    --load, whose checkpoint gives the policy."""
    model_preset: str = "tiny"
    """Built-in architecture used when neither --hf-checkpoint nor --load is given (randomly initialised); the dry
    run's memory plan also takes it while those folders are not there."""
    mtp_num_layers: int | None = None
    """MTP layers to use: None keeps the checkpoint's; 0 drops the head; other values must match it."""
    dtype: str = "auto"
    """Parameter dtype: auto (float32 on CPU, bfloat16 on GPU), float32 or bfloat16."""
    device: str = "auto"
    """auto (cuda when available), cpu or cuda."""
    sft_warmup_steps: int = 0
    """Supervised steps on the built-in task's answers before RL (built-in task only)."""
    sft_warmup_lr: float = 3e-3
    """Learning rate of the supervised warm-up."""
    sft_warmup_batch_size: int = 64
    """Examples per step of the supervised warm-up (drawn with replacement from the task's problems)."""
    sft_warmup_label_smoothing: float = 0.0
    """Label smoothing of the warm-up: the policy learns the answers but stays unsure of them."""

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"`--dtype` {self.dtype!r}: expected auto, float32 or bfloat16")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"`--device` {self.device!r}: expected auto, cpu or cuda")
        if self.mtp_num_layers is not None:
            check_int("--mtp-num-layers", self.mtp_num_layers, 0)
        check_int("--sft-warmup-steps", self.sft_warmup_steps, 0)
        check_int("--sft-warmup-batch-size", self.sft_warmup_batch_size, 1)
        check_number("--sft-warmup-lr", self.sft_warmup_lr, 0)
        check_number("--sft-warmup-label-smoothing", self.sft_warmup_label_smoothing, 0, 1, high_open=True)


@dataclass(kw_only=True, slots=True)
class RolloutConfig:
    """What each rollout step generates."""

    num_rollout: int = 10
    """Rollout steps of the run."""
    rollout_batch_size: int = 8
    """Prompts per rollout step."""
    n_samples_per_prompt: int = 2
    """Responses per prompt (the GRPO group size)."""
    rollout_max_response_len: int = 1024
    """Most tokens generated per response."""
    rollout_temperature: float = 1.0
    """Sampling temperature of rollouts, > 0 (the trainer's log-probs use logits / temperature)."""
    rollout_top_p: float = 1.0
    """Nucleus sampling mass of rollouts."""
    rollout_top_k: int = -1
    """Top-k of rollouts (-1: off)."""
    rollout_engine: str | None = None
    """URL of a running `league serve` to generate with (default: an in-process engine on the policy)."""
    rollout_num_gpus_per_engine: int = 1
    """Ranks one rollout engine spans (the reference's name): its heads split over `--sglang-tp-size` and its
    experts over `--sglang-ep-size` (the larger is this; with neither set, the heads split over all of them); the
    run's ranks form data-parallel engines of this size."""
    offload_rollout: bool | None = None
    """Give back the in-process engine's memory while the trainer runs (`--offload-rollout-level` says what) and take
    it again for the next rollout (the reference's name). Default: on when the engine is on a GPU."""
    offload_rollout_level: list[str] = field(default_factory=lambda: ["kv_cache", "weight"])
    """What `--offload-rollout` gives back: `kv_cache` (the cache slots and captured graphs) and `weight` (the
    engine's copy of the weights, across ranks; rewritten by the weight sync after the step, so not kept; in one
    process the engine reads the policy, whose weights stay)."""

    def __post_init__(self) -> None:
        for name in (
            "num_rollout",
            "rollout_batch_size",
            "n_samples_per_prompt",
            "rollout_max_response_len",
            "rollout_num_gpus_per_engine",
        ):
            check_int(f"--{name.replace('_', '-')}", getattr(self, name), 1)
        check_number("--rollout-temperature", self.rollout_temperature, 0, low_open=True)
        check_number("--rollout-top-p", self.rollout_top_p, 0, 1, low_open=True)
        check_top_k("--rollout-top-k", self.rollout_top_k)
        unknown = sorted(set(self.offload_rollout_level) - {"kv_cache", "weight"})
        if unknown or not self.offload_rollout_level:
            raise ValueError(f"`--offload-rollout-level` {self.offload_rollout_level}: expected kv_cache and/or weight")


@dataclass(kw_only=True, slots=True)
class EvalConfig:
    """Periodic evaluation."""

    eval_interval: int | None = None
    """Evaluate every this many rollout steps (and after the last); None or 0 disables."""
    eval_prompt_data: list[str] = field(default_factory=list)
    """Evaluation sets as NAME PATH pairs (built-in: NAME builtin:<task>)."""
    n_samples_per_eval_prompt: int = 1
    """Responses per evaluation prompt (avg@k)."""
    eval_max_response_len: int | None = None
    """Most tokens per evaluation response (default: rollout_max_response_len)."""
    eval_temperature: float | None = None
    """Evaluation temperature (default: rollout_temperature)."""
    eval_top_p: float = 1.0
    """Evaluation nucleus mass."""

    def __post_init__(self) -> None:
        if len(self.eval_prompt_data) % 2:
            raise ValueError(f"`--eval-prompt-data` takes NAME PATH pairs, got {self.eval_prompt_data}")
        if self.eval_interval is not None:
            check_int("--eval-interval", self.eval_interval, 0)
        if self.eval_max_response_len is not None:
            check_int("--eval-max-response-len", self.eval_max_response_len, 1)
        check_int("--n-samples-per-eval-prompt", self.n_samples_per_eval_prompt, 1)
        if self.eval_temperature is not None:
            check_number("--eval-temperature", self.eval_temperature, 0)
        check_number("--eval-top-p", self.eval_top_p, 0, 1, low_open=True)


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    """Saving and resuming."""

    save: str | None = None
    """Folder for checkpoints: DCP folders step_00000k (policy, KL reference and optimizer as the ranks hold them;
    step, data position and RNG; the policy's config and tokenizer), `latest` naming the newest; alone, the run saves
    after its last step. Every rank must see it (a shared file system across machines)."""
    save_interval: int | None = None
    """Also save every this many rollout steps; needs --save. None or 0: only after the last."""
    keep_last: int | None = None
    """Keep only the newest this many checkpoints in --save, deleting older step_* folders after each save (never
    the one `latest` names); None keeps all."""
    load: str | None = None
    """Resume from this DCP checkpoint folder (or the one its `latest` file names), at any number of ranks; the
    policy's architecture, weights and tokenizer come from it. A folder of `league convert hf-to-dcp` (no train state)
    starts at step 0 from its weights."""
    load_unsafe_pickle: bool = False
    """Read --load's .metadata (DCP's pickle) with full pickle, which runs any code the file holds: only for a folder
    you trust. By default only DCP's metadata classes unpickle."""

    def __post_init__(self) -> None:
        for name, least in (("save_interval", 0), ("keep_last", 1)):
            if getattr(self, name) is not None:
                check_int(f"--{name.replace('_', '-')}", getattr(self, name), least)
                if self.save is None and getattr(self, name):
                    raise ValueError(f"`--{name.replace('_', '-')}` is set but `--save` is not")
        if self.load_unsafe_pickle and self.load is None:
            raise ValueError("`--load-unsafe-pickle` is set but `--load` is not")


@dataclass(kw_only=True, slots=True)
class RunConfig:
    """Where the run writes, and its seed."""

    run_dir: str | None = None
    """Run folder for metrics, plots and the resolved config (default: runs/<recipe>-<time>)."""
    seed: int = 1234
    """Seed of the run (initialisation, sampling, shuffling), in [0, 2**63 - 1]."""
    tensorboard: bool = True
    """Write TensorBoard event files in the run folder."""
    num_threads: int | None = None
    """CPU threads of torch's operators (torch.set_num_threads); None keeps torch's default, one per core."""

    def __post_init__(self) -> None:
        check_seed("--seed", self.seed)
        if self.num_threads is not None:
            check_int("--num-threads", self.num_threads, 1)


COMPONENTS = (
    "model",
    "data",
    "rollout",
    "engine",
    "algo",
    "train",
    "optim",
    "parallel",
    "reward",
    "eval",
    "checkpoint",
    "run",
    "architecture",
)


@dataclass(kw_only=True, slots=True)
class JobConfig:
    """A full run. ``recipe`` and ``mode`` name where the values came from."""

    recipe: str = "tiny"
    mode: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    algo: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)
    architecture: MegatronModelArgs = field(default_factory=MegatronModelArgs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe,
            "mode": self.mode,
            **{name: dataclasses.asdict(getattr(self, name)) for name in COMPONENTS},
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def component_classes() -> dict[str, type]:
    """The config class of each component (each lives with the package it configures, or here)."""
    return {
        "model": ModelConfig,
        "data": DataConfig,
        "rollout": RolloutConfig,
        "engine": EngineConfig,
        "algo": AlgorithmConfig,
        "train": TrainConfig,
        "optim": OptimConfig,
        "parallel": ParallelConfig,
        "reward": RewardConfig,
        "eval": EvalConfig,
        "checkpoint": CheckpointConfig,
        "run": RunConfig,
        "architecture": MegatronModelArgs,
    }


def field_owners() -> dict[str, str]:
    """Each component field's name -> the component that has it (names are unique across components)."""
    owners: dict[str, str] = {}
    for component, cls in component_classes().items():
        for f in dataclasses.fields(cls):
            assert f.name not in owners, f"field {f.name} is in both {owners[f.name]} and {component}"
            owners[f.name] = component
    return owners


def apply_overrides(job: JobConfig, overrides: dict[str, Any]) -> JobConfig:
    """A new JobConfig with ``{field_name: value}`` applied on top (each component re-validated)."""
    owners = field_owners()
    per_component: dict[str, dict[str, Any]] = {}
    for name, value in overrides.items():
        if name not in owners:
            raise ValueError(f"unknown option --{name.replace('_', '-')}")
        per_component.setdefault(owners[name], {})[name] = value
    changes = {c: dataclasses.replace(getattr(job, c), **kw) for c, kw in per_component.items()}
    return dataclasses.replace(job, **changes)


def write_config(job: JobConfig, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(job.to_json() + "\n")
    tmp.replace(path)
