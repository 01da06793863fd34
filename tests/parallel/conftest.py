import json

import pytest
from filelock import FileLock

from tests.parallel.worlds import run_world


def launched_once(world: int, tmp_path_factory, worker_id: str) -> dict:
    """Results of every check of ``world`` ranks, from one launch per test session: the first pytest-xdist worker to
    ask launches and leaves the results beside the workers' folders, the others wait for them and read them. (The
    tests are also marked ``xdist_group`` to run on one worker, which pytest-xdist 3.8 does not do under pytest 9.)"""
    if worker_id == "master":  # no xdist
        return run_world(world, tmp_path_factory.mktemp(f"world{world}"))
    shared = tmp_path_factory.getbasetemp().parent
    results = shared / f"world{world}.json"
    with FileLock(f"{results}.lock"):
        if not results.is_file():
            folder = shared / f"world{world}"
            folder.mkdir()
            results.write_text(json.dumps(run_world(world, folder)))
        return json.loads(results.read_text())


@pytest.fixture(scope="session")
def world2(tmp_path_factory, worker_id):
    """Results of every world-2 check, from one launch of 2 processes."""
    return launched_once(2, tmp_path_factory, worker_id)


@pytest.fixture(scope="session")
def world4(tmp_path_factory, worker_id):
    """Results of every world-4 check, from one launch of 4 processes."""
    return launched_once(4, tmp_path_factory, worker_id)
