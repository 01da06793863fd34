"""tp2_cp2_ep4: one training step equals one process (`checks.tp2_cp2_ep4_train_step`)."""

import pytest

from tests.parallel.expect import step_equals_one_process

pytestmark = pytest.mark.xdist_group("world4")


def test_one_step_equals_one_process(world4):
    step_equals_one_process(world4, "tp2_cp2_ep4_train_step")
