"""String helpers for LaTeX answers: brace matching, the last ``\\boxed{...}`` of a text, shorthand
arguments (``\\frac12`` -> ``\\frac{1}{2}``) and canonical decimal numbers.

Not responsible for deciding whether two answers are equal (``normalize`` and ``sympy_equal`` do) and
never evaluates anything: these are pure functions of strings.
"""

import re
from decimal import Decimal, InvalidOperation

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_COMMAND_RE = re.compile(r"\\[a-zA-Z]+")
_NUMBER_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")


def matching_brace(text: str, open_index: int) -> int | None:
    """Index of the ``}`` that closes the ``{`` at ``open_index``; escaped braces (``\\{``, ``\\}``) are skipped.

    Args:
        text (str): the text.
        open_index (int): index of an opening ``{`` in ``text``.

    Returns:
        The index of the matching ``}``, or None when the braces are unbalanced.
    """
    depth = 0
    i = open_index
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def last_boxed_answer(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` or ``\\fbox{...}`` in ``text`` (also the ``\\boxed 5`` form).

    Only the last box counts: when it is malformed (unbalanced braces, no argument) there is no answer,
    even if an earlier box is well formed.

    Args:
        text (str): a response or a label.

    Returns:
        The box's content, or None when there is no box or the last one is malformed.
    """
    start, command = max((text.rfind(c), c) for c in _BOX_COMMANDS)
    if start < 0:
        return None
    after = start + len(command)
    i = after
    while i < len(text) and text[i].isspace():
        i += 1
    if i < len(text) and text[i] == "{":
        end = matching_brace(text, i)
        return None if end is None else text[i + 1 : end]
    if i > after:
        token = re.match(r"[^\s$]+", text[i:])
        return token.group(0) if token else None
    return None


def read_argument(text: str, index: int) -> tuple[str, int] | None:
    """One argument of a LaTeX command starting at ``text[index]``: a braced group, a command or a character.

    Args:
        text (str): the text.
        index (int): where the argument starts; spaces before it are skipped.

    Returns:
        ``(argument without braces, index after it)``, or None at the end of the text or on unbalanced braces.
    """
    while index < len(text) and text[index] == " ":
        index += 1
    if index >= len(text):
        return None
    if text[index] == "{":
        end = matching_brace(text, index)
        return None if end is None else (text[index + 1 : end], end + 1)
    if text[index] == "}":
        return None
    command = _COMMAND_RE.match(text, index)
    if command:
        return command.group(0), command.end()
    return text[index], index + 1


def brace_arguments(text: str, command: str, num_args: int) -> str:
    """Rewrite each ``command`` so that its arguments are braced: ``\\frac12`` -> ``\\frac{1}{2}``.

    An optional ``[...]`` argument (``\\sqrt[3]8``) is kept; arguments are rewritten recursively. A
    command whose arguments are missing or unbalanced is left as it is.

    Args:
        text (str): the text.
        command (str): the command with its backslash, e.g. ``"\\frac"``.
        num_args (int): how many mandatory arguments it takes.

    Returns:
        The rewritten text.
    """
    pieces, i = [], 0
    while (start := text.find(command, i)) >= 0:
        j = start + len(command)
        if j < len(text) and text[j].isalpha():
            pieces.append(text[i:j])
            i = j
            continue
        optional = ""
        if j < len(text) and text[j] == "[":
            close = text.find("]", j)
            if close < 0:
                break
            optional, j = text[j : close + 1], close + 1
        args = []
        for _ in range(num_args):
            arg = read_argument(text, j)
            if arg is None:
                break
            args.append("{" + brace_arguments(arg[0], command, num_args) + "}")
            j = arg[1]
        if len(args) < num_args:
            break
        pieces.append(text[i:start] + command + optional + "".join(args))
        i = j
    pieces.append(text[i:])
    return "".join(pieces)


def canonical_number(text: str) -> str | None:
    """A plain decimal number in one spelling: ``"025"`` -> ``"25"``, ``"2.50"`` -> ``"2.5"``, ``"-0"`` -> ``"0"``.

    Args:
        text (str): the candidate number, without spaces or thousands separators.

    Returns:
        The canonical spelling, or None when ``text`` is not a plain decimal number.
    """
    if not _NUMBER_RE.fullmatch(text):
        return None
    try:
        value = Decimal(text)
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def strip_outer_braces(text: str) -> str:
    """``"{{5}}"`` -> ``"5"``: drop brace pairs that enclose the whole text.

    Args:
        text (str): the text.

    Returns:
        The text without enclosing brace pairs.
    """
    while text.startswith("{") and matching_brace(text, 0) == len(text) - 1:
        text = text[1:-1]
    return text
