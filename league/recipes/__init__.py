"""Named runs: Python functions returning a complete JobConfig.

``tiny`` is the embedded default (a tiny model learning a built-in task on CPU); ``qwen3_6_35b_a3b_mtp``
is the reference recipe, Qwen3.6-35B-A3B GRPO with MTP training on DAPO-Math-17k.
"""

from collections.abc import Callable

from league.config import JobConfig
from league.recipes import qwen3_6_35b_a3b_mtp, tiny

MODES = ("debug_minimal", "normal")
RECIPES: dict[str, Callable[[str | None], JobConfig]] = {
    "tiny": tiny.recipe,
    "qwen3_6_35b_a3b_mtp": qwen3_6_35b_a3b_mtp.recipe,
}


def get_recipe(name: str, mode: str | None = None) -> JobConfig:
    """The JobConfig of recipe ``name``; ``mode`` (debug_minimal or normal) switches its sizes."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; available: {', '.join(sorted(RECIPES))}")
    if mode is not None and mode not in MODES:
        raise ValueError(f"unknown --mode {mode!r}; expected one of {MODES}")
    return RECIPES[name](mode)
