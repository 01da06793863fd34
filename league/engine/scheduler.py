"""Continuous batching: which requests run, which wait, and which prompt chunks a step prefills.

A request (with its n-sample group) is admitted when the group fits in free cache slots and under
``max_running``; otherwise it waits in arrival order, and is never dropped. While requests run, waiting ones are
admitted only once ``admission_batch`` of them fit (or all that wait do), so that they share a prefill. Each step
prefills prompt chunks in admission order up to a token budget, so long prompts are prefilled over several steps
while other requests keep decoding. Not responsible for running the model.
"""

from collections import deque
from dataclasses import dataclass, field

from league.engine.cache import SlotPool
from league.engine.request import Request


@dataclass(kw_only=True, slots=True)
class StepPlan:
    prefill: list[tuple[Request, int, int]] = field(default_factory=list)
    """(request, first prompt position, end position) chunks to prefill this step."""


class Scheduler:
    def __init__(self, num_slots: int, max_running: int, token_budget: int, admission_batch: int = 1):
        self.pool = SlotPool(num_slots=num_slots)
        self.max_running, self.token_budget, self.admission_batch = max_running, token_budget, admission_batch
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._aborted: list[Request] = []

    def add(self, leader: Request) -> None:
        self.waiting.append(leader)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self._aborted)

    def abort(self, rid: str) -> bool:
        for leader in list(self.waiting):
            if any(m.rid == rid for m in leader.group):
                for member in leader.group:
                    member.finish_reason = "abort"
                self.waiting.remove(leader)
                self._aborted.extend(leader.group)
                return True
        for r in self.running:
            if r.rid == rid and r.finish_reason is None:
                leader = r.leader or r
                # before the shared prefill is done, the group stands or falls together
                for member in leader.group if not leader.prefill_done else [r]:
                    member.finish_reason = member.finish_reason or "abort"
                return True
        return False

    def schedule(self) -> StepPlan:
        self._admit()
        plan, budget = StepPlan(), self.token_budget
        for r in self.running:
            if budget == 0:
                break
            if r.leader is None and not r.prefill_done and r.finish_reason is None:
                end = min(len(r.prompt_ids), r.num_prefilled + budget)
                plan.prefill.append((r, r.num_prefilled, end))
                budget -= end - r.num_prefilled
        return plan

    def _admit(self) -> None:
        if self.running and self.waiting:  # hold admissions until a batch of them fits
            room = min(self.pool.num_free, self.max_running - len(self.running))
            if room < min(self.admission_batch, sum(len(leader.group) for leader in self.waiting)):
                return
        while self.waiting:
            group = self.waiting[0].group
            if len(self.running) + len(group) > self.max_running or self.pool.num_free < len(group):
                return
            self.waiting.popleft()
            for member in group:
                member.slot = self.pool.allocate()
                self.running.append(member)

    def drop_running(self) -> list[Request]:
        """Remove every running (and aborted, not yet collected) request, freeing its slot; waiting ones stay."""
        dropped = self.running + self._aborted
        for r in self.running:
            self.pool.release(r.slot)
            r.slot = None
        self.running, self._aborted = [], []
        return dropped

    def collect_finished(self) -> list[Request]:
        """Remove finished requests (a group's members wait for their leader's prefill) and free their slots."""
        done = [r for r in self.running if r.finish_reason is not None]
        for r in done:
            self.pool.release(r.slot)
            r.slot = None
        self.running = [r for r in self.running if r.finish_reason is None]
        done.extend(self._aborted)
        self._aborted = []
        return done
