"""LLMEngine: requests in, outputs out, with continuous batching over cache slots.

Each ``step()`` schedules (``scheduler``), runs at most one prefill forward (prompt chunks under the token budget) and
one decode forward (one token per running request, or, with speculation, a draft chain and one verify of
``num_steps + 1`` tokens per request) through the ``ModelRunner``, and appends what the ``sampler`` draws. Finished
requests leave at once and new ones take their slots. Without speculation, a decode step's tokens are read back only
after the next step is launched (the overlap schedule), so the host's bookkeeping runs while the GPU computes; with
it, a step's acceptance, state commit and log-probs are queued on the device behind the verify and read back once.
The engine runs the same ``Transformer`` as the trainer, so a token's log-prob is computed the same way when it is
sampled and when it is trained on. Not responsible for tokenising prompts, HTTP, or threads.
"""

import itertools

import torch

from league.engine import sampler
from league.engine.config import EngineConfig
from league.engine.model_runner import ModelRunner
from league.engine.request import (
    EngineStats,
    GenerateOutput,
    InFlight,
    Request,
    SamplingParams,
    SpecStats,
    check_request,
    check_routes_asked,
    ends_by_length,
    finish_reason,
)
from league.engine.scheduler import Paging, Scheduler
from league.models.qwen3_5_moe import Transformer
from league.ops.logprob import token_logprobs
from league.ops.numerics import Numerics
from league.parallel.inference import EngineLayout

__all__ = ["EngineConfig", "EngineStats", "LLMEngine"]


