"""Command-line flags generated from config dataclasses: each field becomes ``--field-name`` with its field docstring
as help, so the flags and the configs can never drift apart.

Not responsible for the configs themselves (``league.config`` and each component's module) nor for running
anything: a command built here hands the resolved config to the function it is given.
"""

import ast
import dataclasses
import functools
import inspect
import types
import typing
from dataclasses import dataclass
from typing import Any

from league.config import JobConfig, apply_overrides, component_classes


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


def base_type(annotation: Any) -> Any:
    """``int | None`` -> int; ``list[str]`` stays."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return annotation


def config_flags(cls: type, component: str = "") -> list[Flag]:
    """One flag per field of the config dataclass ``cls`` (its field docstring as help)."""
    docs, hints = field_docs(cls), typing.get_type_hints(cls)
    flags = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        flags.append(Flag(component, f.name, hints[f.name], default, docs.get(f.name, "")))
    return flags


PANELS = {
    "model": "Model",
    "architecture": "Model: the reference's architecture arguments (checked against the checkpoint)",
    "data": "Data",
    "rollout": "Rollout",
    "engine": "Engine (SGLang's names; the reference's --sglang-<name> too)",
    "algo": "Algorithm",
    "train": "Training",
    "optim": "Optimizer",
    "parallel": "Parallel layout",
    "reward": "Reward",
    "eval": "Evaluation",
    "checkpoint": "Checkpoints",
    "run": "Run and logging",
}
"""``league train --help``'s group of each component's options."""


def option_parameter(
    flag: Flag, help_text: str, default_shown: bool = False, panel: str | None = None
) -> inspect.Parameter:
    """The Typer keyword parameter of a flag: ``--x/--no-x`` for booleans, comma-separated text for lists, else
    the field's type; its default is None (the option left out)."""
    import typer

    base = base_type(flag.annotation)
    if base is bool:
        names = (f"{flag.option}/--no-{flag.name.replace('_', '-')}",)
        annotation = typing.Optional[bool]  # noqa: UP045
    elif typing.get_origin(base) is list:
        names, help_text, annotation = (flag.option,), help_text + " Comma-separated.", typing.Optional[str]  # noqa: UP045
    else:
        names, annotation = (flag.option,), typing.Optional[base]  # noqa: UP045
    if default_shown and flag.default is not None:
        help_text += f" [default: {flag.default}]"
    option = typer.Option(None, *names, help=help_text, show_default=False, rich_help_panel=panel)
    return inspect.Parameter(flag.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)


def parse_list(flag: Flag, value: str) -> list:
    """A list option's text (``1,2,4`` or ``1 2 4``) as the field's list."""
    item_type = typing.get_args(base_type(flag.annotation))[0]
    items = [v.strip() for v in value.replace(" ", ",").split(",") if v.strip()]
    try:
        return [item_type(v) for v in items]
    except ValueError:
        raise ValueError(f"{flag.option}: cannot read {value!r} as a list of {item_type.__name__}") from None


def resolve_numerics(flags: dict[str, Any]) -> None:
    """Fold the aliases ``--batch-invariant`` / ``--decode-parity`` (popped from ``flags``) into ``numerics``."""
    aliased = [ALIASES[name] for name in ALIASES if flags.pop(name, False)]
    numerics = aliased + ([flags["numerics"]] if flags.get("numerics") is not None else [])
    if len(set(numerics)) > 1:
        raise ValueError(f"`--numerics` is given twice ({' and '.join(numerics)}); choose one")
    if numerics:
        flags["numerics"] = numerics[0]


def alias_parameters() -> list[inspect.Parameter]:
    import typer

    return [
        inspect.Parameter(
            name,
            inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(False, f"--{name.replace('_', '-')}", help=f"Alias of --numerics {mode}."),
            annotation=bool,
        )
        for name, mode in ALIASES.items()
    ]


