"""cp2: one training step equals one process (`checks.cp2_train_step`)."""

import pytest

from tests.parallel.expect import step_equals_one_process

pytestmark = pytest.mark.xdist_group("world2")


def test_one_step_equals_one_process(world2):
    step_equals_one_process(world2, "cp2_train_step")
