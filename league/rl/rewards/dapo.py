"""The ``dapo`` reward (DAPO's Minerva-style grader): the last ``Answer: ...`` line in the last 300
characters, normalised, must equal the normalised label.

The reference returns a score of +1 or -1 (and reads it with ``--reward-key score``); league rewards
lie in [0, 1], so a correct answer scores 1.0 and anything else 0.0. One deliberate lenience: plain
numbers are compared in canonical form on both sides (``025`` equals ``25``). Not responsible for
symbolic equality (use ``deepscaler`` or ``math`` for that).
"""

import re

from league.rl.rewards.deepscaler import label_answer
from league.rl.rewards.normalize import normalize_final_answer

TAIL_CHARS = 300
_ANSWER_RE = re.compile(r"(?i)Answer\s*:\s*([^\n]+)")


def dapo_reward(response: str, label: str) -> float:
    """The ``dapo`` reward of one response: 1.0 or 0.0.

    Args:
        response (str): the generated text; only its last 300 characters are read.
        label (str): the ground-truth answer, possibly inside ``\\boxed{}``.

    Returns:
        1.0 when the last ``Answer:`` line matches the label after normalisation, else 0.0.
    """
    matches = _ANSWER_RE.findall(response[-TAIL_CHARS:])
    truth = label_answer(label)
    if not matches or truth is None:
        return 0.0
    given, truth = normalize_final_answer(matches[-1]), normalize_final_answer(truth)
    return 1.0 if given and given == truth else 0.0
