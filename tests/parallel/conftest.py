import pytest

from tests.parallel.worlds import run_world


@pytest.fixture(scope="session")
def world2(tmp_path_factory):
    """Results of every world-2 check, from one launch of 2 processes."""
    return run_world(2, tmp_path_factory.mktemp("world2"))


@pytest.fixture(scope="session")
def world4(tmp_path_factory):
    """Results of every world-4 check, from one launch of 4 processes."""
    return run_world(4, tmp_path_factory.mktemp("world4"))
