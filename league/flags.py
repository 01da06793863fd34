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
                help="Print the resolved config, then make every start-up check of the run (layout, batch sizes, "
                "folders, inputs) and exit: code 1 with the error if the run would refuse to start.",
            ),
        ),
    ]
    for name, mode in ALIASES.items():
        option = typer.Option(False, f"--{name.replace('_', '-')}", help=f"Alias of --numerics {mode}.")
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=bool))
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
        aliased = [ALIASES[name] for name in ALIASES if flags.pop(name)]
        numerics = aliased + ([flags["numerics"]] if flags.get("numerics") is not None else [])
        if len(set(numerics)) > 1:
            raise ValueError(f"`--numerics` is given twice ({' and '.join(numerics)}); choose one")
        if numerics:
            flags["numerics"] = numerics[0]
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