class LLMEngine:
    """Generation over one model with preallocated cache slots.

    Args:
        model (Transformer): the model, read in place (colocated with a trainer, nothing is copied).
        config (EngineConfig): sizes, numerics and speculative decoding.
        tokenizer (Optional): for stop strings and output text. Default: None.
        layout (EngineLayout, Optional): this rank's place in an engine over several ranks, its model already laid
            out (``parallel.inference.place_engine_model``); every rank of the engine makes the same calls in the
            same order (``engine.lockstep`` for a served engine). Default: one process.
    """

    def __init__(
        self, model: Transformer, config: EngineConfig | None = None, tokenizer=None, layout: EngineLayout | None = None
    ):
        self.model, self.config, self.tokenizer = model, config or EngineConfig(), tokenizer
        self.layout = layout or EngineLayout()
        self.config.check_layout(self.layout.tp, self.layout.ep)
        self.args = model.args
        if self.config.num_spec_steps and model.mtp is None:
            raise ValueError("speculative decoding needs the model's MTP head (mtp_num_hidden_layers >= 1)")
        self.numerics = Numerics(self.config.numerics)
        self.runner = ModelRunner(model, self.config, self.numerics, self.layout)
        self.device, self.dtype, self.context_length = self.runner.device, self.runner.dtype, self.runner.context_length
        runner = self.runner
        self.paging = Paging(
            page_size=runner.page_size,
            num_blocks=runner.num_blocks,
            radix=not self.config.disable_radix_cache,
            strategy=self.config.mamba_scheduler_strategy,
            track_interval=self.config.mamba_track_interval,
            snapshot_slots=runner.snapshot_slots,
        )
        self.scheduler = Scheduler(
            num_slots=runner.num_slots,
            max_running=self.config.max_running_requests,
            token_budget=self.config.max_num_batched_tokens,
            admission_batch=self.config.admission_batch,
            paging=self.paging,
            memory=runner,
        )
        self.eos_ids = set(self.args.eos_token_id)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            self.eos_ids.add(tokenizer.eos_token_id)
        self.stats = EngineStats()
        self.in_flight: InFlight | None = None
        self._pending_snapshots: list[tuple[Request, int, int]] = []
        """GDN snapshots taken, waiting to enter the prefix cache: (request, length, snapshot slot)."""
        self._seeds = torch.Generator().manual_seed(self.config.random_seed)
        self._ids = itertools.count()

    # requests ---------------------------------------------------------------------------------------

    def add_request(
        self,
        prompt_ids: list[int],
        params: SamplingParams | None = None,
        n: int = 1,
        rid: str | None = None,
        top_logprobs_num: int = 0,
        logprob_start_len: int = -1,
        routed_experts_start_len: int | None = None,
    ) -> list[str]:
        """Queue a prompt; returns the ids of its ``n`` samples (``rid`` or a generated id, ``-i`` suffixed when
        n > 1). Sample i of a seeded request uses seed ``seed + i``. ``top_logprobs_num`` keeps that many most likely
        tokens at each position whose log-prob is returned; ``logprob_start_len`` >= 0 also returns the log-probs of
        the prompt's tokens from that position on; ``routed_experts_start_len`` (an engine with
        ``enable_return_routed_experts``) returns the experts chosen at each position from that one on. Raises
        ValueError naming the field for anything out of range."""
        params = params or SamplingParams()
        check_routes_asked(routed_experts_start_len, len(prompt_ids), self.config.enable_return_routed_experts)
        check_request(prompt_ids, params, n, top_logprobs_num, logprob_start_len, self.args.vocab_size)
        if len(prompt_ids) >= self.context_length:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the context length is {self.context_length}")
        if n > self.scheduler.max_running or n > self.scheduler.pool.num_slots:
            raise ValueError(f"n ({n}) exceeds max_running_requests / cache slots ({self.scheduler.max_running})")
        needed = self.scheduler.admission_blocks(len(prompt_ids), n)
        if needed > self.paging.num_blocks:
            raise ValueError(
                f"the prompt ({len(prompt_ids)} tokens) and n ({n}) need {needed} cache blocks of "
                f"{self.paging.page_size} tokens; the engine has {self.paging.num_blocks} (max_total_tokens)"
            )
        base = rid if rid is not None else f"req-{next(self._ids)}"
        seeds = [
            params.seed + i if params.seed is not None else int(torch.randint(2**62, (1,), generator=self._seeds))
            for i in range(n)
        ]
        members = [
            Request(
                rid=base if n == 1 else f"{base}-{i}",
                prompt_ids=list(prompt_ids),
                params=params,
                seed=seed,
                top_logprobs_num=top_logprobs_num,
                logprob_start_len=logprob_start_len,
                routed_experts_start_len=routed_experts_start_len,
            )
            for i, seed in enumerate(seeds)
        ]
        for member in members[1:]:
            member.leader = members[0]
        members[0].group = members
        self.scheduler.add(members[0])
        self.stats.prompt_tokens += len(prompt_ids)
        return [m.rid for m in members]

    def recover(self) -> set[str]:
        """After a step raised: drop the requests it was running or had finished (their slots freed) and the step
        in flight, keep the waiting ones. Returns the ids of the requests still queued. Raises if the device
        itself has failed (a CUDA error outlives the step), in which case the engine cannot go on."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.in_flight = None
        self.flush_cache()  # the step may have left the caches half-written
        self.scheduler.drop_running()
        return {m.rid for leader in self.scheduler.waiting for m in leader.group}

    def abort(self, rid: str) -> bool:
        """End a request now with finish reason ``abort``; its output so far is returned by the next step."""
        return self.scheduler.abort(rid)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
        n: int = 1,
        routed_experts_start_len: int | None = None,
    ) -> list[GenerateOutput]:
        """Generate for every prompt (n samples each, consecutive in the result); ``routed_experts_start_len`` as
        :meth:`add_request`."""
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        order = [
            rid
            for p, sp in zip(prompts, params_list)
            for rid in self.add_request(p, sp, n=n, routed_experts_start_len=routed_experts_start_len)
        ]
        done: dict[str, GenerateOutput] = {}
        while len(done) < len(order):
            for out in self.step():
                done[out.rid] = out
        return [done[rid] for rid in order]

    # one step: schedule -> run -> append -----------------------------------------------------------------

    def step(self) -> list[GenerateOutput]:
        """Admit, prefill a budget of prompt tokens, decode every running request once; return finished ones."""
        with torch.no_grad():
            plan = self.scheduler.schedule()
            if plan.prefill:
                self._prefill(plan.prefill)
            decoding = [
                r
                for r in self.scheduler.running
                if r.finish_reason is None and r.pending_token is not None and r.prefill_done
            ]
            limit = self.config.speculative_max_batch
            if decoding and self.runner.spec_step is not None and (limit is None or len(decoding) <= limit):
                self._decode_speculative(decoding)
            elif decoding or self.in_flight is not None:
                self._decode(decoding)
        finished = [r for r in self.scheduler.running if r.finish_reason is not None]
        self.runner.keep_routes(finished)  # slots still held
        self._cache_finished(finished)
        self._cache_snapshots()
        return [r.to_output(self._text(r)) for r in self.scheduler.collect_finished()]

    def _prefill(self, chunks: list[tuple[Request, int, int]]) -> None:
        hidden, batch = self.runner.prefill(chunks)
        self.stats.forward_passes += 1
        self.stats.prefill_passes += 1
        self.stats.prefill_tokens += sum(e - s for _, s, e in chunks)
        asked = [(c, seq) for c, seq in zip(chunks, batch.sequences()) if c[0].logprob_start_len >= 0]
        asked = [(c, seq) for c, seq in asked if not c[0].resumed]  # a resumed request has its prompt's already
        if asked:
            self.runner.prompt_logprobs([c for c, _ in asked], hidden, [seq for _, seq in asked])
        for r, _, e in chunks:
            r.num_prefilled = e
            if e in r.snapshot_points or e == len(r.fill_ids):  # where the prefill stops, or the prompt ends
                self._snapshot(r, e)
        finishing = [(r, end) for (r, _, e), (_, _, end) in zip(chunks, batch.sequences()) if e == len(r.fill_ids)]
        if not finishing:
            return
        resumed = [(r, end) for r, end in finishing if r.resumed]
        for r, end in resumed:  # preempted and prefilled again: its pending token is already drawn
            self.runner.start_sample(r, r, hidden[end - 1], r.pending_token)
        finishing = [(r, end) for r, end in finishing if not r.resumed]
        if not finishing:
            return
        logits = self.runner.logits(hidden[[end - 1 for _, end in finishing]])
        for (leader, end), row in zip(finishing, logits):
            for member in leader.group:
                if member.params.max_new_tokens == 0 or member.finish_reason is not None:
                    member.finish_reason = member.finish_reason or "length"
                    continue
                member.num_prefilled = leader.num_prefilled
                if member is not leader:
                    member.cached_tokens = leader.cached_tokens
                    self.scheduler.share_prompt(leader, member)
                penalized = sampler.penalized([member], row[None], self.eos_ids)
                token = int(sampler.sample_batch([member], penalized, [0])[0])
                self.runner.start_sample(leader, member, hidden[end - 1], token)
                logprob = token_logprobs(row[None], torch.tensor([token], device=self.device))
                tops = sampler.top_pairs([member], sampler.top_tensors([member], row[None]))
                self._append(member, [token], logprob.tolist(), tops)

    # the prefix cache's GDN snapshots -------------------------------------------------------------------------

    def _snapshot(self, r: Request, length: int) -> None:
        """Copy ``r``'s GDN states (which are after its first ``length`` tokens) into a snapshot slot now (on the
        device, behind the forward that made them); the prefix cache takes them with ``r``'s first ``length`` tokens
        once those are all on the host and every MTP row before them is computed (:meth:`_cache_snapshots`). Nothing
        without the cache, off a block boundary, or when no snapshot slot is to be had."""
        if self.scheduler.radix is None or length % self.paging.page_size or length == 0:
            return
        slot = self.scheduler.take_snapshot_slot()
        if slot is not None:
            self.runner.copy_states(r.slot, [slot])
            self._pending_snapshots.append((r, length, slot))

    def _cache_snapshots(self) -> None:
        """Hand the prefix cache the snapshots that are ready (see :meth:`_snapshot`); give back those of requests
        that ended or lost their blocks first."""
        waiting = []
        for r, length, slot in self._pending_snapshots:
            known = len(r.prompt_ids) + len(r.output_ids) >= length
            drafted = not r.mtp_tokens or r.mtp_start >= length  # the MTP rows before it are in the cache
            if r.slot is not None and known and drafted:
                self.scheduler.cache_prefix(r, length, slot)
            elif r.slot is None or r.finish_reason is not None:
                self.scheduler.radix.snapshots.release(slot)
            else:
                waiting.append((r, length, slot))
        self._pending_snapshots = waiting

    def _cache_finished(self, finished: list[Request]) -> None:
        """A finished request leaves the prefix cache the blocks of every position it ran (whose keys, and MTP
        rows when speculating, are all computed), so that later requests find where they branch off; under
        ``no_buffer`` with its GDN states after them."""
        if self.scheduler.radix is None:
            return
        in_flight = {id(r) for r in self.in_flight.reqs} if self.in_flight is not None else set()
        page = self.paging.page_size
        for r in finished:
            if r.slot is None or not r.output_ids or r.finish_reason == "abort" or not r.prefill_done:
                continue
            length = r.num_cached + (id(r) in in_flight)  # a step in flight ran its last token too
            if self.paging.strategy == "no_buffer":
                self._snapshot(r, length)
                continue
            if self.runner.spec_step is not None and r.mtp_tokens:
                length = min(length, r.mtp_start)
            self.scheduler.cache_prefix(r, length // page * page, None)

    def _tracks(self) -> bool:
        """Whether decoding snapshots the GDN states at multiples of the tracking interval (extra_buffer)."""
        return self.scheduler.radix is not None and self.paging.strategy == "extra_buffer"

    # decoding ----------------------------------------------------------------------------------------------

    def _decode(self, reqs: list[Request]) -> None:
        """Decode one token for each of ``reqs``; with the overlap schedule, read back the previous step's tokens
        after this step is launched, and this step's in the next call. In a speculating engine (a step over
        ``speculative_max_batch``), the MTP layer first takes the rows the requests owe and the step is read back at
        once. Each request's blocks for the new position are reserved first (preempting others if they run out, the
        step in flight read back first)."""
        previous, self.in_flight = self.in_flight, None
        speculating = self.runner.spec_step is not None

        def settle() -> None:
            nonlocal previous
            if previous is not None:
                self._land(previous)
                previous = None

        def spans(rs: list[Request]) -> list[tuple[int, int]]:
            lag = self._lags(rs, previous)
            return [self._write_span(r, r.num_cached + a, r.num_cached + a + 1) for r, a in zip(rs, lag)]

        reqs = self.scheduler.reserve_or_preempt(reqs, spans(reqs), settle)
        if speculating:
            self.runner.mtp_catch_up(reqs)
        launched = self._launch_decode(reqs, previous)
        if launched is not None and self._tracks():  # a step ending at a multiple of the interval: its states
            interval = self.paging.track_interval
            for r, a in zip(launched.reqs, self._lags(launched.reqs, previous)):
                if (r.num_cached + a + 1) % interval == 0:
                    self._snapshot(r, r.num_cached + a + 1)
        if self.config.disable_overlap_schedule or speculating:
            if launched is not None:
                self._land(launched)
        else:
            self.in_flight = launched
            if previous is not None:
                self._land(previous)

    @staticmethod
    def _lags(reqs: list[Request], previous: InFlight | None) -> list[int]:
        """1 for a request whose last token is still on the device (in ``previous``), else 0."""
        rows = {id(r) for r in previous.reqs} if previous is not None else set()
        return [int(id(r) in rows) for r in reqs]

    def _write_span(self, r: Request, start: int, end: int) -> tuple[int, int]:
        """The positions a step writes for ``r`` (from ``start`` to ``end``), widened to the MTP rows it owes."""
        if self.runner.spec_step is not None and r.mtp_tokens:
            start = min(start, r.mtp_start)
        return start, end

    def _launch_decode(self, reqs: list[Request], previous: InFlight | None) -> InFlight | None:
        """Run the decode forward and sampling for ``reqs`` without waiting for the device. A request in the
        ``previous`` step (not yet read back) takes that step's token from the device, one position further on;
        one whose next token ends it by length is left out."""
        row_of = {id(r): i for i, r in enumerate(previous.reqs)} if previous is not None else {}
        reqs = [
            r for r in reqs if not (id(r) in row_of and ends_by_length(r, len(r.output_ids) + 1, self.context_length))
        ]
        if not reqs:
            return None
        lag = [int(id(r) in row_of) for r in reqs]  # tokens of the request still on the device
        tokens = torch.tensor([0 if a else r.pending_token for r, a in zip(reqs, lag)]).to(
            self.device, non_blocking=True
        )
        lagging = None
        if any(lag):
            source = torch.tensor([row_of.get(id(r), -1) for r in reqs]).to(self.device, non_blocking=True)
            tokens = torch.where(source >= 0, previous.tokens[source.clamp(min=0)], tokens)
            lagging = torch.where(source >= 0, tokens, -1)[:, None]  # counted by the penalties
        logits = self.runner.decode(tokens, [r.num_cached + a for r, a in zip(reqs, lag)], [r.slot for r in reqs])
        self.stats.forward_passes += 1
        penalized = sampler.penalized(reqs, logits, self.eos_ids, lagging)
        sampled = sampler.sample_batch(reqs, penalized, [len(r.output_ids) + a for r, a in zip(reqs, lag)])
        outputs = (sampled, token_logprobs(logits, sampled), *sampler.top_tensors(reqs, logits))
        pinned = self.device.type == "cuda"
        host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=pinned) for t in outputs]
        for h, t in zip(host, outputs):
            h.copy_(t, non_blocking=pinned)
        ready = torch.cuda.Event() if pinned else None
        if ready is not None:
            ready.record()
        return InFlight(reqs=reqs, tokens=sampled, host=host, ready=ready)

    def _land(self, step: InFlight) -> None:
        """Append a launched step's tokens once they are on the host; rows of requests that ended meanwhile (a
        stop token in the step before, an abort) are dropped."""
        if step.ready is not None:
            step.ready.synchronize()
        tokens, logprobs, *tops = step.host
        pairs = sampler.top_pairs(step.reqs, tops)
        for r, token, logprob, top in zip(step.reqs, tokens.tolist(), logprobs.tolist(), pairs):
            if r.finish_reason is None:
                if self.runner.spec_step is not None:  # the row of the token just run, paired with the one it gave
                    r.mtp_start, r.mtp_tokens = r.num_cached, [token]
                self._append(r, [token], [logprob], [top])

    def _decode_speculative(self, reqs: list[Request]) -> None:
        num_steps = self.config.num_spec_steps
        spans = [self._write_span(r, r.num_cached, r.num_cached + num_steps + 1) for r in reqs]
        reqs = self.scheduler.reserve_or_preempt(reqs, spans, lambda: None)
        committed = [r.num_cached for r in reqs]
        crossing = self._copy_before_crossing(reqs)
        results = self.runner.speculative_step(reqs, self.eos_ids)
        self._snapshot_crossings(reqs, crossing, committed, [num_accepted for num_accepted, *_ in results])
        self.stats.forward_passes += 1
        self.stats.verify_passes += 1
        for r, start, (num_accepted, emitted, logprobs, tops) in zip(reqs, committed, results):
            stats = SpecStats(
                draft_tokens=num_steps,
                accepted_tokens=num_accepted,
                verify_steps=1,
                verified_output_tokens=len(emitted),
            )
            r.spec.add(stats)
            self.stats.spec.add(stats)
            # the next step's MTP rows: this verify's hidden states (kept by the step) with the emitted tokens
            r.mtp_start, r.mtp_tokens = start, emitted
            self._append(r, emitted, logprobs, tops)

    def _copy_before_crossing(self, reqs: list[Request]) -> list[tuple[int, int, int]]:
        """extra_buffer: for each request whose verify may pass a multiple of the tracking interval, a copy of its
        states before the verify, in a snapshot slot: ``(row, multiple, slot)``."""
        if not self._tracks():
            return []
        interval, width, crossing = self.paging.track_interval, self.config.num_spec_steps + 1, []
        for row, r in enumerate(reqs):
            boundary = (r.num_cached // interval + 1) * interval
            if boundary <= r.num_cached + width and (slot := self.scheduler.take_snapshot_slot()) is not None:
                self.runner.copy_states(r.slot, [slot])
                crossing.append((row, boundary, slot))
        return crossing

    def _snapshot_crossings(self, reqs: list[Request], crossing, committed: list[int], accepted: list[int]) -> None:
        """After the verify: where a request's accepted tokens passed the multiple, its states there (the copy from
        before the verify stepped over the tokens up to it) wait for the prefix cache; the other copies go back."""
        passed = []
        for row, boundary, slot in crossing:
            if committed[row] + accepted[row] + 1 >= boundary:  # the committed tokens reach the multiple
                passed.append((row, boundary, slot))
            else:
                self.scheduler.radix.snapshots.release(slot)
        if passed:  # each copy stepped over the tokens up to the multiple (accepted count boundary - committed - 1)
            rows, slots = [row for row, _, _ in passed], [slot for _, _, slot in passed]
            self.runner.commit_part(rows, slots, [boundary - committed[row] - 1 for row, boundary, _ in passed])
        self._pending_snapshots += [(reqs[row], boundary, slot) for row, boundary, slot in passed]

    # appending and stopping ------------------------------------------------------------------------------

    def _append(self, r: Request, tokens: list[int], logprobs: list[float], tops: list[list]) -> None:
        """Add generated tokens until one ends the request; the last one stays pending for the next step."""
        for token, logprob, top in zip(tokens, logprobs, tops):
            r.output_ids.append(token)
            r.output_logprobs.append(logprob)
            if r.top_logprobs_num:
                r.output_top_logprobs.append(top)
            r.pending_token = token
            self.stats.generated_tokens += 1
            reason = finish_reason(r, token, self.eos_ids, self.context_length, self.tokenizer)
            if reason:
                r.finish_reason = reason
                return

    def _text(self, r: Request) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode(r.output_ids)

    # weights -------------------------------------------------------------------------------------------------

    def update_weights_from_disk(self, path: str) -> None:
        """``ModelRunner.update_weights_from_disk``: the whole checkpoint checked first, in place; the prefix cache
        (computed with the old weights) is flushed."""
        self.runner.update_weights_from_disk(path)
        self.flush_cache()

    def flush_cache(self) -> None:
        """Empty the prefix cache (its blocks and snapshots are freed once no running request holds them), and drop
        the snapshots waiting to enter it (they were computed with what is being flushed)."""
        for _, _, slot in self._pending_snapshots:
            self.scheduler.radix.snapshots.release(slot)
        self._pending_snapshots = []
        self.scheduler.flush_cache()

    def cache_metrics(self) -> dict:
        """The prefix cache and the KV pool: hit rate, tokens reused, blocks in use, preemptions."""
        sched, paging = self.scheduler, self.paging
        radix = sched.radix
        stats = radix.stats if radix is not None else None
        used = paging.num_blocks - sched.blocks.num_free
        return {
            "page_size": paging.page_size,
            "max_total_tokens": paging.num_blocks * paging.page_size,
            "blocks_total": paging.num_blocks,
            "blocks_in_use": used,
            "radix_cache": radix is not None,
            "cache_blocks": radix.num_blocks if radix is not None else 0,
            "cache_snapshots": radix.num_snapshots if radix is not None else 0,
            "cache_queries": stats.queries if stats else 0,
            "cache_hit_rate": stats.hits / stats.queries if stats and stats.queries else 0.0,
            "cache_token_hit_rate": stats.reused_tokens / stats.query_tokens if stats and stats.query_tokens else 0.0,
            "cached_tokens": stats.reused_tokens if stats else 0,
            "snapshots_taken": stats.snapshots if stats else 0,
            "evicted_blocks": stats.evicted_blocks if stats else 0,
            "preemptions": sched.preemptions,
        }

    def release_memory(self, tags: set[str], discard: set[str] = frozenset()) -> int:
        """``ModelRunner.release_memory``: free the memory of ``tags`` for a colocated trainer; returns the bytes.
        Freeing the KV cache flushes the prefix cache (its contents are lost)."""
        if "kv_cache" in tags:
            self.flush_cache()
        return self.runner.release_memory(tags, discard)

    def resume_memory(self, tags: set[str]) -> None:
        """``ModelRunner.resume_memory``: bring back what :meth:`release_memory` freed."""
        self.runner.resume_memory(tags)

    def update_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> int:
        """``ModelRunner.update_weights``: whole tensors under Hugging Face or league names, all checked before the
        first copy, in place; the prefix cache is flushed. Returns how many were copied."""
        count = self.runner.update_weights(named_tensors)
        self.flush_cache()
        return count
