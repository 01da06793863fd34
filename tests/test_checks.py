"""Range checks of option values: bounds open and closed, non-finite numbers, bools, seeds, writable folders."""

import math

import pytest

from league.checks import SEED_MAX, check_int, check_number, check_seed, check_top_k, check_writable


def test_numbers_in_and_out_of_range():
    check_number("--x", 0.0, 0)
    check_number("--x", 1, 0, 1)
    for value, bounds, message in [
        (0.0, dict(low=0, low_open=True), "`--x` must be a finite number > 0, got 0.0"),
        (1.0, dict(low=0, high=1, high_open=True), "`--x` must be a finite number in [0, 1), got 1.0"),
        (math.nan, dict(low=0), "`--x` must be a finite number >= 0, got nan"),
        (math.inf, {}, "`--x` must be a finite number, got inf"),
        (True, {}, "`--x` must be a finite number, got True"),
        (-2, dict(high=-3), "`--x` must be a finite number <= -3, got -2"),
    ]:
        with pytest.raises(ValueError) as info:
            check_number("--x", value, **bounds)
        assert str(info.value) == message


def test_integers_seeds_and_top_k():
    check_int("--n", 3, 1, 3)
    check_seed("--seed", SEED_MAX)
    check_top_k("--k", -1)
    for call, message in [
        (lambda: check_int("--n", 2.0, 1), "`--n` must be an integer >= 1, got 2.0"),
        (lambda: check_int("--n", 4, 1, 3), "`--n` must be an integer in [1, 3], got 4"),
        (lambda: check_seed("--seed", SEED_MAX + 1), f"`--seed` must be an integer in [0, 2**63 - 1], got {2**63}"),
        (lambda: check_seed("--seed", -1), "`--seed` must be an integer in [0, 2**63 - 1], got -1"),
        (lambda: check_top_k("--k", 0), "`--k` must be -1 (off) or an integer >= 1, got 0"),
        (lambda: check_top_k("--k", True), "`--k` must be -1 (off) or an integer >= 1, got True"),
    ]:
        with pytest.raises(ValueError) as info:
            call()
        assert str(info.value) == message


def test_writable_folders(tmp_path):
    check_writable("--out", tmp_path / "new" / "deeper")  # can be made: fine, and nothing is left behind
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"`--out` .*/file is not a folder"):
        check_writable("--out", tmp_path / "file")
    with pytest.raises(ValueError, match=r"`--out` .*/file/x is under .*/file, which is not a folder"):
        check_writable("--out", tmp_path / "file" / "x")
