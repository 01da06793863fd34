"""The reward registry: built-in rule-based rewards by name, loading a user's reward function from
``module:function`` or ``path/to/file.py:function``, and turning what a reward returns into a float.

Not responsible for isolation or time bounds: ``compute_reward`` runs in the caller's process and
thread, and may take as long as the grader takes (``pool.RewardModel`` bounds and isolates it).
"""

import hashlib
import importlib
import importlib.util
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from league.rl.rewards.dapo import dapo_reward
from league.rl.rewards.deepscaler import deepscaler_reward
from league.rl.rewards.exact import exact_match_reward
from league.rl.rewards.mathverify import math_verify_reward

RuleReward = Callable[[str, str], float]
"""A built-in reward: ``(response, label) -> float`` in [0, 1]."""
CustomReward = Callable[[str, str, dict[str, Any]], Any]
"""A user reward: ``(response, label, metadata) -> number`` (anything ``float()`` accepts, except text)."""

REWARDS: dict[str, RuleReward] = {
    "deepscaler": deepscaler_reward,
    "dapo": dapo_reward,
    "math": math_verify_reward,
    "exact": exact_match_reward,
}


def get_rule_reward(rm_type: str) -> RuleReward:
    """The built-in reward named ``rm_type``.

    Args:
        rm_type (str): a key of ``REWARDS``.

    Returns:
        The reward function.
    """
    if rm_type not in REWARDS:
        raise ValueError(f"`rm_type` {rm_type!r} is not a built-in reward; expected one of {sorted(REWARDS)}")
    return REWARDS[rm_type]


def compute_reward(rm_type: str, response: str, label: str) -> float:
    """The reward of one response under a built-in rule, computed in this process with no time limit.

    Args:
        rm_type (str): ``"deepscaler"``, ``"dapo"`` or ``"math"``.
        response (str): the generated text.
        label (str): the ground-truth answer.

    Returns:
        The reward, 1.0 or 0.0.
    """
    return get_rule_reward(rm_type)(response, label)


def _split_custom_path(path: str) -> tuple[str, str]:
    location, sep, name = path.rpartition(":")
    if not sep:
        if path.endswith(".py"):
            raise ValueError(f"`custom_rm_path` {path!r} names a file but no function; expected 'file.py:function'")
        location, _, name = path.rpartition(".")
    if not location or not name.isidentifier():
        raise ValueError(
            f"`custom_rm_path` {path!r} is not 'module:function', 'package.module.function' or 'file.py:function'"
        )
    return location, name


def _import_file(path: str, file: Path) -> object:
    if not file.is_file():
        raise ValueError(f"`custom_rm_path` {path!r}: file {str(file)!r} not found")
    digest = hashlib.sha1(str(file.resolve()).encode()).hexdigest()[:12]
    module_name = f"_league_custom_reward_{file.stem}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[module_name]
        raise ValueError(f"`custom_rm_path` {path!r}: running {str(file)!r} raised {error!r}") from error
    return module


def _import_module(path: str, module_name: str) -> object:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name is not None and (module_name == error.name or module_name.startswith(error.name + ".")):
            raise ValueError(f"`custom_rm_path` {path!r}: module {module_name!r} not found") from error
        raise ValueError(f"`custom_rm_path` {path!r}: importing {module_name!r} raised {error!r}") from error
    except Exception as error:
        raise ValueError(f"`custom_rm_path` {path!r}: importing {module_name!r} raised {error!r}") from error


def load_custom_reward(path: str) -> CustomReward:
    """Load a user's reward function.

    Args:
        path (str): ``"package.module:function"`` (or ``"package.module.function"``), or
            ``"path/to/file.py:function"``. The function is called as ``f(response, label, metadata)``
            and returns a number.

    Returns:
        The function.
    """
    location, name = _split_custom_path(path)
    if location.endswith(".py") or "/" in location:
        module = _import_file(path, Path(location).expanduser())
    else:
        module = _import_module(path, location)
    if not hasattr(module, name):
        raise ValueError(f"`custom_rm_path` {path!r}: {location!r} has no attribute {name!r}")
    function = getattr(module, name)
    if not callable(function):
        raise ValueError(f"`custom_rm_path` {path!r}: {name!r} is a {type(function).__name__}, not a function")
    return function


def resolve_reward(rm_type: str, custom_rm_path: str | None) -> CustomReward:
    """The function a reward worker calls: the user's when ``custom_rm_path`` is set, else the built-in rule.

    Args:
        rm_type (str): a key of ``REWARDS``; ignored when ``custom_rm_path`` is set.
        custom_rm_path (str, Optional): see ``load_custom_reward``.

    Returns:
        A function of ``(response, label, metadata)``.
    """
    if custom_rm_path is not None:
        return load_custom_reward(custom_rm_path)
    rule = get_rule_reward(rm_type)
    return lambda response, label, metadata: rule(response, label)


def to_reward_value(value: object) -> float:
    """A reward function's return value as a finite float.

    Args:
        value (object): what the function returned: a number, a bool, a 0-d tensor or array, ...

    Returns:
        The float.
    """
    if value is None or isinstance(value, str | bytes):
        raise TypeError(f"reward function returned {type(value).__name__} {value!r:.80}, expected a number")
    try:
        reward = float(value)
    except (TypeError, ValueError) as error:
        raise TypeError(f"reward function returned {type(value).__name__}, expected a number") from error
    if not math.isfinite(reward):
        raise ValueError(f"reward function returned {reward}, expected a finite number")
    return reward
