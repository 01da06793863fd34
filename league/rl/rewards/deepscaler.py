"""The ``deepscaler`` reward (the reference recipe's ``--rm-type deepscaler``): 1 when the last boxed
answer after the thinking equals the label, as strings after MATH-style normalisation or under sympy.

Not responsible for bounding the time sympy takes (the worker pool in ``pool`` does) and gives no
partial credit or format reward.
"""

from league.rl.rewards.latex import last_boxed_answer
from league.rl.rewards.normalize import normalize_answer
from league.rl.rewards.sympy_equal import answers_equal_under_sympy


def solution_after_thinking(response: str) -> str | None:
    """The part of a response that holds the solution: after the last ``</think>``, else after the first
    ``###Response``.

    Args:
        response (str): the generated text.

    Returns:
        The solution text, or None when the response has neither marker (thinking that was cut off).
    """
    if "</think>" in response:
        return response.rsplit("</think>", 1)[1]
    if "###Response" in response:
        return response.split("###Response", 1)[1]
    return None


def label_answer(label: object) -> str | None:
    """The answer a label stands for: ``str(label)``, or the content of its last ``\\boxed{}``.

    Args:
        label (object): the ground truth (a string, or a number from a dataset).

    Returns:
        The answer, or None when the label is empty (or None) or holds a malformed box.
    """
    if label is None:
        return None
    text = str(label)
    if "\\boxed" in text or "\\fbox" in text:
        text = last_boxed_answer(text) or ""
    return text if text.strip() else None


def grade_answer(given: str, truth: str) -> bool:
    """Whether a given answer equals the ground truth: equal normalised strings, or equal under sympy.

    Args:
        given (str): the model's answer, out of its box.
        truth (str): the ground-truth answer.

    Returns:
        True when correct.
    """
    given_normalized, truth_normalized = normalize_answer(given), normalize_answer(truth)
    if not given_normalized or not truth_normalized:
        return False
    if given_normalized == truth_normalized:
        return True
    return answers_equal_under_sympy(given_normalized, truth_normalized)


def deepscaler_reward(response: str, label: str) -> float:
    """The ``deepscaler`` reward of one response: 1.0 or 0.0.

    0 when the thinking was not closed (no ``</think>`` nor ``###Response``), when the solution has no
    well-formed last ``\\boxed{}``, or when the label is empty.

    Args:
        response (str): the generated text.
        label (str): the ground-truth answer, possibly inside ``\\boxed{}``.

    Returns:
        1.0 when the answer is correct, else 0.0.
    """
    solution = solution_after_thinking(response)
    if solution is None:
        return 0.0
    given, truth = last_boxed_answer(solution), label_answer(label)
    if given is None or truth is None:
        return 0.0
    return 1.0 if grade_answer(given, truth) else 0.0
