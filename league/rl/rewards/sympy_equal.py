"""Symbolic equality of two normalised answers: tuples and intervals element by element, sets and lists
in any order, and each element through sympy.

LaTeX is parsed with ``latex2sympy2_extended`` (an ANTLR grammar), never with ``sympy.sympify`` or
``parse_expr``, which evaluate Python and so must not see model output. Not responsible for
normalising the answers (``normalize``) or for bounding the time a comparison takes: guards here skip
the obviously expensive cases, and the worker pool (``pool``) cuts off the rest.
"""

import re

import sympy
from latex2sympy2_extended import latex2sympy

from league.rl.rewards.normalize import normalize_element

_INTEGER_RE = re.compile(r"-?\d+")
_SIMPLE_FRACTION_RE = re.compile(r"(-?)\\frac\{(-?\d+)\}\{(\d+)\}")
# inputs on which sympy may not finish: towers of exponents, huge exponents, factorials of large numbers
_EXPENSIVE_RE = re.compile(r"\^\{[^{}]*\^|\^\d+\^|\^\{?-?\d{4,}|\d{3,}!|[})]!")
_PLAIN_SQRT_RE = re.compile(r"(?<![\\a-zA-Z])sqrt\(([^()]*)\)")
_PLAIN_PI_RE = re.compile(r"(?<![\\a-zA-Z])pi(?![a-zA-Z])")
_OPENERS, _CLOSERS = "([{", ")]}"
_MAX_LENGTH = 200
_MAX_SYMBOLS = 2
_MAX_SIMPLIFY_OPS = 60
_RELATIVE_TOLERANCE = 1e-9
_MAX_UNORDERED = 16


