"""JobConfig: the whole run, composed of each component's own small config. Only the entry point
sees it; components receive their own part.

Also turns the dataclass fields into command-line flags (``field_name`` -> ``--field-name``), with the
field docstrings as help, so the flags and the config can never drift apart. Not responsible for
running anything.
"""

import ast
import dataclasses
import functools
import inspect
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from league.engine.engine import EngineConfig
from league.parallel.dims import ParallelConfig
from league.rl.optim import OptimConfig
from league.rl.trainer import AlgorithmConfig, TrainConfig


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """Which policy to train."""

    hf_checkpoint: str | None = None
    """Hugging Face checkpoint folder of the policy (with its MTP layer); None builds the preset below."""
    model_preset: str = "tiny"
    """Built-in architecture used when no --hf-checkpoint is given (randomly initialised)."""
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
        if self.sft_warmup_steps < 0:
            raise ValueError(f"`--sft-warmup-steps` must be >= 0, got {self.sft_warmup_steps}")
        if self.sft_warmup_batch_size < 1:
            raise ValueError(f"`--sft-warmup-batch-size` must be >= 1, got {self.sft_warmup_batch_size}")


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
    """Sampling temperature of rollouts (the trainer's log-probs use logits / temperature)."""
    rollout_top_p: float = 1.0
    """Nucleus sampling mass of rollouts."""
    rollout_top_k: int = -1
    """Top-k of rollouts (-1: off)."""
    rollout_engine: str | None = None
    """URL of a running `league serve` to generate with (default: an in-process engine on the policy)."""

    def __post_init__(self) -> None:
        for name in ("num_rollout", "rollout_batch_size", "n_samples_per_prompt", "rollout_max_response_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"`--{name.replace('_', '-')}` must be >= 1, got {getattr(self, name)}")


@dataclass(kw_only=True, slots=True)
class EvalConfig:
    """Periodic evaluation."""

    eval_interval: int | None = None
    """Evaluate every this many rollout steps (and after the last); None disables."""
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


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    """Saving and resuming."""

    save: str | None = None
    """Folder for checkpoints (model in Hugging Face format, optimizer, RNG and data position)."""
    save_interval: int | None = None
    """Save every this many rollout steps (and after the last); needs --save."""
    load: str | None = None
    """Resume from this checkpoint folder (or the latest checkpoint inside it)."""

    def __post_init__(self) -> None:
        if self.save_interval is not None and self.save is None:
            raise ValueError("`--save-interval` is set but `--save` is not")


@dataclass(kw_only=True, slots=True)
class RunConfig:
    """Where the run writes, and its seed."""

    run_dir: str | None = None
    """Run folder for metrics, plots and the resolved config (default: runs/<recipe>-<time>)."""
    seed: int = 1234
    """Seed of the run (initialisation, sampling, shuffling)."""
    tensorboard: bool = True
    """Write TensorBoard event files in the run folder."""
    num_threads: int | None = None
    """CPU threads of torch's operators (torch.set_num_threads); None keeps torch's default, one per core."""

    def __post_init__(self) -> None:
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"`--num-threads` must be >= 1, got {self.num_threads}")


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
)


@dataclass(kw_only=True, slots=True)
class JobConfig:
    """A full run. ``recipe`` and ``mode`` name where the values came from."""

    recipe: str = "tiny"
    mode: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    data: Any = None
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    algo: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    reward: Any = None
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe,
            "mode": self.mode,
            **{name: dataclasses.asdict(getattr(self, name)) for name in COMPONENTS},
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def component_classes() -> dict[str, type]:
    """The config class of each component (data and reward configs live with their modules)."""
    from league.rl.data import DataConfig
    from league.rl.rewards import RewardConfig

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
    }


@dataclass(frozen=True, slots=True)
class Flag:
    """One command-line flag: which component field it sets, its type and its help."""

    component: str
    name: str
    annotation: Any
    default: Any
    help: str

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The string literal under each field of a dataclass (its field docstring)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def all_flags() -> list[Flag]:
    """Every flag of ``league train``, one per component field; names are unique across components."""
    flags, seen = [], {}
    for component, cls in component_classes().items():
        docs = field_docs(cls)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            assert f.name not in seen, f"flag --{f.name} defined by {seen[f.name]} and {component}"
            seen[f.name] = component
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = None  # required by the component; recipes always set it
            flags.append(Flag(component, f.name, hints[f.name], default, docs.get(f.name, "")))
    return flags


