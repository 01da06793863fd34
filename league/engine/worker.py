"""EngineWorker: one background thread drives an LLMEngine; other threads submit, abort and reload through it.

The engine is not thread-safe, so exactly one thread calls it: it runs ``engine.step()`` while there is
work, sleeps on a condition variable when there is none, and between two steps runs what other threads
queued with ``call`` (new requests, aborts, weight loads). Each submission gets its outputs on its own
queue. Not responsible for HTTP, JSON or tokenization (``server.py``), nor for validating requests beyond
what ``LLMEngine.add_request`` checks.
"""

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from league.engine.engine import LLMEngine
from league.engine.request import GenerateOutput, SamplingParams

log = logging.getLogger(__name__)

GONE_POLL_S = 0.25
"""How often a waiting submission asks whether its client is still there."""


class EngineUnavailable(RuntimeError):
    """The engine thread has stopped (shutdown), or the engine cannot run at all (the server answers HTTP 503)."""


class ClientGone(RuntimeError):
    """The client of a submission closed its connection while waiting (the submission is to be aborted)."""


class EngineStepFailed(RuntimeError):
    """An engine step that ran this request raised; the engine dropped that step's requests and serves on (the
    server answers HTTP 500 to those requests only)."""


@dataclass(eq=False)
class Submission:
    """Prompts submitted together, as the engine thread tracks them; the submitter waits on ``events``."""

    prompts: list[list[int]]
    params: list[SamplingParams]
    n: int
    rids: list[str]
    stream: bool
    top_logprobs_num: int = 0
    logprob_start_len: int = -1
    routed_experts_start_len: int | None = None
    members: list[str] = field(default_factory=list)
    """Engine request ids, prompt-major (n consecutive samples per prompt)."""
    arrived: float = field(default_factory=time.monotonic)
    weight_version: str = ""
    """The weights' version when the submission was admitted."""
    version_marks: list[tuple[int, int, str]] = field(default_factory=list)
    """(member, output tokens before it, new version) of each weight change while the member ran."""
    sent: list[int] = field(default_factory=list)
    remaining: int = 0
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    """(member index, output, finished); (None, exception, True) when the engine stops or fails."""

    def updates(self, gone: Callable[[], bool] | None = None) -> Iterator[tuple[int, GenerateOutput, bool]]:
        """Yield (member index, output, finished) until every member has finished; streaming submissions
        also get unfinished snapshots. Raises EngineUnavailable if the engine stops first, EngineStepFailed if
        a step running a member failed, and ClientGone once ``gone()`` (asked while nothing arrives) is true."""
        left = len(self.members)
        while left:
            try:
                i, out, finished = self.events.get(timeout=None if gone is None else GONE_POLL_S)
            except queue.Empty:
                if gone():
                    raise ClientGone("the client closed its connection") from None
                continue
            if i is None:
                raise out
            left -= finished
            yield i, out, finished

    def weight_versions(self, i: int, num_output: int) -> list[dict] | None:
        """SGLang's ``weight_versions`` of member i: the spans of its output tokens made by each version of the
        weights, when they changed while it ran (None otherwise)."""
        marks = [(n, version) for member, n, version in self.version_marks if member == i]
        if not marks:
            return None
        starts = [(0, self.weight_version), *marks]
        ends = [n for n, _ in marks] + [num_output]
        return [{"version": v, "start": s, "end": e} for (s, v), e in zip(starts, ends)]

    def outputs(self, gone: Callable[[], bool] | None = None) -> list[GenerateOutput]:
        """Wait for every member; outputs in member order (n consecutive samples per prompt)."""
        done = {i: out for i, out, finished in self.updates(gone) if finished}
        return [done[i] for i in range(len(self.members))]


