"""cp2_ep2: one training step equals one process (`checks.cp2_ep2_train_step`)."""

import pytest

from tests.parallel.expect import step_equals_one_process

pytestmark = pytest.mark.xdist_group("world4")


def test_one_step_equals_one_process(world4):
    step_equals_one_process(world4, "cp2_ep2_train_step")
