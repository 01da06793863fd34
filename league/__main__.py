"""``python -m league``: the ``league`` command (and what torchrun runs in each process: ``-m league train ...``)."""

from league.cli import app

if __name__ == "__main__":
    app(prog_name="league")
