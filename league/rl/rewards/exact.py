"""``exact``: reward 1 when the response is exactly the label (after stripping whitespace); the grader
of league's built-in tasks. Not for math answers (see ``deepscaler``, ``math``)."""


def exact_match_reward(response: str, label: str) -> float:
    return 1.0 if response.strip() == str(label).strip() else 0.0