def _top_level_split(text: str) -> list[str]:
    """Split at the commas that are not inside brackets or braces."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(text):
        char = text[i]
        if char == "\\" and text[i + 1 : i + 2] in ("{", "}"):
            depth += 1 if text[i + 1] == "{" else -1
            i += 2
            continue
        if char in _OPENERS:
            depth += 1
        elif char in _CLOSERS:
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
        i += 1
    parts.append(text[start:])
    return parts


def _encloses_whole(text: str, open_len: int, close_len: int) -> bool:
    """Whether the opening bracket at the start is closed only by the closing bracket at the end."""
    inner = text[open_len:-close_len]
    depth = 0
    for char in inner:
        depth += (char in _OPENERS) - (char in _CLOSERS)
        if depth < 0:
            return False
    return depth == 0


def split_elements(text: str) -> tuple[str, list[str]]:
    """The kind of a normalised answer and its elements.

    Args:
        text (str): a normalised answer.

    Returns:
        ``(kind, elements)``. ``kind`` is the bracket pair of a tuple or interval (``"()"``, ``"[)"``, ...),
        ``"unordered"`` for a set ``\\{a,b\\}`` or a bare list ``a,b``, or ``""`` for a single answer.
    """
    if text.startswith("\\{") and text.endswith("\\}") and len(text) > 4 and _encloses_whole(text, 2, 2):
        return "unordered", _top_level_split(text[2:-2])
    if len(text) > 2 and text[0] in "([" and text[-1] in ")]" and _encloses_whole(text, 1, 1):
        parts = _top_level_split(text[1:-1])
        if len(parts) > 1:
            return text[0] + text[-1], parts
    parts = _top_level_split(text)
    if len(parts) > 1:
        return "unordered", parts
    return "", [text]


def to_sympy(text: str) -> sympy.Basic | None:
    """Parse a normalised answer with latex2sympy, or None when it is too long, too expensive or unparsable.

    Args:
        text (str): a normalised answer (one element).

    Returns:
        The sympy object, or None.
    """
    if not text or len(text) > _MAX_LENGTH or _EXPENSIVE_RE.search(text):
        return None
    text = _PLAIN_PI_RE.sub(r"\\pi ", _PLAIN_SQRT_RE.sub(r"\\sqrt{\1}", text))
    try:
        expr = latex2sympy(text)
    except Exception:
        return None
    if not isinstance(expr, sympy.Basic) or len(expr.free_symbols) > _MAX_SYMBOLS:
        return None
    return expr


def sympy_objects_equal(x: sympy.Basic, y: sympy.Basic) -> bool:
    """Whether two parsed answers are equal: structurally, numerically (relative 1e-9) or by ``simplify``.

    Args:
        x (sympy.Basic): one answer.
        y (sympy.Basic): the other.

    Returns:
        True when equal.
    """
    try:
        if x == y:
            return True
        if isinstance(x, sympy.Set) or isinstance(y, sympy.Set):
            return False
        if not (isinstance(x, sympy.Expr) and isinstance(y, sympy.Expr)):
            return False
        if not x.free_symbols and not y.free_symbols:
            difference = sympy.N(x - y, 30)
            scale = max(sympy.Integer(1), sympy.Abs(sympy.N(y, 30)))
            return bool(sympy.Abs(difference) <= _RELATIVE_TOLERANCE * scale)
        if sympy.count_ops(x) + sympy.count_ops(y) > _MAX_SIMPLIFY_OPS:
            return False
        return bool(sympy.simplify(x - y) == 0)
    except Exception:
        return False


def _simple_fraction(text: str) -> tuple[int, int] | None:
    """``\\frac{a}{b}`` of integers as ``(signed numerator, denominator)``, not reduced."""
    match = _SIMPLE_FRACTION_RE.fullmatch(text)
    if match is None:
        return None
    sign, numerator, denominator = match.groups()
    return (-int(numerator) if sign else int(numerator)), int(denominator)


def elements_equal(given: str, truth: str) -> bool:
    """Whether one normalised element equals the truth's: strict for integers and plain fractions, else sympy.

    An integer truth (or an integer given answer) must match exactly, and two plain fractions must be
    the same fraction as written up to its sign's place (``2/4`` is not ``1/2``, ``-\\frac{1}{2}`` is
    ``\\frac{-1}{2}``): only other forms go to sympy.

    Args:
        given (str): the normalised given element.
        truth (str): the normalised ground-truth element.

    Returns:
        True when equal.
    """
    if given == truth:
        return True
    if not given or not truth:
        return False
    if _INTEGER_RE.fullmatch(given) or _INTEGER_RE.fullmatch(truth):
        return False
    given_fraction, truth_fraction = _simple_fraction(given), _simple_fraction(truth)
    if given_fraction is not None and truth_fraction is not None:
        return given_fraction == truth_fraction
    x, y = to_sympy(given), to_sympy(truth)
    return x is not None and y is not None and sympy_objects_equal(x, y)


def _unordered_equal(given: list[str], truth: list[str]) -> bool:
    if len(given) > _MAX_UNORDERED:
        return sorted(given) == sorted(truth)
    unused = list(given)
    for element in truth:
        match = next((i for i, candidate in enumerate(unused) if elements_equal(candidate, element)), None)
        if match is None:
            return False
        unused.pop(match)
    return True


def answers_equal_under_sympy(given: str, truth: str) -> bool:
    """Whether two normalised answers are equal, element by element for tuples, intervals, sets and lists.

    Tuples and intervals need the same brackets and the same number of elements, compared in order;
    sets (``\\{1,2\\}``) and bare lists (``1,2``) are compared in any order.

    Args:
        given (str): the normalised given answer.
        truth (str): the normalised ground-truth answer.

    Returns:
        True when equal.
    """
    given_kind, given_elements = split_elements(given)
    truth_kind, truth_elements = split_elements(truth)
    given_elements = [normalize_element(e) for e in given_elements]
    truth_elements = [normalize_element(e) for e in truth_elements]
    if given_kind != truth_kind or len(given_elements) != len(truth_elements):
        return False
    if given_kind == "unordered":
        return _unordered_equal(given_elements, truth_elements)
    return all(elements_equal(g, t) for g, t in zip(given_elements, truth_elements))
