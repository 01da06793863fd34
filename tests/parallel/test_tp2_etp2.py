"""tp2_etp2: 4 ranks in 2 token groups of 2, each expert's intermediate dim split over the same pairs (which hold
different rows of each micro-batch) and the experts sharded over the 2 pairs by FSDP2; one step equals one
process (`checks.tp2_etp2_train_step`)."""

import pytest

from tests.parallel.expect import step_equals_one_process

pytestmark = pytest.mark.xdist_group("world4")


def test_one_step_equals_one_process(world4):
    step_equals_one_process(world4, "tp2_etp2_train_step")
