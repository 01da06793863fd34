"""Isolated, time-bounded reward scoring: a small persistent pool of ``spawn``-ed worker processes grades a
batch of responses in parallel. A grader that raises, returns a non-number, or kills its process scores 0
and counts as a failure; one that runs past ``reward_timeout_s`` scores 0, counts as a timeout, and its
worker is killed and replaced. A run is never stalled or brought down by its reward.

Not responsible for what the rewards compute (``registry`` and the rule modules) nor for normalising
rewards into advantages. A ``RewardModel`` is used from one thread at a time.
"""

import logging
import math
import multiprocessing
import signal
import time
import warnings
import weakref
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from league.rl.rewards.registry import resolve_reward, to_reward_value

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 120.0
"""How long a new worker may take to import the rewards (and the user's module) before the pool gives up."""
_MAX_ERROR_CHARS = 500


@dataclass(kw_only=True, slots=True)
class RewardConfig:
    """How responses are rewarded."""

    rm_type: str = "deepscaler"
    """Built-in rule-based reward: deepscaler (boxed answer after </think>), dapo (last Answer: line)
    or math (math-verify)."""
    custom_rm_path: str | None = None
    """User reward 'module:function' or 'path/to/file.py:function', called as
    f(response, label, metadata) -> number; replaces rm_type."""
    reward_timeout_s: float = 10.0
    """Seconds one response may take to grade; past it the reward is 0 and the grading process is replaced."""
    reward_num_workers: int = 4
    """Worker processes that grade a batch in parallel."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.reward_timeout_s) and self.reward_timeout_s > 0):
            raise ValueError(f"`--reward-timeout-s` must be a positive number of seconds, got {self.reward_timeout_s}")
        if self.reward_num_workers < 1:
            raise ValueError(f"`--reward-num-workers` must be >= 1, got {self.reward_num_workers}")
        if self.custom_rm_path is not None and self.rm_type != "deepscaler":
            warnings.warn(f"`--rm-type` {self.rm_type!r} is ignored because `--custom-rm-path` is set", stacklevel=2)


@dataclass(slots=True)
class RewardResult:
    """Rewards of a batch, in order, and what went wrong.

    Args:
        rewards (list[float]): one reward per response; 0.0 where grading failed or timed out.
        failures (int): graders that raised, returned a non-number, or crashed their process.
        timeouts (int): graders cut off at ``reward_timeout_s``.
        errors (list[str | None]): per response, None or why it scored 0 without being graded.
    """

    rewards: list[float]
    failures: int = 0
    timeouts: int = 0
    errors: list[str | None] = field(default_factory=list)


def _worker_main(conn: Connection, rm_type: str, custom_rm_path: str | None) -> None:
    """Worker loop: load the reward once, then answer ``(index, response, label, metadata)`` until None."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it then closes the pool
    try:
        reward_fn = resolve_reward(rm_type, custom_rm_path)
    except BaseException as error:
        conn.send(("init_error", -1, _describe(error)))
        return
    conn.send(("ready", -1, None))
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        index, response, label, metadata = task
        try:
            conn.send(("ok", index, to_reward_value(reward_fn(response, label, metadata))))
        except (Exception, SystemExit) as error:
            conn.send(("error", index, _describe(error)))


def _describe(error: BaseException) -> str:
    try:
        text = f"{type(error).__name__}: {error}"
    except Exception:
        text = type(error).__name__
    return text[:_MAX_ERROR_CHARS]


@dataclass(slots=True)
class _Worker:
    process: Any
    conn: Connection
    ready: bool = False
    task: int | None = None
    deadline: float = 0.0


def _stop_workers(workers: list[_Worker]) -> None:
    for worker in workers:
        try:
            worker.conn.send(None)
        except OSError:
            pass
    for worker in workers:
        worker.process.join(timeout=1.0)
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join(timeout=1.0)
        worker.conn.close()
    workers.clear()


