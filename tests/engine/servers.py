"""`league serve` started as a user starts it, for tests that talk to it over HTTP."""

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from league.engine.client import EngineClient


@contextmanager
def league_serve(args: list[str], timeout: float = 120) -> Iterator[tuple[subprocess.Popen, EngineClient]]:
    """``league serve <args>`` (which should bind ``--port 0``) for the block: its process and a client of the URL it
    prints, once healthy. After the block it gets a SIGTERM; ``proc.output`` then holds what it printed after its
    start line."""
    command = [sys.executable, "-m", "league", "serve", *args]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = ""
        for _ in range(400):  # torchrun's and the ranks' warnings come first
            line = proc.stdout.readline()
            if "league serve:" in line or not line:
                break
        assert "league serve:" in line, line
        client = EngineClient(line.split(" on ", 1)[1].split()[0], timeout=timeout)
        client.wait_until_healthy(60)
        proc.start_line = line
        yield proc, client
    finally:
        proc.terminate()
        proc.output = proc.communicate(timeout=60)[0]
