"""The engine over 4 ranks (``parallel.inference``) against one process (`checks_engine`)."""

import pytest

from tests.parallel.test_engine_world2 import engine_equals_one_process

pytestmark = pytest.mark.xdist_group("world4")


@pytest.mark.parametrize("check", ["engine_ep4", "engine_tp4"])
def test_engine_equals_one_process(world4, check):
    engine_equals_one_process(world4, check)


def test_two_data_parallel_engines_at_tp2_ep2(world4):
    engine_equals_one_process(world4, "engine_dp2_tp2_ep2", num_engines=2)
