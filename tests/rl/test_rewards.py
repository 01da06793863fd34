"""Rule-based math rewards against hand-written expected rewards, and the worker pool's isolation:
failures, non-numbers, hangs and crashes score 0 and are counted, and the pool keeps working."""

import textwrap
import time
from fractions import Fraction

import pytest

from league.rl.rewards import (
    REWARDS,
    RewardConfig,
    RewardModel,
    compute_reward,
    load_custom_reward,
    reward_one,
)
from league.rl.rewards.latex import brace_arguments, canonical_number, last_boxed_answer
from league.rl.rewards.normalize import normalize_answer, normalize_final_answer
from league.rl.rewards.registry import to_reward_value

T = "<think>some reasoning, maybe \\boxed{999}</think>"

DEEPSCALER_CASES = [
    # boxed forms
    (T + "The answer is \\boxed{5}.", "5", 1.0),
    (T + "The answer is \\boxed{5}.", "6", 0.0),
    (T + "So $\\boxed 7$.", "7", 1.0),
    (T + "\\fbox{7}", "7", 1.0),
    (T + "\\boxed {12}", "12", 1.0),
    (T + "\\boxed{12}", "\\boxed{12}", 1.0),
    (T + "\\boxed{12}", 12, 1.0),
    # nested braces and fractions
    (T + "\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 1.0),
    (T + "\\boxed{\\dfrac{1}{2}}", "\\frac12", 1.0),
    (T + "\\boxed{\\tfrac{3}{4}}", "3/4", 1.0),
    (T + "\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}{2}", 1.0),
    (T + "\\boxed{\\frac{2}{4}}", "\\frac{1}{2}", 0.0),
    (T + "\\boxed{-\\frac{1}{2}}", "\\frac{-1}{2}", 1.0),
    (T + "\\boxed{\\frac{1}{3}}", "\\frac{1}{2}", 0.0),
    # decimals against fractions
    (T + "\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    (T + "\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    (T + "\\boxed{.25}", "\\frac14", 1.0),
    (T + "\\boxed{0.3333}", "\\frac{1}{3}", 0.0),
    # integers: leading zeros as in AIME, strict match otherwise
    (T + "\\boxed{025}", "25", 1.0),
    (T + "\\boxed{25}", "025", 1.0),
    (T + "\\boxed{5.0}", "5", 1.0),
    (T + "\\boxed{\\frac{10}{2}}", "5", 0.0),
    (T + "\\boxed{26}", "025", 0.0),
    # negatives
    (T + "\\boxed{-5}", "-5", 1.0),
    (T + "\\boxed{- 5}", "-5", 1.0),
    (T + "\\boxed{5}", "-5", 0.0),
    # units, degrees, dollars, percent
    (T + "\\boxed{5 \\text{ cm}}", "5", 1.0),
    (T + "\\boxed{5\\text{cm}^2}", "5", 1.0),
    (T + "\\boxed{12 inches}", "12", 1.0),
    (T + "\\boxed{30^\\circ}", "30", 1.0),
    (T + "\\boxed{30^{\\circ}}", "30^\\circ", 1.0),
    (T + "\\boxed{\\$5}", "5", 1.0),
    (T + "\\boxed{50\\%}", "50", 1.0),
    (T + "\\boxed{50}", "50\\%", 1.0),
    (T + "\\boxed{0.5}", "50\\%", 0.0),
    # thousands separators
    (T + "\\boxed{1,000}", "1000", 1.0),
    (T + "\\boxed{1{,}000{,}000}", "1000000", 1.0),
    (T + "\\boxed{1\\,000}", "1,000", 1.0),
    # several boxes: the last one wins
    (T + "first \\boxed{3}, then \\boxed{4}", "4", 1.0),
    (T + "first \\boxed{3}, then \\boxed{4}", "3", 0.0),
    # no answer, thinking cut off, text after </think>
    (T + "The answer is 5.", "5", 0.0),
    ("<think>I think it is \\boxed{5} but let me check", "5", 0.0),
    ("\\boxed{5}", "5", 0.0),
    ("<think>\\boxed{3}</think>\\boxed{4}", "4", 1.0),
    ("<think>\\boxed{3}</think>\\boxed{4}", "3", 0.0),
    ("<think>a</think>b</think>\\boxed{4}", "4", 1.0),
    ("Let me see. ###Response The answer is \\boxed{7}", "7", 1.0),
    # malformed LaTeX and empty labels: 0, no crash
    (T + "\\boxed{\\frac{1}{2}", "\\frac{1}{2}", 0.0),
    (T + "\\boxed{", "5", 0.0),
    (T + "\\boxed", "5", 0.0),
    (T + "\\boxed{5} and \\boxed{6", "5", 0.0),
    (T + "\\boxed{}", "5", 0.0),
    (T + "\\boxed{5}", "", 0.0),
    (T + "\\boxed{5}", None, 0.0),
    (T + "\\boxed{\\frac{1}{}}", "\\frac{1}{2}", 0.0),
    (T + "\\boxed{\\sqrt{}}", "\\sqrt{2}", 0.0),
    (T + "\\boxed{)(}", "(1,2)", 0.0),
    # tuples, intervals, sets
    (T + "\\boxed{(1, 2)}", "(1,2)", 1.0),
    (T + "\\boxed{\\left( 1, 2 \\right)}", "(1,2)", 1.0),
    (T + "\\boxed{(2, 1)}", "(1,2)", 0.0),
    (T + "\\boxed{(\\frac{1}{2}, 3)}", "(0.5, 3)", 1.0),
    (T + "\\boxed{(1/2, 3)}", "(\\frac12,3)", 1.0),
    (T + "\\boxed{(1, 2, 3)}", "(1,2)", 0.0),
    (T + "\\boxed{[1, 2)}", "[1,2)", 1.0),
    (T + "\\boxed{(1, 2)}", "[1,2)", 0.0),
    (T + "\\boxed{(-\\infty, 3]}", "(-\\infty,3]", 1.0),
    (T + "\\boxed{(2,\\infty)\\cup(-\\infty,1)}", "(-\\infty, 1) \\cup (2, \\infty)", 1.0),
    (T + "\\boxed{\\{2, 1\\}}", "\\{1,2\\}", 1.0),
    (T + "\\boxed{3, 5}", "5, 3", 1.0),
    (T + "\\boxed{3, 5}", "5, 4", 0.0),
    # sqrt and pi expressions
    (T + "\\boxed{2\\sqrt{3}}", "\\sqrt{12}", 1.0),
    (T + "\\boxed{\\sqrt{3}}", "\\sqrt3", 1.0),
    (T + "\\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt{2}}{2}", 1.0),
    (T + "\\boxed{\\sqrt{3}}", "\\sqrt{2}", 0.0),
    (T + "\\boxed{\\frac{\\pi}{2}}", "\\pi/2", 1.0),
    (T + "\\boxed{2\\pi}", "2 \\pi", 1.0),
    (T + "\\boxed{3.14}", "\\pi", 0.0),
    (T + "\\boxed{\\pi r^2}", "\\pi r^{2}", 1.0),
    # equations, words, symbolic forms
    (T + "\\boxed{x = 5}", "5", 1.0),
    (T + "\\boxed{\\text{Monday}}", "monday", 1.0),
    (T + "\\boxed{\\text{(B)}}", "(B)", 1.0),
    (T + "\\boxed{x^2+2x+1}", "(x+1)^2", 1.0),
    (T + "\\boxed{x^2+2x}", "(x+1)^2", 0.0),
    # expensive inputs are skipped, not evaluated
    (T + "\\boxed{2^{2^{100}}}", "\\sqrt{2}", 0.0),
    (T + "\\boxed{10^{100000}!}", "\\sqrt{2}", 0.0),
]


@pytest.mark.parametrize(("response", "label", "expected"), DEEPSCALER_CASES)
def test_deepscaler(response, label, expected):
    assert compute_reward("deepscaler", response, label) == expected


DAPO_CASES = [
    ("Work...\nAnswer: 42", "42", 1.0),
    ("Work...\nanswer:42", "42", 1.0),
    ("Work...\nAnswer: $42$", "42", 1.0),
    ("Work...\nAnswer: \\boxed{42}", "42", 1.0),
    ("Work...\nAnswer: 42 dollars", "42", 1.0),
    ("Work...\nAnswer: 42.", "42", 1.0),
    ("Work...\nAnswer: 1,000", "1000", 1.0),
    ("Work...\nAnswer: 025", "25", 1.0),
    ("Work...\nAnswer: x = 5", "5", 1.0),
    ("Work...\nAnswer: \\frac12", "\\frac{1}{2}", 1.0),
    ("Work...\nAnswer: 42", "\\boxed{42}", 1.0),
    ("Answer: 41\nmore work\nAnswer: 42", "42", 1.0),
    ("Answer: 41\nmore work\nAnswer: 42", "41", 0.0),
    ("Work...\nAnswer: 43", "42", 0.0),
    ("Answer: 42\n" + "x" * 400, "42", 0.0),
    ("The final answer is 42", "42", 0.0),
    ("The answer is \\boxed{42}", "42", 0.0),
    ("Work...\nAnswer: 42", "", 0.0),
    ("Work...\nAnswer: ", "42", 0.0),
]


@pytest.mark.parametrize(("response", "label", "expected"), DAPO_CASES)
def test_dapo(response, label, expected):
    assert compute_reward("dapo", response, label) == expected


MATH_VERIFY_CASES = [
    ("So the answer is \\boxed{\\frac{1}{2}}.", "0.5", 1.0),
    ("So the answer is \\boxed{2\\sqrt{3}}.", "\\sqrt{12}", 1.0),
    ("So the answer is \\boxed{(1,2)}.", "(1, 2)", 1.0),
    ("\\boxed{3} then \\boxed{4}", "4", 1.0),
    ("\\boxed{3} then \\boxed{4}", "3", 0.0),
    ("The answer is $3$.", "3", 1.0),
    ("So the answer is \\boxed{4}.", "3", 0.0),
    ("So the answer is \\boxed{5}.", "\\boxed{5}", 1.0),
    ("no numbers here", "5", 0.0),
    ("", "3", 0.0),
    ("\\boxed{5}", "", 0.0),
]


@pytest.mark.parametrize(("response", "label", "expected"), MATH_VERIFY_CASES)
def test_math_verify(response, label, expected):
    assert compute_reward("math", response, label) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a \\boxed{1} b \\boxed{\\frac{1}{2}} c", "\\frac{1}{2}"),
        ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),
        ("\\boxed{a} \\fbox{b}", "b"),
        ("$\\boxed 42$", "42"),
        ("\\boxed{1} \\boxed{2", None),
        ("nothing", None),
    ],
)
def test_last_boxed_answer(text, expected):
    assert last_boxed_answer(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("\\frac12", "\\frac{1}{2}"),
        ("\\frac1{72}", "\\frac{1}{72}"),
        ("\\frac{a}b+\\frac\\pi2", "\\frac{a}{b}+\\frac{\\pi}{2}"),
        ("\\frac{\\frac12}{3}", "\\frac{\\frac{1}{2}}{3}"),
        ("\\frac{1}{", "\\frac{1}{"),
    ],
)
def test_brace_arguments(text, expected):
    assert brace_arguments(text, "\\frac", 2) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("025", "25"),
        ("2.50", "2.5"),
        ("-0", "0"),
        (".5", "0.5"),
        ("+7", "7"),
        ("5.000", "5"),
        ("1e5", None),
        ("", None),
    ],
)
def test_canonical_number(text, expected):
    assert canonical_number(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("\\left( 1, 2 \\right)", "(1,2)"),
        ("\\text{Monday}", "monday"),
        ("2 \\pi r", "2\\pi r"),
        ("\\sqrt x", "\\sqrt{x}"),
        ("-3/4", "-\\frac{3}{4}"),
        ("2m", "2m"),
        ("2 m", "2"),
        ("\\$1{,}000.", "1000"),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_normalize_final_answer():
    assert normalize_final_answer(" $x = \\frac12$ ") == "\\frac{1}{2}"
    assert normalize_final_answer("\\text{12} units") == "12"
    assert normalize_final_answer("1,234,567") == "1234567"


def test_registry_and_errors():
    assert sorted(REWARDS) == ["dapo", "deepscaler", "exact", "math"]
    assert REWARDS["exact"](" 42 ", "42") == 1.0 and REWARDS["exact"]("42.", "42") == 0.0
    with pytest.raises(ValueError, match="'nope'.*'dapo', 'deepscaler', 'exact', 'math'"):
        compute_reward("nope", "\\boxed{1}", "1")
    with pytest.raises(ValueError, match="not a built-in reward"):
        RewardModel(RewardConfig(rm_type="nope"))
    with pytest.raises(ValueError, match="reward-timeout-s"):
        RewardConfig(reward_timeout_s=0)
    with pytest.raises(ValueError, match="reward-num-workers"):
        RewardConfig(reward_num_workers=0)


@pytest.mark.parametrize(
    ("value", "expected"), [(1, 1.0), (0.25, 0.25), (True, 1.0), (Fraction(3, 4), 0.75), (-1, -1.0)]
)
def test_to_reward_value(value, expected):
    assert to_reward_value(value) == expected


@pytest.mark.parametrize("value", ["1.0", b"1", None, [1.0], object(), float("nan"), float("inf")])
def test_to_reward_value_rejects(value):
    with pytest.raises((TypeError, ValueError)):
        to_reward_value(value)


CUSTOM_MODULE = textwrap.dedent(
    """
    import os
    import signal


    def reward(response, label, metadata):
        mode = metadata.get("mode", "match")
        if mode == "raise":
            raise RuntimeError("grader bug")
        if mode == "string":
            return "1.0"
        if mode == "none":
            return None
        if mode == "hang":
            while True:
                pass
        if mode == "crash":
            os.kill(os.getpid(), signal.SIGSEGV)
        if mode == "exit":
            raise SystemExit(3)
        if mode == "weight":
            return metadata["weight"]
        return float(response.strip() == label)


    not_a_function = 3
    """
)


@pytest.fixture(scope="module")
def custom_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("custom_rm") / "my_reward.py"
    path.write_text(CUSTOM_MODULE)
    return path


@pytest.fixture(scope="module")
def custom_pool(custom_file):
    with RewardModel(
        RewardConfig(custom_rm_path=f"{custom_file}:reward", reward_timeout_s=1.0, reward_num_workers=2)
    ) as model:
        yield model


def test_custom_reward_values_and_failures(custom_pool):
    modes = ["match", "match", "raise", "string", "none", "weight", "exit", "match"]
    responses = ["7", "8", "7", "7", "7", "7", "7", " 7 "]
    metadata = [{"mode": m, "weight": 0.25} for m in modes]
    result = custom_pool.score(responses, ["7"] * len(modes), metadata)
    assert result.rewards == [1.0, 0.0, 0.0, 0.0, 0.0, 0.25, 0.0, 1.0]
    assert (result.failures, result.timeouts) == (4, 0)
    assert "RuntimeError: grader bug" in result.errors[2]
    assert "str" in result.errors[3] and "NoneType" in result.errors[4]
    assert [e is None for e in result.errors] == [True, True, False, False, False, True, False, True]


def test_hanging_grader_is_cut_off_and_pool_recovers(custom_pool):
    start = time.monotonic()
    result = custom_pool.score(["7", "7", "7"], ["7", "7", "7"], [{"mode": "hang"}, {}, None])
    elapsed = time.monotonic() - start
    assert result.rewards == [0.0, 1.0, 1.0]
    assert (result.failures, result.timeouts) == (0, 1)
    assert "timed out" in result.errors[0]
    assert elapsed < 6.0
    again = custom_pool.score(["7", "6"] * 3, ["7"] * 6)
    assert again.rewards == [1.0, 0.0] * 3
    assert (again.failures, again.timeouts) == (0, 0)


def test_crashing_grader_is_a_failure_and_pool_recovers(custom_pool):
    result = custom_pool.score(["7", "7"], ["7", "7"], [{"mode": "crash"}, {}])
    assert result.rewards == [0.0, 1.0]
    assert (result.failures, result.timeouts) == (1, 0)
    assert "died" in result.errors[0]
    assert custom_pool.score(["7"], ["7"]).rewards == [1.0]


class _UnprintableLabel:
    def __str__(self):
        raise RuntimeError("no text")


def test_interrupted_batch_leaves_no_stale_work(custom_pool):
    with pytest.raises(RuntimeError, match="no text"):
        custom_pool.score(["7", "7"], ["7", _UnprintableLabel()], [{"mode": "hang"}, {}])
    start = time.monotonic()
    result = custom_pool.score(["7", "6"], ["7", "7"])
    assert result.rewards == [1.0, 0.0]
    assert (result.failures, result.timeouts) == (0, 0)
    assert time.monotonic() - start < 6.0


def test_pool_checks_lengths(custom_pool):
    with pytest.raises(ValueError, match="2 responses, 1 labels"):
        custom_pool.score(["1", "2"], ["1"])


def test_builtin_pool_matches_in_process():
    cases = DEEPSCALER_CASES[:6] + DEEPSCALER_CASES[-6:]
    with RewardModel(RewardConfig(rm_type="deepscaler", reward_num_workers=2)) as model:
        result = model.score([c[0] for c in cases], [c[1] for c in cases])
    assert result.rewards == [c[2] for c in cases]
    assert (result.failures, result.timeouts) == (0, 0)
    with pytest.raises(RuntimeError, match="after close"):
        model.score(["a"], ["b"])


def test_reward_one(custom_file):
    assert reward_one("deepscaler", "\\frac{1}{2}", "</think>\\boxed{0.5}") == 1.0
    assert reward_one("dapo", "42", "Answer: 41") == 0.0
    start = time.monotonic()
    hang = reward_one(
        "deepscaler", "7", "7", custom_rm_path=f"{custom_file}:reward", timeout_s=1.0, metadata={"mode": "hang"}
    )
    assert hang == 0.0
    assert time.monotonic() - start < 8.0


def test_custom_module_path(custom_file, monkeypatch):
    monkeypatch.syspath_prepend(str(custom_file.parent))
    assert load_custom_reward("my_reward:reward")("7", "7", {}) == 1.0
    assert load_custom_reward("my_reward.reward")("7", "8", {}) == 0.0


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("league_no_such_module_xyz:reward", "module 'league_no_such_module_xyz' not found"),
        ("{file}:no_such_function", "has no attribute 'no_such_function'"),
        ("{file}:not_a_function", "is a int, not a function"),
        ("{dir}/missing.py:reward", "not found"),
        ("{file}", "names a file but no function"),
        ("reward", "is not 'module:function'"),
    ],
)
def test_bad_custom_paths(custom_file, path, message):
    path = path.format(file=custom_file, dir=custom_file.parent)
    with pytest.raises(ValueError, match=message):
        load_custom_reward(path)
    with pytest.raises(ValueError, match=message):
        RewardModel(RewardConfig(custom_rm_path=path))
