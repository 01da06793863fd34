"""Continuous batching over paged memory: which requests run, which wait, which prompt chunks a step prefills, and
which blocks each request holds.

A request (with its n-sample group) is admitted when the group fits in free state slots and under ``max_running``,
and the blocks its prompt needs are free (or can be freed by evicting the prefix cache); otherwise it waits in
arrival order, and is never dropped. While requests run, waiting ones are admitted only once ``admission_batch`` of
them fit (or all that wait do), so that they share a prefill. On admission the leader reuses the longest prefix the
prefix cache can resume (its blocks shared, the GDN snapshot copied into its slot) and prefills the rest, in chunks
in admission order up to a token budget, so long prompts are prefilled over several steps while other requests keep
decoding; a chunk also ends where the request should leave a GDN snapshot for later requests (``snapshot_points``).
Before every forward the blocks a request writes are made its own (:meth:`reserve`: allocated, or copied when
shared); when blocks run out, the prefix cache is evicted, then the newest decoding requests are preempted: their
blocks and slot are given back and they wait, to be prefilled again (prompt and output so far) and go on exactly
where they were. Not responsible for running the model (``memory`` copies blocks and states).
"""

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from league.engine.cache import BlockPool, SlotPool
from league.engine.radix import Match, RadixCache
from league.engine.request import Request


class Memory(Protocol):
    """What the scheduler asks of the model runner's caches."""

    def copy_blocks(self, src: list[int], dst: list[int]) -> None: ...

    def copy_states(self, src: int, dsts: list[int]) -> None: ...

    def set_blocks(self, slot: int, blocks: list[int]) -> None: ...


@dataclass(kw_only=True, slots=True)
class StepPlan:
    prefill: list[tuple[Request, int, int]] = field(default_factory=list)
    """(request, first position, end position) chunks to prefill this step."""


@dataclass(kw_only=True, slots=True)
class Paging:
    """The memory the scheduler hands out: ``blocks`` of ``page_size`` positions, GDN snapshot slots from
    ``snapshot_slots`` (the slots after the running ones), and the prefix cache's settings."""

    page_size: int
    num_blocks: int
    radix: bool = True
    strategy: str = "extra_buffer"
    track_interval: int = 256
    snapshot_slots: range = range(0)


