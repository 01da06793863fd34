"""Normalisation of final answers, so that one answer written in different ways becomes one string.

Two normalisers: ``normalize_answer`` in the style of the MATH benchmark's grader (used by the
``deepscaler`` reward before its symbolic check) and ``normalize_final_answer`` in the style of Minerva
(used by the ``dapo`` reward, which compares strings only). Not responsible for finding the answer in a
response, nor for symbolic equality (``sympy_equal``).
"""

import re

from league.rl.rewards.latex import (
    brace_arguments,
    canonical_number,
    last_boxed_answer,
    matching_brace,
    strip_outer_braces,
)

_TEXT_COMMANDS = r"text|textbf|textit|textrm|mathrm|mathbf|mathit|mbox|boxed|fbox"
_WHOLE_TEXT_RE = re.compile(rf"^\\(?:{_TEXT_COMMANDS})\{{(.*)\}}$", re.DOTALL)
_INNER_TEXT_RE = re.compile(rf"\\(?:{_TEXT_COMMANDS}|overline)\{{([^{{}}]*)\}}")
_SPACING_RE = re.compile(r"\\[!,;:>]|\\q?quad(?![a-zA-Z])|\\ |~")
_SIZING_RE = re.compile(r"\\(?:left|right|[bB]igg?[lr]?)(?:\.|(?![a-zA-Z]))")
_DEGREES_RE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree(?![a-zA-Z])")
_EXPONENT = r"(?:\^\{?\d\}?)?"
_UNIT_WORDS = (
    "cm|mm|km|meters?|centimeters?|kilometers?|inch|inches|feet|foot|ft|yards?|miles?|mph|"
    "seconds?|sec|minutes?|min|hours?|hrs?|days?|weeks?|months?|years?|"
    "degrees?|radians?|units?|sq|square|dollars?|cents?|pounds?|lbs?|kg|grams?|liters?|ml|mL|"
    "ways|points|digits|people|students|edges|meals"
)
# one-letter units could be variables ("2m"), so they count as units only after a space ("2 m")
_SHORT_UNITS = "m|s|g|L|in"
_UNIT_AFTER_NUMBER = rf"(?:(?<=[\d}}])\s*(?:{_UNIT_WORDS})|(?<=[\d}}])\s+(?:{_SHORT_UNITS})){_EXPONENT}"
_TRAILING_TEXT_UNIT_RE = re.compile(rf"(?<=\S)\s*\\(?:text|mbox|mathrm|textrm)\{{[^{{}}]*\}}{_EXPONENT}\s*\.?$")
_TRAILING_WORD_UNIT_RE = re.compile(rf"{_UNIT_AFTER_NUMBER}\s*\.?$")
_THOUSANDS_RE = re.compile(r"(?<![\d.])(\d{1,3})((?:,\d{3})+)(?![\d])")
_SLASH_FRACTION_RE = re.compile(r"(-?)(\d+)/(\d+)")
_COMMAND_SPACE_RE = re.compile(r"(\\[a-zA-Z]+)\s+(?=[a-zA-Z])|\s+")
_MINERVA_FILLERS = (
    "\\ldots",
    "\\dots",
    "\\cdots",
    "\\;",
    ",\\!",
    "{,}",
    '"',
    "^{\\circ}",
    "^\\circ",
    "\\%",
    "%",
    "\\$",
    "$",
)
_MINERVA_UNIT_RE = re.compile(rf"{_UNIT_AFTER_NUMBER}(?=\s*\.?\s*$)")


def _unwrap_whole_text(text: str) -> str:
    while (match := _WHOLE_TEXT_RE.match(text)) and matching_brace(text, text.index("{")) == len(text) - 1:
        text = match.group(1).strip()
    return text


def _remove_spaces(text: str) -> str:
    """Remove whitespace, except one space between a command and a letter (``\\pi r`` is not ``\\pir``)."""
    return _COMMAND_SPACE_RE.sub(lambda m: m.group(1) + " " if m.group(1) else "", text)


def _remove_trailing_units(text: str) -> str:
    while True:
        shorter = _TRAILING_TEXT_UNIT_RE.sub("", text)
        shorter = _TRAILING_WORD_UNIT_RE.sub("", shorter).rstrip()
        if shorter == text:
            return text
        text = shorter


def _drop_equation_lhs(text: str) -> str:
    parts = text.split("=")
    if len(parts) == 2 and len(parts[0].strip()) <= 2:
        return parts[1]
    return text


