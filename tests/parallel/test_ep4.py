"""ep4 (the recipe's TP1 EP8 at half scale): each of 4 ranks holds 2 of the 8 experts; one step equals one process."""

import pytest

from tests.parallel.expect import step_equals_one_process

pytestmark = pytest.mark.xdist_group("world4")


def test_one_step_equals_one_process(world4):
    step_equals_one_process(world4, "ep4_train_step")