class Scheduler:
    def __init__(
        self,
        num_slots: int,
        max_running: int,
        token_budget: int,
        admission_batch: int = 1,
        paging: Paging | None = None,
        memory: Memory | None = None,
    ):
        self.pool = SlotPool(num_slots=num_slots)
        self.max_running, self.token_budget, self.admission_batch = max_running, token_budget, admission_batch
        self.paging = paging or Paging(page_size=1 << 30, num_blocks=num_slots, radix=False)
        self.page = self.paging.page_size
        self.blocks = BlockPool(num_blocks=self.paging.num_blocks)
        self.memory = memory
        self.radix: RadixCache | None = None
        if self.paging.radix:
            slots = self.paging.snapshot_slots
            snapshots = SlotPool(num_slots=len(slots), first=slots.start)
            self.radix = RadixCache(self.page, self.blocks, snapshots)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._aborted: list[Request] = []
        self.preemptions = 0

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
                end = min(len(r.fill_ids), r.num_prefilled + budget)
                end = min([end, *(p for p in r.snapshot_points if p > r.num_prefilled)])
                plan.prefill.append((r, r.num_prefilled, end))
                budget -= end - r.num_prefilled
        return plan

    # admission --------------------------------------------------------------------------------------

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page)

    def admission_blocks(self, prompt_len: int, n: int) -> int:
        """Blocks a prompt of ``prompt_len`` tokens and its ``n`` samples need to start: its prompt and first
        decoded position, and a block of its own for each other sample's first tokens."""
        return self._blocks_for(prompt_len + 1) + n - 1

    def _admit(self) -> None:
        if self.running and self.waiting:  # hold admissions until a batch of them fits
            room = min(self.pool.num_free, self.max_running - len(self.running))
            if room < min(self.admission_batch, sum(len(leader.group) for leader in self.waiting)):
                return
        while self.waiting:
            leader = self.waiting[0]
            group = leader.group
            if len(self.running) + len(group) > self.max_running or self.pool.num_free < len(group):
                return
            match = self._match(leader)
            needed = self.admission_blocks(len(leader.fill_ids), len(group)) - len(match.blocks)
            if self.blocks.num_free < needed and self.radix is not None:
                self.radix.evict(blocks=needed)
                match = self._match(leader)  # eviction may have dropped (part of) the prefix it matched
                needed = self.admission_blocks(len(leader.fill_ids), len(group)) - len(match.blocks)
            if self.blocks.num_free < needed:
                return
            self.waiting.popleft()
            for member in group:
                member.slot = self.pool.allocate()
                self.running.append(member)
            self._start(leader, match)

    def _match(self, leader: Request):
        if self.radix is None:
            return Match()
        limit = len(leader.fill_ids) - 1  # the last token runs, for the first token's logits
        if leader.logprob_start_len >= 0 and not leader.resumed:  # the prompt positions it scores run too
            limit = min(limit, max(leader.logprob_start_len - 1, 0))
        return self.radix.match(leader.fill_ids, limit)

    def _start(self, leader: Request, match) -> None:
        """The leader's blocks: the reused prefix's (shared) and fresh ones for the rest of its prompt; its GDN
        states from the prefix's snapshot; where its chunks end to leave snapshots."""
        fill = len(leader.fill_ids)
        for block in match.blocks:
            self.blocks.share(block)
        leader.blocks = list(match.blocks)
        if match.snapshot is not None:
            self.memory.copy_states(match.snapshot, [leader.slot])
        leader.num_prefilled = match.length
        if not leader.resumed:
            leader.cached_tokens = match.length
        if self.radix is not None:
            stats = self.radix.stats
            stats.queries += 1
            stats.hits += match.length > 0
            stats.query_tokens += fill
            stats.reused_tokens += match.length
        leader.snapshot_points = self._snapshot_points(fill, match)
        self.reserve(leader, match.length, fill)

    def _snapshot_points(self, fill: int, match) -> list[int]:
        """Positions where the prefill stops to snapshot the GDN states (extra_buffer): where the cached keys stop
        matching (a branch point, block-aligned) and the last multiple of the tracking interval before the prompt's
        last token, each past what the request reuses."""
        if self.radix is None or self.paging.strategy != "extra_buffer":
            return []
        interval = self.paging.track_interval
        points = {match.keys_length, (fill - 1) // interval * interval}
        return sorted(p for p in points if match.length < p <= fill - 1 and p % self.page == 0)

    # blocks ------------------------------------------------------------------------------------------

    def reserve(self, r: Request, start: int, end: int) -> bool:
        """Make the blocks holding positions ``start .. end - 1`` of ``r`` its own (allocated, or copied where shared
        with another request or the prefix cache), so that it may write them; returns False, changing nothing
        more, when blocks run out even after evicting the prefix cache."""
        if end <= start:
            return True
        first, last = start // self.page, (end - 1) // self.page
        missing = max(0, last + 1 - len(r.blocks))
        shared = [i for i in range(first, min(last + 1, len(r.blocks))) if self.blocks.refs[r.blocks[i]] > 1]
        needed = missing + len(shared)
        if needed == 0:
            return True
        if self.blocks.num_free < needed and self.radix is not None:
            self.radix.evict(blocks=needed)
            shared = [i for i in range(first, min(last + 1, len(r.blocks))) if self.blocks.refs[r.blocks[i]] > 1]
            needed = missing + len(shared)
        if self.blocks.num_free < needed:
            return False
        copies = []
        for i in shared:
            block = self.blocks.allocate()
            copies.append((r.blocks[i], block))
            self.blocks.release(r.blocks[i])
            r.blocks[i] = block
        for _ in range(missing):
            r.blocks.append(self.blocks.allocate())
        if copies:
            self.memory.copy_blocks([s for s, _ in copies], [d for _, d in copies])
        self.memory.set_blocks(r.slot, r.blocks)
        return True

    def share_prompt(self, leader: Request, member: Request) -> None:
        """A sample of ``leader``'s group starts from its prompt: the same blocks, one more reference each."""
        for block in leader.blocks:
            self.blocks.share(block)
        member.blocks = list(leader.blocks)
        self.memory.set_blocks(member.slot, member.blocks)

    def reserve_or_preempt(self, reqs: list[Request], spans: list[tuple[int, int]], settle) -> list[Request]:
        """:meth:`reserve` each request's span, preempting the newest decoding requests (``settle()`` first, once,
        to read back any step in flight) while blocks are short; returns the requests that still run, in order."""
        settled = False
        for r, (start, end) in zip(list(reqs), spans):
            while r.slot is not None and not self.reserve(r, start, end):
                if not settled:
                    settle()
                    settled = True
                victim = self._victim(exclude=r)
                if victim is None:
                    raise RuntimeError(f"the KV pool ({self.paging.num_blocks} blocks) cannot hold request {r.rid}")
                self.preempt(victim)
        return [r for r in reqs if r.slot is not None and r.finish_reason is None]

    def _victim(self, exclude: Request) -> Request | None:
        candidates = [r for r in self.running if r is not exclude and r.prefill_done and r.finish_reason is None]
        return candidates[-1] if candidates else None

    def preempt(self, r: Request) -> None:
        """Take ``r``'s blocks and slot back; it waits at the head of the queue, to be prefilled again (its prompt and
        the outputs it has run) and go on from its last token."""
        self._free(r)
        self.running.remove(r)
        r.preempt()
        self.waiting.appendleft(r)
        self.preemptions += 1

    def _free(self, r: Request) -> None:
        for block in r.blocks:
            self.blocks.release(block)
        r.blocks = []
        if r.slot is not None:
            self.pool.release(r.slot)
        r.slot = None

    def cache_prefix(self, r: Request, length: int, snapshot: int | None) -> None:
        """Give the prefix cache ``r``'s first ``length`` tokens (a multiple of the page size), with the GDN states
        after them in the snapshot slot ``snapshot``."""
        if self.radix is None:
            return
        tokens = (r.prompt_ids + r.output_ids)[:length]
        if len(tokens) < length or length == 0:
            if snapshot is not None:
                self.radix.snapshots.release(snapshot)
            return
        self.radix.insert(tokens, r.blocks[: length // self.page], snapshot)

    def take_snapshot_slot(self) -> int | None:
        """A free slot of the snapshot pool (evicting the prefix cache's least recently used leaves if needed)."""
        if self.radix is None:
            return None
        if not self.radix.snapshots.num_free:
            self.radix.evict(snapshots=1)
        return self.radix.snapshots.allocate()

    def flush_cache(self) -> None:
        if self.radix is not None:
            self.radix.flush()

    # leaving -----------------------------------------------------------------------------------------

    def drop_running(self) -> list[Request]:
        """Remove every running (and aborted, not yet collected) request, freeing its slot; waiting ones stay."""
        dropped = self.running + self._aborted
        for r in self.running:
            self._free(r)
        self.running, self._aborted = [], []
        return dropped

    def collect_finished(self) -> list[Request]:
        """Remove finished requests (a group's members wait for their leader's prefill) and free their slots."""
        done = [r for r in self.running if r.finish_reason is not None]
        for r in done:
            self._free(r)
        self.running = [r for r in self.running if r.finish_reason is None]
        done.extend(self._aborted)
        self._aborted = []
        return done