def _fix_shorthand(text: str) -> str:
    text = brace_arguments(text, "\\frac", 2)
    return brace_arguments(text, "\\sqrt", 1)


def _strip_thousands(text: str) -> str:
    text = text.replace("{,}", ",")
    return _THOUSANDS_RE.sub(lambda m: m.group(1) + m.group(2).replace(",", ""), text)


def normalize_element(text: str) -> str:
    """The last steps of ``normalize_answer``, also applied to each element of a tuple or set.

    Drops enclosing braces, writes ``a/b`` of integers as ``\\frac{a}{b}`` and plain numbers canonically.

    Args:
        text (str): an answer or one element of it, already without spaces.

    Returns:
        The element in canonical form.
    """
    text = strip_outer_braces(text)
    match = _SLASH_FRACTION_RE.fullmatch(text)
    if match is not None:
        sign, numerator, denominator = match.groups()
        return f"{sign}\\frac{{{numerator}}}{{{denominator}}}"
    return canonical_number(text) or text


def normalize_answer(answer: str) -> str:
    """MATH-style normalisation of one final answer (already taken out of its ``\\boxed{}``).

    Removes what does not change the value: an enclosing ``\\text{}``, spacing commands and spaces,
    ``\\left``/``\\right``, ``\\displaystyle``, dollars, percent signs, degrees, trailing units
    (``5 \\text{ cm}``, ``5 cm^2``), a short left-hand side (``x = 5``), thousands separators
    (``1,000``, ``1{,}000``, ``1\\,000``) and trailing periods. Rewrites ``\\dfrac``/``\\tfrac`` as
    ``\\frac``, braces shorthand arguments (``\\frac12``, ``\\sqrt3``), turns ``a/b`` of integers into
    ``\\frac{a}{b}``, writes plain numbers canonically (``025`` -> ``25``, ``2.50`` -> ``2.5``) and
    lower-cases answers made of letters only.

    Args:
        answer (str): the answer.

    Returns:
        The normalised answer; empty when nothing is left.
    """
    text = answer.replace("\\\\", "\\").replace("\n", " ").strip()
    text = _unwrap_whole_text(text)
    text = _SPACING_RE.sub(" ", text)
    text = _SIZING_RE.sub("", text)
    text = text.replace("\\displaystyle", "")
    text = re.sub(r"\\[dt]frac(?![a-zA-Z])", r"\\frac", text)
    text = _DEGREES_RE.sub("", text)
    text = text.replace("\\$", "").replace("$", "")
    text = text.replace("\\%", "").replace("%", "")
    text = _remove_trailing_units(text.strip())
    text = _INNER_TEXT_RE.sub(r"\1", text)
    text = _drop_equation_lhs(text)
    text = _remove_spaces(text)
    text = _fix_shorthand(text)
    text = _strip_thousands(text)
    text = normalize_element(text.rstrip("."))
    if text.isalpha():
        text = text.lower()
    return text


def normalize_final_answer(answer: str) -> str:
    """Minerva-style normalisation of the text after ``Answer:`` (the ``dapo`` reward's normaliser).

    Keeps the right-hand side of the last ``=``, the content of a ``\\boxed{}`` and of the first
    ``$...$``, unwraps ``\\text{}``-like commands, removes fillers (``\\ldots``, degrees, percent,
    dollars), a trailing unit word and all spaces, braces shorthand arguments, drops thousands
    separators of an integer and writes plain numbers canonically (``025`` -> ``25``).

    Args:
        answer (str): the text after ``Answer:``.

    Returns:
        The normalised answer; empty when nothing is left.
    """
    text = answer.split("=")[-1]
    boxed = last_boxed_answer(text)
    if boxed is not None:
        text = boxed
    math = re.search(r"\$(.*?)\$", text)
    if math is not None:
        text = math.group(1)
    text = _INNER_TEXT_RE.sub(r"\1", text)
    for filler in _MINERVA_FILLERS:
        text = text.replace(filler, "")
    text = _MINERVA_UNIT_RE.sub("", text)
    text = _remove_spaces(text.replace("\\ ", " "))
    text = _fix_shorthand(re.sub(r"\\[dt]frac(?![a-zA-Z])", r"\\frac", text))
    text = text.rstrip(".")
    if re.fullmatch(r"\d{1,3}(?:,\d{3})+", text):
        text = text.replace(",", "")
    return canonical_number(text) or text