class RewardModel:
    """Scores batches of responses in a pool of worker processes, each grading call bounded in time.

    The reward function is checked here (an unknown ``rm_type`` or a bad ``custom_rm_path`` raises
    ``ValueError``) and loaded once per worker. Workers start in the background at construction.
    Use as a context manager, or call ``close()``.

    Args:
        config (RewardConfig): which reward, its time limit and the number of workers.
    """

    def __init__(self, config: RewardConfig):
        resolve_reward(config.rm_type, config.custom_rm_path)
        self.config = config
        self._context = multiprocessing.get_context("spawn")
        self._workers: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _stop_workers, self._workers)
        self._workers.extend(self._start_worker() for _ in range(config.reward_num_workers))

    def _start_worker(self) -> _Worker:
        parent_conn, child_conn = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=_worker_main,
            args=(child_conn, self.config.rm_type, self.config.custom_rm_path),
            name="league-reward-worker",
            daemon=True,
        )
        process.start()
        child_conn.close()
        return _Worker(process=process, conn=parent_conn, deadline=time.monotonic() + STARTUP_TIMEOUT_S)

    def _replace(self, slot: int) -> None:
        old = self._workers[slot]
        old.process.kill()
        old.process.join(timeout=5.0)
        old.conn.close()
        self._workers[slot] = self._start_worker()

    def score(
        self, responses: list[str], labels: list[str | None], metadata: list[dict[str, Any] | None] | None = None
    ) -> RewardResult:
        """Rewards of a batch of responses, graded in parallel; returns when every response has a reward.

        Args:
            responses (list[str]): generated texts.
            labels (list[str | None]): ground-truth answers, one per response (None: no label).
            metadata (list[dict | None], Optional): per-response metadata handed to a custom reward.
                Default: ``None`` (empty dicts).

        Returns:
            The rewards with counts of failures and timeouts; a response that failed or timed out scores 0.0.
        """
        if not self._finalizer.alive:
            raise RuntimeError("RewardModel.score() called after close()")
        if len(labels) != len(responses) or (metadata is not None and len(metadata) != len(responses)):
            lengths = f"{len(responses)} responses, {len(labels)} labels"
            raise ValueError(lengths + ("" if metadata is None else f", {len(metadata)} metadata"))
        result = RewardResult(rewards=[0.0] * len(responses), errors=[None] * len(responses))
        pending = deque(range(len(responses)))
        try:
            while pending or any(w.task is not None for w in self._workers):
                for slot, worker in enumerate(self._workers):
                    if worker.ready and worker.task is None and pending:
                        self._dispatch(slot, pending.popleft(), responses, labels, metadata, result)
                self._collect(result)
        except BaseException:
            # a worker still grading this batch would answer into the next one: replace it
            for slot, worker in enumerate(self._workers):
                if worker.task is not None:
                    self._replace(slot)
            raise
        return result

    def _dispatch(
        self,
        slot: int,
        index: int,
        responses: list[str],
        labels: list[str | None],
        metadata: list[dict[str, Any] | None] | None,
        result: RewardResult,
    ) -> None:
        worker = self._workers[slot]
        label = labels[index]
        extra = {} if metadata is None or metadata[index] is None else dict(metadata[index])
        task = (index, responses[index], "" if label is None else str(label), extra)
        try:
            worker.conn.send(task)
        except OSError as error:
            self._fail(result, index, f"reward worker unreachable: {_describe(error)}")
            self._replace(slot)
            return
        worker.task, worker.deadline = index, time.monotonic() + self.config.reward_timeout_s

    def _collect(self, result: RewardResult) -> None:
        """Wait for the next answer or deadline among busy and starting workers, and handle what arrived."""
        waiting = [slot for slot, w in enumerate(self._workers) if w.task is not None or not w.ready]
        if not waiting:
            return
        timeout = max(0.0, min(self._workers[slot].deadline for slot in waiting) - time.monotonic())
        arrived = set(wait([self._workers[slot].conn for slot in waiting], timeout))
        for slot in waiting:
            worker = self._workers[slot]
            if worker.conn in arrived:
                self._receive(slot, result)
            elif time.monotonic() >= worker.deadline:
                if worker.task is None:
                    raise RuntimeError(f"a reward worker did not start within {STARTUP_TIMEOUT_S} s")
                result.timeouts += 1
                result.errors[worker.task] = f"timed out after {self.config.reward_timeout_s} s"
                self._replace(slot)

    def _receive(self, slot: int, result: RewardResult) -> None:
        worker = self._workers[slot]
        try:
            kind, index, payload = worker.conn.recv()
        except (EOFError, OSError) as error:
            worker.process.join(timeout=5.0)
            if worker.task is None:
                message = f"a reward worker exited while starting (exit code {worker.process.exitcode})"
                raise RuntimeError(message) from error
            self._fail(result, worker.task, f"reward worker died (exit code {worker.process.exitcode})")
            self._replace(slot)
            return
        if kind == "init_error":
            raise RuntimeError(f"a reward worker could not load the reward: {payload}")
        worker.ready, worker.task = True, None
        if kind == "ok":
            result.rewards[index] = payload
        elif kind == "error":
            self._fail(result, index, payload)

    def _fail(self, result: RewardResult, index: int, message: str) -> None:
        result.failures += 1
        result.errors[index] = message
        logger.debug("reward of response %d failed: %s", index, message)

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        self._finalizer()

    def __enter__(self) -> "RewardModel":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def reward_one(
    rm_type: str,
    label: str,
    response: str,
    custom_rm_path: str | None = None,
    timeout_s: float = 10.0,
    metadata: dict[str, Any] | None = None,
) -> float:
    """The reward of one response, graded in a worker process under a time limit (``league reward``).

    A failed or timed-out grading logs a warning with its reason and returns 0.0.

    Args:
        rm_type (str): ``"deepscaler"``, ``"dapo"`` or ``"math"``; ignored when ``custom_rm_path`` is set.
        label (str): the ground-truth answer.
        response (str): the generated text.
        custom_rm_path (str, Optional): a user reward, ``module:function`` or ``file.py:function``. Default: ``None``.
        timeout_s (float): seconds the grading may take. Default: ``10.0``.
        metadata (dict, Optional): handed to a custom reward. Default: ``None`` (an empty dict).

    Returns:
        The reward.
    """
    config = RewardConfig(
        rm_type=rm_type, custom_rm_path=custom_rm_path, reward_timeout_s=timeout_s, reward_num_workers=1
    )
    with RewardModel(config) as model:
        result = model.score([response], [label], [metadata])
    if result.errors[0] is not None:
        logger.warning("reward set to 0: %s", result.errors[0])
    return result.rewards[0]