def with_config(run: typing.Callable[..., None], cls: type, defaults: dict[str, Any] | None = None):
    """A command taking ``run``'s own options followed by one option per field of the config dataclass ``cls`` (and
    the numerics aliases when it has ``numerics``); it calls ``run(**own, config=cls(**fields))``, a field left out
    taking ``defaults``' value, else the dataclass default. ``run``'s own parameters must not include ``config``."""
    defaults = defaults or {}
    flags = [dataclasses.replace(f, default=defaults.get(f.name, f.default)) for f in config_flags(cls)]
    own = [p for p in inspect.signature(run).parameters.values() if p.name != "config"]
    fields = {f.name for f in flags}
    extra = alias_parameters() if "numerics" in fields else []
    params = own + [option_parameter(f, f.help, default_shown=True) for f in flags] + extra

    def command(**kwargs: Any) -> None:
        resolve_numerics(kwargs)
        given = {}
        for flag in flags:
            value = kwargs.pop(flag.name)
            if value is None:
                value = defaults.get(flag.name)
            elif typing.get_origin(base_type(flag.annotation)) is list:
                value = parse_list(flag, value)
            if value is not None:
                given[flag.name] = value
        run(**kwargs, config=cls(**given))

    command.__signature__ = inspect.Signature(params)
    command.__doc__ = run.__doc__
    return command


ALIASES = {"batch_invariant": "batch_invariant", "decode_parity": "decode_parity"}
"""Flags kept from before ``--numerics``: each sets it to one mode."""


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
            default=typer.Option(
                False,
                "--dry-run",
                help="Print the resolved config and, above one rank, the memory plan of its layout (each rank's "
                "parameter, gradient, optimizer, engine and activation bytes, for the world size of "
                "--nproc-per-node or torchrun; nothing is launched), then make every start-up check of the run "
                "(layout, batch sizes, folders, inputs) and exit: code 1 with the error if the run would refuse to "
                "start.",
            ),
        ),
    ]
    params += alias_parameters()
    flags = all_flags()
    for flag in flags:
        shown = getattr(getattr(tiny, flag.component), flag.name)
        also = f" (also --sglang-{flag.name.replace('_', '-')})" if flag.component == "engine" else ""
        help_text = f"{flag.help}{also} [tiny recipe: {shown!r}]"
        params.append(option_parameter(flag, help_text, panel=PANELS.get(flag.component, flag.component)))
    by_name = {flag.name: flag for flag in flags}

    def command(recipe: str, mode: str | None, dry_run: bool, **given: Any) -> None:
        resolve_numerics(given)
        overrides = {}
        for name, value in given.items():
            if value is None:
                continue
            if typing.get_origin(base_type(by_name[name].annotation)) is list:
                value = parse_list(by_name[name], value)
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


def reference_argv(args: list[str], engine_fields: set[str], list_options: set[str]) -> list[str]:
    """A command line in the reference system's spelling, as league's parser takes it: ``--sglang-<name>`` becomes
    league's engine option ``--<name>`` (a ValueError names an SGLang option league's engine does not have), and a
    list option's space-separated values (``--cuda-graph-bs 1 2 4``, argparse's ``nargs='+'``) are joined with
    commas. Other arguments pass through unchanged."""
    out: list[str] = []
    i = 0
    while i < len(args):
        token = args[i]
        i += 1
        if token.startswith("--sglang-"):
            name, eq, value = token[len("--sglang-") :].partition("=")
            key = name.replace("-", "_")
            if key not in engine_fields:
                known = ", ".join(f"--sglang-{f.replace('_', '-')}" for f in sorted(engine_fields))
                raise ValueError(f"`--sglang-{name}`: league's engine has no option `{key}`; it takes {known}")
            token = f"--{name}{eq}{value}"
        out.append(token)
        if token in list_options:
            values = []
            while i < len(args) and not args[i].startswith("--"):
                values.append(args[i])
                i += 1
            if values:
                out.append(",".join(values))
    return out