def apply_overrides(job: JobConfig, overrides: dict[str, Any]) -> JobConfig:
    """A new JobConfig with ``{field_name: value}`` applied on top (each component re-validated)."""
    by_name = {f.name: f.component for f in all_flags()}
    per_component: dict[str, dict[str, Any]] = {}
    for name, value in overrides.items():
        if name not in by_name:
            raise ValueError(f"unknown option --{name.replace('_', '-')}")
        per_component.setdefault(by_name[name], {})[name] = value
    changes = {c: dataclasses.replace(getattr(job, c), **kw) for c, kw in per_component.items()}
    return dataclasses.replace(job, **changes)


def base_type(annotation: Any) -> Any:
    """``int | None`` -> int; ``list[str]`` stays."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return annotation


def write_config(job: JobConfig, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(job.to_json() + "\n")
    tmp.replace(path)


def train_command(run: typing.Callable[[JobConfig, bool], None]) -> typing.Callable[..., None]:
    """A Typer command whose options are every :func:`all_flags` field, plus ``--recipe``, ``--mode`` and
    ``--dry-run``. An option left out keeps the recipe's value; ``run(job, dry_run)`` gets the result."""
    import typer

    from league.recipes import MODES, RECIPES, get_recipe

    tiny = get_recipe("tiny")
    params = [
        inspect.Parameter(
            "recipe",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=str,
            default=typer.Option("tiny", help=f"Named run to start from: {', '.join(sorted(RECIPES))}."),
        ),
        inspect.Parameter(
            "mode",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=typing.Optional[str],  # noqa: UP045
            default=typer.Option(None, help=f"Switch the recipe's sizes: {' or '.join(MODES)}."),
        ),
        inspect.Parameter(
            "dry_run",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=bool,
            default=typer.Option(False, "--dry-run", help="Print the resolved config and exit."),
        ),
    ]
    for flag in all_flags():
        shown = getattr(getattr(tiny, flag.component), flag.name)
        help_text = f"{flag.help} [{flag.component}; tiny recipe: {shown!r}]"
        base = base_type(flag.annotation)
        if base is bool:
            option = typer.Option(
                None, f"{flag.option}/--no-{flag.name.replace('_', '-')}", help=help_text, show_default=False
            )
            annotation = typing.Optional[bool]  # noqa: UP045
        elif typing.get_origin(base) is list:
            option = typer.Option(None, flag.option, help=help_text + " Comma-separated.", show_default=False)
            annotation = typing.Optional[str]  # noqa: UP045
        else:
            option = typer.Option(None, flag.option, help=help_text, show_default=False)
            annotation = typing.Optional[base]  # noqa: UP045
        params.append(
            inspect.Parameter(flag.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)
        )
    list_fields = {
        f.name: typing.get_args(base_type(f.annotation))[0]
        for f in all_flags()
        if typing.get_origin(base_type(f.annotation)) is list
    }

    def command(recipe: str, mode: str | None, dry_run: bool, **flags: Any) -> None:
        overrides = {}
        for name, value in flags.items():
            if value is None:
                continue
            if name in list_fields:
                items = [v.strip() for v in value.replace(" ", ",").split(",") if v.strip()]
                try:
                    value = [list_fields[name](v) for v in items]
                except ValueError:
                    raise ValueError(f"--{name.replace('_', '-')}: cannot read {value!r} as a list") from None
            overrides[name] = value
        run(apply_overrides(get_recipe(recipe, mode), overrides), dry_run)

    command.__signature__ = inspect.Signature(params)
    command.__doc__ = (
        "Train a policy with GRPO (and its MTP head), rolling out with league's engine.\n\n"
        "With no options: the embedded `tiny` recipe, a tiny model learning addition on CPU in "
        "minutes. Options override the recipe's values; the resolved config is written to the "
        "run folder."
    )
    return command
