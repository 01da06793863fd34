"""Run metrics: one JSON line per step in the run folder (flushed and synced, so a crash loses nothing),
TensorBoard scalars, a console line per step, and PNG curves of a finished or running run.

Not responsible for computing the metrics.
"""

import json
import math
import os
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

METRICS_FILE = "metrics.jsonl"
CONSOLE_KEYS = [
    ("rollout/reward_mean", "reward", "{:.3f}"),
    ("rollout/response_len_mean", "len", "{:.1f}"),
    ("train/pg_loss", "pg", "{:+.4f}"),
    ("train/mtp_loss", "mtp", "{:.3f}"),
    ("rollout/spec_accept_length", "accept", "{:.2f}"),
    ("train/grad_norm", "gnorm", "{:.3f}"),
    ("train/train_rollout_logprob_abs_diff", "lp_diff", "{:.1e}"),
    ("perf/step_time", "s", "{:.1f}"),
]


class MetricsLogger:
    """Writes each step's metrics to ``run_dir/metrics.jsonl``, TensorBoard and the console.

    Args:
        run_dir (Path): the run folder.
        tensorboard (bool): also write TensorBoard event files under ``run_dir/tensorboard``. Default: ``True``.
        console (Console, Optional): where step lines go. Default: a rich console.
    """

    def __init__(self, run_dir: Path, tensorboard: bool = True, console: Console | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        self.console = console or Console()
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step" and math.isfinite(value):
                    self.writer.add_scalar(key, value, step)
            self.writer.flush()
        parts = [f"step {step}"]
        for key, short, fmt in CONSOLE_KEYS:
            if isinstance(record.get(key), (int, float)):
                parts.append(f"{short} {fmt.format(record[key])}")
        self.console.print("  ".join(parts), soft_wrap=True)  # one line a step, whatever the width

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def progress_bar(console: Console, label: str, *fields: str) -> Progress:
    """A transient progress bar on ``console``: ``label``, the bar, steps done of total, each task field named in
    ``fields`` (set by ``progress.update(task, name=text)``), and the time left.

    Args:
        console (Console): where the bar is drawn (and where lines printed meanwhile go, above it).
        label (str): the bar's title.
        fields (str): names of task fields shown after the count, each as ``name value``.
    """
    return Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        *(TextColumn(f"{name} {{task.fields[{name}]}}") for name in fields),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return value


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The step records of a run (a torn last line, from a crash mid-write, is skipped)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise ValueError(f"{path}: no such file (is {run_dir} a league run folder?)")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


PLOTS = [
    ("rollout/reward_mean", "reward (mean)"),
    ("eval/reward_mean", "eval reward (mean)"),
    ("rollout/spec_accept_length", "MTP acceptance length"),
    ("train/mtp_loss", "MTP loss"),
    ("rollout/response_len_mean", "response length"),
    ("train/pg_loss", "policy loss"),
    ("train/grad_norm", "grad norm"),
    ("train/train_rollout_logprob_abs_diff", "|train - rollout| log-prob"),
]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write ``curves.png`` (or ``out``) with one panel per logged metric of :data:`PLOTS`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    if not records:
        raise ValueError(f"{run_dir}: the run has no steps yet")
    panels = [(key, title) for key, title in PLOTS if any(isinstance(r.get(key), (int, float)) for r in records)]
    cols = 2
    rows = max(1, math.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(10, 3 * rows), squeeze=False)
    for ax, (key, title) in zip(axes.flat, panels):
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 50 else None)
        ax.set_title(title)
        ax.set_xlabel("rollout step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    out_path = Path(out) if out else Path(run_dir) / "curves.png"
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
