"""dp4 with ep2: two expert groups of 2 ranks, each expert held by 2 ranks (FSDP2 over them); one step equals one
process."""

import pytest

from tests.parallel.expect import step_equals_one_process

pytestmark = pytest.mark.xdist_group("world4")


def test_one_step_equals_one_process(world4):
    step_equals_one_process(world4, "dp4_ep2_train_step")
