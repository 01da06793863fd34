"""Checkpoint tests run their tiny models on one thread: on a shared 2-core machine, two intra-op threads
fighting other processes make these small ops up to 100x slower."""

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
