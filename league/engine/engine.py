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
from league.engine.scheduler import Scheduler
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
        self.scheduler = Scheduler(
            num_slots=self.runner.num_slots,
            max_running=self.config.max_running_requests,
            token_budget=self.config.max_num_batched_tokens,
            admission_batch=self.config.admission_batch,
        )
        self.eos_ids = set(self.args.eos_token_id)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            self.eos_ids.add(tokenizer.eos_token_id)
        self.stats = EngineStats()
        self.in_flight: InFlight | None = None
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
            decoding = [r for r in self.scheduler.running if r.finish_reason is None and r.pending_token is not None]
            limit = self.config.speculative_max_batch
            if decoding and self.runner.spec_step is not None and (limit is None or len(decoding) <= limit):
                self._decode_speculative(decoding)
            elif decoding or self.in_flight is not None:
                self._decode(decoding)
        self.runner.keep_routes(r for r in self.scheduler.running if r.finish_reason is not None)  # slots still held
        return [r.to_output(self._text(r)) for r in self.scheduler.collect_finished()]

    def _prefill(self, chunks: list[tuple[Request, int, int]]) -> None:
        hidden, batch = self.runner.prefill(chunks)
        self.stats.forward_passes += 1
        self.stats.prefill_passes += 1
        if any(r.logprob_start_len >= 0 for r, _, _ in chunks):
            self.runner.prompt_logprobs(chunks, hidden, batch.sequences())
        for r, _, e in chunks:
            r.num_prefilled = e
        finishing = [(r, end) for (r, _, e), (_, _, end) in zip(chunks, batch.sequences()) if e == len(r.prompt_ids)]
        if not finishing:
            return
        logits = self.runner.logits(hidden[[end - 1 for _, end in finishing]])
        for (leader, end), row in zip(finishing, logits):
            for member in leader.group:
                if member.params.max_new_tokens == 0 or member.finish_reason is not None:
                    member.finish_reason = member.finish_reason or "length"
                    continue
                member.num_prefilled = leader.num_prefilled
                penalized = sampler.penalized([member], row[None], self.eos_ids)
                token = int(sampler.sample_batch([member], penalized, [0])[0])
                self.runner.start_sample(leader, member, hidden[end - 1], token)
                logprob = token_logprobs(row[None], torch.tensor([token], device=self.device))
                tops = sampler.top_pairs([member], sampler.top_tensors([member], row[None]))
                self._append(member, [token], logprob.tolist(), tops)

    def _decode(self, reqs: list[Request]) -> None:
        """Decode one token for each of ``reqs``; with the overlap schedule, read back the previous step's tokens
        after this step is launched, and this step's in the next call. In a speculating engine (a step over
        ``speculative_max_batch``), the MTP layer first takes the rows the requests owe and the step is read back at
        once."""
        previous, self.in_flight = self.in_flight, None
        speculating = self.runner.spec_step is not None
        if speculating:
            self.runner.mtp_catch_up(reqs)
        launched = self._launch_decode(reqs, previous)
        if self.config.disable_overlap_schedule or speculating:
            if launched is not None:
                self._land(launched)
            return
        self.in_flight = launched
        if previous is not None:
            self._land(previous)

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
        num_steps, committed = self.config.num_spec_steps, [r.num_cached for r in reqs]
        results = self.runner.speculative_step(reqs, self.eos_ids)
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
        """``ModelRunner.update_weights_from_disk``: the whole checkpoint checked first, in place."""
        self.runner.update_weights_from_disk(path)

    def release_memory(self, tags: set[str], discard: set[str] = frozenset()) -> int:
        """``ModelRunner.release_memory``: free the memory of ``tags`` for a colocated trainer; returns the bytes."""
        return self.runner.release_memory(tags, discard)

    def resume_memory(self, tags: set[str]) -> None:
        """``ModelRunner.resume_memory``: bring back what :meth:`release_memory` freed."""
        self.runner.resume_memory(tags)

    def update_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> int:
        """``ModelRunner.update_weights``: whole tensors under Hugging Face or league names, all checked before the
        first copy, in place. Returns how many were copied."""
        return self.runner.update_weights(named_tensors)
