"""The ``math`` reward: Hugging Face's math-verify parses the last boxed answer (or, without a box, the
whole response) and the label, and checks them for equality.

Unlike the reference's ``math`` type (its own boxed grader), this one uses the math-verify library.
Not responsible for the thinking markers (a boxed answer inside unfinished thinking still counts)
or for bounding time off the main thread: math-verify's own alarms work only on a process's main
thread, so elsewhere they are switched off and the worker pool (``pool``) bounds the time.
"""

import threading

from math_verify import parse, verify

from league.rl.rewards.deepscaler import label_answer
from league.rl.rewards.latex import last_boxed_answer

MATH_VERIFY_TIMEOUT_S = 5


def _timeout_s() -> int | None:
    return MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def math_verify_reward(response: str, label: str) -> float:
    """The ``math`` reward of one response: 1.0 or 0.0.

    Args:
        response (str): the generated text.
        label (str): the ground-truth answer, possibly inside ``\\boxed{}``.

    Returns:
        1.0 when math-verify finds the answer equal to the label, else 0.0.
    """
    truth = label_answer(label)
    if truth is None:
        return 0.0
    boxed = last_boxed_answer(response)
    given_text = response if boxed is None else f"\\boxed{{{boxed}}}"
    timeout_s = _timeout_s()
    gold = parse(f"\\boxed{{{truth}}}", parsing_timeout=timeout_s)
    given = parse(given_text, parsing_timeout=timeout_s)
    if not gold or not given:
        return 0.0
    return 1.0 if verify(gold, given, timeout_seconds=timeout_s) else 0.0