class EngineWorker:
    """Drives one LLMEngine from one background thread; other threads reach it only through ``call``.

    Args:
        engine (LLMEngine): the engine; once the worker starts, only its thread touches it.
    """

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.error: str | None = None
        """Why the engine cannot run (recovery after a failed step failed too); every request then gets a 503."""
        self.failure: str | None = None
        """The error of the last engine step, while no step has succeeded since (cleared by the next good step)."""
        self.num_failed_steps = 0
        self._cond = threading.Condition()
        self._inbox: list[tuple[Callable[[], Any], Future]] = []
        self._stopped = False
        self._owner: dict[str, tuple[Submission, int]] = {}
        self._groups: dict[str, list[str]] = {}
        self._streaming: set[Submission] = set()
        self._discarded: set[str] = set()
        """Requests of rejected submissions, aborted but not yet collected from the engine."""
        self.weight_version = "default"
        """The version of the engine's weights (SGLang's ``weight_version``), set with each weight update."""
        self.holds: set[str] = set()
        """Why the engine does not step now (``pause``: /pause_generation, ``weight_update``: between
        /begin_weight_update and /end_weight_update); requests wait, and new ones queue, until none is left."""
        self._thread = threading.Thread(target=self._loop, name="league-engine", daemon=True)
        self._thread.start()

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the engine thread between two steps; return its result or raise its error."""
        future: Future = Future()
        with self._cond:
            if self._stopped:
                raise EngineUnavailable("the server is shutting down")
            self._inbox.append((fn, future))
            self._cond.notify()
        return future.result()

    def submit(
        self,
        prompts: list[list[int]],
        params: list[SamplingParams],
        n: int,
        rids: list[str],
        stream: bool = False,
        top_logprobs_num: int = 0,
        logprob_start_len: int = -1,
        routed_experts_start_len: int | None = None,
    ) -> Submission:
        """Queue prompts (n samples each, under the given distinct rids) after the engine's own checks.

        Raises the engine's ValueError for a bad prompt (nothing of the submission is left running), or
        EngineUnavailable. With ``stream``, the submission also receives unfinished snapshots. The log-prob
        options are ``LLMEngine.add_request``'s.
        """
        sub = Submission(
            prompts=prompts,
            params=params,
            n=n,
            rids=rids,
            stream=stream,
            top_logprobs_num=top_logprobs_num,
            logprob_start_len=logprob_start_len,
            routed_experts_start_len=routed_experts_start_len,
        )
        self.call(lambda: self._add(sub))
        return sub

    def abort(self, rid: str | None) -> int:
        """Abort one request (a prompt's rid covers its n samples), or all with None; returns how many."""
        return self.call(lambda: self._abort(rid))

    def update_weights(self, load: Callable[[LLMEngine], Any], abort_all: bool, version: str | None) -> int:
        """Run ``load(engine)`` between two steps (requests in flight go on with the new weights, or are aborted
        first with ``abort_all``), then call the weights ``version`` (if given). Returns the requests in flight."""

        def run() -> int:
            released = sorted(self.engine.runner.released.keys() & {"weights", "weights_drafter"})
            if released:
                raise ValueError(
                    f"the engine's {' and '.join(released)} are released (/release_memory_occupation): resume them "
                    "first (/resume_memory_occupation)"
                )
            if abort_all:
                self.abort_and_collect()
            load(self.engine)
            if version is not None:
                self.set_weight_version(version)
            return len(self._owner)

        return self.call(run)

    def stop(self, timeout: float = 60.0) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout)

    def set_weight_version(self, version: str) -> None:
        """On the engine thread: the weights are now ``version``; running requests note where it changed."""
        if version == self.weight_version:
            return
        running = {r.rid: len(r.output_ids) for r in self.engine.scheduler.running}
        for rid, (sub, i) in self._owner.items():
            sub.version_marks.append((i, running.get(rid, 0), version))
        self.weight_version = version

    def hold(self, reason: str, on: bool, wait: bool = True) -> None:
        """Stop stepping the engine for ``reason`` (returning once the step under way, if any, has ended; on the
        engine thread itself, between two steps, pass ``wait=False``), or stop holding for it; steps resume once no
        hold is left."""
        with self._cond:
            (self.holds.add if on else self.holds.discard)(reason)
            self._cond.notify()
        if on and wait:
            self.call(lambda: None)

    def abort_and_collect(self) -> int:
        """On the engine thread: abort every request and hand each its output so far (finish reason ``abort``),
        even while held; returns how many were aborted."""
        aborted = self._abort(None)
        while self.engine.has_unfinished():
            self._step()
        return aborted

    def _has_work(self) -> bool:
        return self.error is None and not self.holds and self.engine.has_unfinished()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._stopped or self._inbox or self._has_work()):
                    self._cond.wait()
                if self._stopped:
                    break
                inbox, self._inbox = self._inbox, []
            for fn, future in inbox:
                try:
                    future.set_result(fn())
                except Exception as e:
                    future.set_exception(e)
            if self._has_work():
                self._step()
        closed = EngineUnavailable("the server is shutting down")
        with self._cond:
            inbox, self._inbox = self._inbox, []
        for _, future in inbox:
            future.set_exception(closed)
        self._fail_all(closed)

    def _step(self) -> None:
        try:
            finished = self.engine.step()
        except Exception as e:
            self._recover(e)
            return
        self.failure = None
        for out in finished:
            self._finish(out)
        if self._streaming:
            running = {r.rid: r for r in self.engine.scheduler.running}
            for sub in self._streaming:
                for i, rid in enumerate(sub.members):
                    r = running.get(rid)
                    if r is not None and r.finish_reason is None and len(r.output_ids) > sub.sent[i]:
                        sub.sent[i] = len(r.output_ids)
                        out = r.to_output()
                        out.spec = dataclasses.replace(r.spec)
                        sub.events.put((i, out, False))

    def _add(self, sub: Submission) -> None:
        if self.error:
            raise EngineUnavailable(self.error)
        taken = [rid for rid in sub.rids if rid in self._groups or rid in self._owner or rid in self._discarded]
        if taken:
            raise ValueError(f"`rid` {taken[0]!r} is already in flight")
        added: list[str] = []
        try:
            for prompt, params, rid in zip(sub.prompts, sub.params, sub.rids):
                added.extend(
                    self.engine.add_request(
                        prompt,
                        params,
                        sub.n,
                        rid,
                        sub.top_logprobs_num,
                        sub.logprob_start_len,
                        sub.routed_experts_start_len,
                    )
                )
        except ValueError as e:
            for rid in added:
                self.engine.abort(rid)
            self._discarded.update(added)
            where = f"prompt {len(added) // sub.n}: " if len(sub.prompts) > 1 else ""
            raise ValueError(where + str(e)) from None
        sub.members, sub.sent, sub.remaining = added, [0] * len(added), len(added)
        sub.weight_version = self.weight_version
        self._owner.update({rid: (sub, i) for i, rid in enumerate(added)})
        self._groups.update({rid: added[k * sub.n : (k + 1) * sub.n] for k, rid in enumerate(sub.rids)})
        if sub.stream:
            self._streaming.add(sub)

    def _finish(self, out: GenerateOutput) -> None:
        owner = self._owner.pop(out.rid, None)
        if owner is None:
            self._discarded.discard(out.rid)
            return
        sub, i = owner
        sub.events.put((i, out, True))
        sub.remaining -= 1
        base = sub.rids[i // sub.n]
        if all(m not in self._owner for m in self._groups[base]):
            del self._groups[base]
        if sub.remaining == 0:
            self._streaming.discard(sub)

    def _abort(self, rid: str | None) -> int:
        targets = list(self._owner) if rid is None else self._groups.get(rid, [rid] if rid in self._owner else [])
        for target in targets:
            self.engine.abort(target)
        return len(targets)

    def _recover(self, error: Exception) -> None:
        """After a failed step: the engine drops the requests it was running and keeps the waiting ones; every
        submission with a dropped member fails (its other members are aborted), the rest go on."""
        log.exception("an engine step failed; its requests fail, the engine serves on")
        self.num_failed_steps += 1
        self.failure = f"the engine step running this request failed: {error!r}"
        try:
            kept = self.engine.recover()
        except Exception as e:
            log.exception("the engine could not recover from a failed step")
            self.error = f"the engine failed and could not recover ({e!r}); restart the server"
            self._fail_all(EngineUnavailable(self.error))
            return
        failed = {sub for rid, (sub, _) in self._owner.items() if rid not in kept}
        for sub in failed:
            for rid in sub.members:
                if self._owner.pop(rid, None) is not None and rid in kept:
                    self.engine.abort(rid)
                    self._discarded.add(rid)
            for rid in sub.rids:
                self._groups.pop(rid, None)
            self._streaming.discard(sub)
            sub.events.put((None, EngineStepFailed(self.failure), True))
        self._discarded &= kept

    def _fail_all(self, error: Exception) -> None:
        for sub in {sub for sub, _ in self._owner.values()}:
            sub.events.put((None, error, True))
        self._owner.clear()
        self._groups.clear()
        self._streaming.clear()
