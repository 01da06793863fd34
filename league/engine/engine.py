"""LLMEngine: requests in, outputs out, with continuous batching over cache slots.

Each ``step()`` runs at most one prefill forward (prompt chunks under the token budget) and one decode
forward (one token per running request, or, with speculation, a draft chain and one verify of
``num_steps + 1`` tokens per request). Finished requests leave at once and new ones take their slots. Without
speculation, a decode step's tokens are read back only after the next step is launched (the overlap schedule),
so the host's bookkeeping runs while the GPU computes; with it, a step's acceptance, state commit and log-probs
are queued on the device behind the verify and read back once.
The engine runs the same ``Transformer`` as the trainer, so a token's log-prob is computed the same way
when it is sampled and when it is trained on. Not responsible for tokenising prompts, HTTP, or threads.
"""

import itertools
import warnings
from dataclasses import dataclass, field

import torch

from league.checks import check_int, check_seed
from league.engine.cache import allocate_cache, cache_bytes_per_slot, copy_slot
from league.engine.cuda_graph import DecodeGraphs, default_batch_sizes, graphs_apply
from league.engine.request import (
    MAX_SEED,
    GenerateOutput,
    Request,
    SamplingParams,
    SpecStats,
    is_int,
    is_int_list,
    rows_by_settings,
)
from league.engine.scheduler import Scheduler
from league.engine.speculative import SpeculativeStep, accept_on_device
from league.models.qwen3_5_moe import ForwardBatch, Transformer
from league.ops.logprob import token_logprobs, top_logprobs
from league.ops.penalties import penalize, token_counts
from league.ops.sampling import filtered_probs, sample_logits, sample_rows, unfiltered


@dataclass(kw_only=True, slots=True)
class EngineConfig:
    """Engine sizes and speculative decoding. Names follow SGLang's server arguments."""

    max_running_requests: int = 64
    """Requests decoded at once; more wait for a free slot."""
    max_num_batched_tokens: int = 4096
    """Prompt tokens prefilled per step; longer prompts are prefilled in chunks."""
    admission_batch: int = 1
    """While requests are decoding, admit waiting ones only once this many fit at once (or all that wait fit).
    1 admits each as soon as a slot frees. A prefill is a forward of its own that the whole batch waits for, so when
    requests finish one by one (sampling, stop tokens, speculation) larger values make fewer, larger prefills, at
    the cost of a few steps' wait for the requests admitted together."""
    context_length: int = 4096
    """Prompt plus generated tokens a request may reach (capped by the model's max_position_embeddings)."""
    num_slots: int | None = None
    """Cache slots to allocate; default: from mem_fraction_static on a GPU, max_running_requests on CPU."""
    mem_fraction_static: float = 0.7
    """Fraction of GPU memory for weights plus cache slots."""
    speculative_algorithm: str | None = None
    """``EAGLE`` or ``NEXTN`` (both: the model's own MTP head) or None."""
    speculative_num_steps: int = 2
    """Draft tokens the MTP head proposes per verify."""
    speculative_max_batch: int | None = None
    """Speculate only in steps that decode at most this many requests; a step over more decodes one token a request
    without drafts (an RL rollout's large first steps run best without, its long tail with them). Those steps feed
    the MTP layer each new token, so drafting resumes with its whole context, and run without the overlap schedule.
    A seeded request's tokens then depend on which of its steps speculated, and so on the batch. Default: every
    step speculates."""
    speculative_eagle_topk: int = 1
    """Branching of the draft tree; league drafts chains (1)."""
    speculative_num_draft_tokens: int | None = None
    """Tokens per verify: must be speculative_num_steps + 1 (the default)."""
    random_seed: int = 0
    """Seeds the engine's choice of a seed for each request that brings none."""
    batch_invariant: bool = False
    """Compute every token independently of the rest of the batch (row-wise matmuls, step-by-step GDN), so
    sampled log-probs equal the trainer's bitwise and never depend on batch composition. Slower."""
    decode_parity: bool = False
    """Prefill computes the token mixers as decode does (the recurrent GDN kernel, the decode attention kernel), so
    that a trainer run with ``decode_parity`` (as ``league train`` runs its trainer when this is set) recomputes the
    log-probs the engine sampled with; see ``ForwardBatch.decode_parity``. Needs ``mamba_ssm_dtype`` float32.
    Slower prefill and training forward."""
    cuda_graph_bs: list[int] | None = None
    """Batch sizes of captured CUDA-graph decode steps (or draft-and-verify steps, with speculation). Default: 1, 2,
    4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256 up to max_running_requests (which is always one). Graphs
    serve a bf16 model on a Hopper/Blackwell GPU, without batch_invariant."""
    disable_cuda_graph: bool = False
    """Launch decode kernels one by one instead of replaying captured graphs."""
    disable_overlap_schedule: bool = False
    """Turn off the overlap schedule. With it (the default), each decode step's tokens are read back only after the
    next step is launched, so the GPU runs step k + 1 while the host appends step k's tokens, checks stops and
    schedules (a request that stops on a token of step k has already run one more row in step k + 1, which is
    dropped; a request that will reach its length limit does not). Without speculation only; the tokens are the
    same either way."""
    mamba_ssm_dtype: str = "float32"
    """dtype of the cached GDN recurrent states, ``float32`` or ``bfloat16`` (half the state memory and traffic;
    the recurrence still computes in fp32). With bfloat16, decode rounds the state after every token but verify
    once per verify, so speculative and plain greedy decoding may differ slightly."""

    def __post_init__(self) -> None:
        for name in ("max_running_requests", "max_num_batched_tokens", "context_length", "admission_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        if self.mamba_ssm_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"`mamba_ssm_dtype` {self.mamba_ssm_dtype!r}: expected float32 or bfloat16")
        if self.batch_invariant and self.mamba_ssm_dtype != "float32":
            raise ValueError("`batch_invariant` needs `mamba_ssm_dtype` float32 (the trainer keeps fp32 states)")
        if self.decode_parity and self.mamba_ssm_dtype != "float32":
            raise ValueError("`decode_parity` needs `mamba_ssm_dtype` float32 (the trainer keeps fp32 states)")
        if self.decode_parity and self.batch_invariant:
            raise ValueError("`decode_parity` and `batch_invariant` are two exact modes; choose one")
        if not 0 < self.mem_fraction_static <= 1:
            raise ValueError(f"`mem_fraction_static` must be in (0, 1], got {self.mem_fraction_static}")
        if self.speculative_max_batch is not None and self.speculative_max_batch < 1:
            raise ValueError(f"`speculative_max_batch` must be >= 1, got {self.speculative_max_batch}")
        if self.num_slots is not None:
            check_int("num_slots", self.num_slots, 1)
        check_seed("random_seed", self.random_seed)
        check_int("speculative_num_steps", self.speculative_num_steps, 1)
        if self.cuda_graph_bs is not None and (not self.cuda_graph_bs or min(self.cuda_graph_bs) < 1):
            raise ValueError(f"`cuda_graph_bs` must be batch sizes >= 1, got {self.cuda_graph_bs}")
        if self.speculative_algorithm is not None:
            if self.speculative_algorithm.upper() not in ("EAGLE", "NEXTN", "MTP"):
                raise ValueError(
                    f"`speculative_algorithm` {self.speculative_algorithm!r}: expected EAGLE, NEXTN or None"
                )
            if self.speculative_eagle_topk != 1:
                raise ValueError(f"`speculative_eagle_topk` {self.speculative_eagle_topk}: league drafts chains (1)")
            expected = self.speculative_num_steps + 1
            if self.speculative_num_draft_tokens not in (None, expected):
                raise ValueError(
                    f"`speculative_num_draft_tokens` ({self.speculative_num_draft_tokens}) must be "
                    f"speculative_num_steps + 1 ({expected}) with topk 1"
                )

    @property
    def num_spec_steps(self) -> int:
        return self.speculative_num_steps if self.speculative_algorithm else 0


@dataclass(kw_only=True, slots=True)
class InFlight:
    """A decode step launched and not yet read back: its requests in row order, their sampled tokens on the device
    (the inputs of the next step), and host copies of the tokens and log-probs, complete once ``ready`` has
    passed (None: already complete)."""

    reqs: list[Request]
    tokens: torch.Tensor
    host_tokens: torch.Tensor
    host_logprobs: torch.Tensor
    host_tops: list[torch.Tensor]
    """Host copies of the top log-probs and their token ids, when a request asked for them (else empty)."""
    ready: torch.cuda.Event | None


@dataclass(kw_only=True, slots=True)
class EngineStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    forward_passes: int = 0
    prefill_passes: int = 0
    """Forward passes that prefilled prompt chunks (the rest decoded or verified)."""
    verify_passes: int = 0
    """Forward passes that verified drafts (speculative steps)."""
    spec: SpecStats = field(default_factory=SpecStats)


class LLMEngine:
    """Generation over one model with preallocated cache slots.

    Args:
        model (Transformer): the model, read in place (colocated with a trainer, nothing is copied).
        config (EngineConfig): sizes and speculative decoding.
        tokenizer (Optional): for stop strings and output text. Default: None.
    """

    def __init__(self, model: Transformer, config: EngineConfig | None = None, tokenizer=None):
        self.model, self.config, self.tokenizer = model, config or EngineConfig(), tokenizer
        self.args = model.args
        if self.config.num_spec_steps and model.mtp is None:
            raise ValueError("speculative decoding needs the model's MTP head (mtp_num_hidden_layers >= 1)")
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.context_length = min(self.config.context_length, self.args.max_position_embeddings)
        self.state_dtype = getattr(torch, self.config.mamba_ssm_dtype)
        self.use_graphs = graphs_apply(self.config, self.device, self.dtype)
        if self.device.type == "cuda":  # each group of projections of one input as one GEMM
            model.join_projections()
        if self.config.cuda_graph_bs and not self.use_graphs:
            warnings.warn(
                "cuda_graph_bs is ignored: CUDA graphs serve a bf16 model on a Hopper or Blackwell GPU, "
                "without batch_invariant",
                stacklevel=2,
            )
        self.graphs: DecodeGraphs | None = None  # captured at the first decode
        slot_len = self.context_length + self.config.num_spec_steps + 1
        num_slots = self.config.num_slots or self._slots_that_fit(slot_len)
        steps = self.config.num_spec_steps + 1 if self.config.num_spec_steps else 0
        self.cache = allocate_cache(
            self.args,
            num_slots + self.use_graphs,  # the last slot takes the padding rows of captured batches
            slot_len,
            self.dtype,
            self.device,
            max_rows=self.config.max_running_requests if steps else 0,
            max_steps=steps,
            state_dtype=self.state_dtype,
        )
        self.scheduler = Scheduler(
            num_slots=num_slots,
            max_running=self.config.max_running_requests,
            token_budget=self.config.max_num_batched_tokens,
            admission_batch=self.config.admission_batch,
        )
        self.eos_ids = set(self.args.eos_token_id)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            self.eos_ids.add(tokenizer.eos_token_id)
        self.num_slots, self.slot_len = num_slots, slot_len
        self.spec_step = (
            SpeculativeStep(
                model,
                self.cache,
                self.config.num_spec_steps,
                num_slots + self.use_graphs,
                self.config.max_running_requests,
                self.config.batch_invariant,
                self.config.decode_parity,
            )
            if self.config.num_spec_steps
            else None
        )
        self.stats = EngineStats()
        self.in_flight: InFlight | None = None
        self._seeds = torch.Generator().manual_seed(self.config.random_seed)
        self._ids = itertools.count()

    def _slots_that_fit(self, slot_len: int) -> int:
        if self.device.type != "cuda":
            return self.config.max_running_requests
        free, total = torch.cuda.mem_get_info(self.device)
        budget = total * self.config.mem_fraction_static - (total - free)
        per_slot = cache_bytes_per_slot(self.args, slot_len, self.dtype, self.state_dtype)
        fit = int(budget // per_slot) - self.use_graphs  # the scratch slot of captured batches
        if fit < 1:
            raise ValueError(
                f"mem_fraction_static {self.config.mem_fraction_static} leaves no room for one cache "
                f"slot of {per_slot / 2**20:.0f} MiB (context_length {self.context_length})"
            )
        return min(fit, self.config.max_running_requests)

    # requests ---------------------------------------------------------------------------------------

    def add_request(
        self,
        prompt_ids: list[int],
        params: SamplingParams | None = None,
        n: int = 1,
        rid: str | None = None,
        top_logprobs_num: int = 0,
        logprob_start_len: int = -1,
    ) -> list[str]:
        """Queue a prompt; returns the ids of its ``n`` samples (``rid`` or a generated id, ``-i`` suffixed
        when n > 1). Sample i of a seeded request uses seed ``seed + i``. ``top_logprobs_num`` keeps that many most
        likely tokens at each position whose log-prob is returned; ``logprob_start_len`` >= 0 also returns the
        log-probs of the prompt's tokens from that position on."""
        params = params or SamplingParams()
        if not isinstance(prompt_ids, list) or not prompt_ids:
            raise ValueError(f"input_ids must be a non-empty list of token ids, got {prompt_ids!r:.100}")
        if not is_int_list(prompt_ids, 0, self.args.vocab_size):
            bad = [t for t in prompt_ids if not is_int_list([t], 0, self.args.vocab_size)]
            raise ValueError(f"input_ids must hold integer token ids in [0, {self.args.vocab_size}), got {bad[:5]}")
        if len(prompt_ids) >= self.context_length:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the context length is {self.context_length}")
        if not is_int(n) or n < 1:
            raise ValueError(f"n must be an integer >= 1, got {n!r}")
        if not is_int(top_logprobs_num) or not 0 <= top_logprobs_num <= self.args.vocab_size:
            raise ValueError(
                f"top_logprobs_num must be an integer in [0, {self.args.vocab_size}], got {top_logprobs_num!r}"
            )
        if not is_int(logprob_start_len) or not -1 <= logprob_start_len < len(prompt_ids):
            raise ValueError(
                f"logprob_start_len must be -1 or a prompt position in [0, {len(prompt_ids)}), "
                f"got {logprob_start_len!r}"
            )
        if any(t >= self.args.vocab_size for t in params.logit_bias):
            raise ValueError(f"sampling_params.logit_bias has token ids outside [0, {self.args.vocab_size})")
        if params.seed is not None and params.seed + n - 1 > MAX_SEED:
            raise ValueError(
                f"sampling_params.seed ({params.seed}) + n - 1 must be <= {MAX_SEED} (sample i uses seed + i)"
            )
        if n > self.scheduler.max_running or n > self.scheduler.pool.num_slots:
            raise ValueError(f"n ({n}) exceeds max_running_requests / cache slots ({self.scheduler.max_running})")
        base = rid if rid is not None else f"req-{next(self._ids)}"
        members = []
        for i in range(n):
            seed = (
                params.seed + i if params.seed is not None else int(torch.randint(2**62, (1,), generator=self._seeds))
            )
            members.append(
                Request(
                    rid=base if n == 1 else f"{base}-{i}",
                    prompt_ids=list(prompt_ids),
                    params=params,
                    seed=seed,
                    top_logprobs_num=top_logprobs_num,
                    logprob_start_len=logprob_start_len,
                )
            )
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
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None, n: int = 1
    ) -> list[GenerateOutput]:
        """Generate for every prompt (n samples each, consecutive in the result)."""
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        order = [rid for p, sp in zip(prompts, params_list) for rid in self.add_request(p, sp, n=n)]
        done: dict[str, GenerateOutput] = {}
        while len(done) < len(order):
            for out in self.step():
                done[out.rid] = out
        return [done[rid] for rid in order]

    # one step -------------------------------------------------------------------------------------------

    def step(self) -> list[GenerateOutput]:
        """Admit, prefill a budget of prompt tokens, decode every running request once; return finished ones."""
        with torch.no_grad():
            plan = self.scheduler.schedule()
            if plan.prefill:
                self._prefill(plan.prefill)
            decoding = [r for r in self.scheduler.running if r.finish_reason is None and r.pending_token is not None]
            if decoding and self._speculates(len(decoding)):
                self._decode_speculative(decoding)
            elif decoding or self.in_flight is not None:
                self._decode(decoding)
        return [r.to_output(self._text(r)) for r in self.scheduler.collect_finished()]

    def _speculates(self, batch: int) -> bool:
        limit = self.config.speculative_max_batch
        return bool(self.config.num_spec_steps) and (limit is None or batch <= limit)

    def _prefill(self, chunks: list[tuple[Request, int, int]]) -> None:
        tokens = torch.tensor([t for r, s, e in chunks for t in r.prompt_ids[s:e]], device=self.device)
        batch = ForwardBatch.packed(
            batch_invariant=self.config.batch_invariant,
            decode_parity=self.config.decode_parity,
            seq_lens=[e - s for _, s, e in chunks],
            device=self.device,
            cache_lens=[s for _, s, _ in chunks],
            slots=[r.slot for r, _, _ in chunks],
        )
        hidden = self.model(tokens, batch, self.cache)
        self.stats.forward_passes += 1
        self.stats.prefill_passes += 1
        if any(r.logprob_start_len >= 0 for r, _, _ in chunks):
            self._input_logprobs(chunks, hidden, batch)
        if self.config.num_spec_steps:
            self._mtp_extend_prompt(chunks, hidden, batch)
        finishing = [(r, end) for (r, _, e), (_, _, end) in zip(chunks, batch.sequences()) if e == len(r.prompt_ids)]
        if not finishing:
            for r, _, e in chunks:
                r.num_prefilled = e
            return
        logits = self._logits(hidden[[end - 1 for _, end in finishing]])
        for r, _, e in chunks:
            r.num_prefilled = e
        for (leader, end), row in zip(finishing, logits):
            for member in leader.group:
                if member.params.max_new_tokens == 0 or member.finish_reason is not None:
                    member.finish_reason = member.finish_reason or "length"
                    continue
                if member is not leader:
                    member.num_prefilled = leader.num_prefilled
                    copy_slot(self.cache, leader.slot, [member.slot], len(leader.prompt_ids))
                token = self._sample(member, row)
                if self.spec_step is not None:  # the MTP row of the last prompt position runs in the next step
                    self.spec_step.hidden[member.slot, 0] = hidden[end - 1]
                    member.mtp_start, member.mtp_tokens = len(leader.prompt_ids) - 1, [token]
                logprob = token_logprobs(row[None], torch.tensor([token], device=self.device))
                self._append(member, [token], logprob.tolist(), self._tops([member], row[None]))

    def _input_logprobs(self, chunks, hidden: torch.Tensor, batch: ForwardBatch) -> None:
        """The log-probs of the prompt tokens that requests asked for (from ``logprob_start_len`` on): the token at
        position q is scored by the row of position q - 1; the first prompt token has none (None)."""
        rows, targets, owners = [], [], []
        for (r, s, e), (_, start, _end) in zip(chunks, batch.sequences()):
            if r.logprob_start_len < 0:
                continue
            if r.logprob_start_len == 0 and s == 0:
                r.input_logprobs.append(None)
                r.input_top_logprobs.append(None)
            lo, hi = max(s, r.logprob_start_len - 1, 0), min(e, len(r.prompt_ids) - 1)
            if hi > lo:
                rows.extend(range(start + lo - s, start + hi - s))
                targets.extend(r.prompt_ids[lo + 1 : hi + 1])
                owners.append((r, hi - lo))
        if not rows:
            return
        logits = self._logits(hidden[rows])
        logprobs = token_logprobs(logits, torch.tensor(targets, device=self.device)).tolist()
        tops = self._tops([r for r, count in owners for _ in range(count)], logits)
        for r, count in owners:
            r.input_logprobs.extend(logprobs[:count])
            r.input_top_logprobs.extend(tops[:count])
            logprobs, tops = logprobs[count:], tops[count:]

    def _tops(self, reqs: list[Request], logits_RV: torch.Tensor) -> list[list[tuple[float, int]]]:
        """Row i's ``reqs[i].top_logprobs_num`` most likely ``(log-prob, token)``, read back now (empty lists when
        no request asks)."""
        k = max((r.top_logprobs_num for r in reqs), default=0)
        if k == 0:
            return [[] for _ in reqs]
        values, ids = top_logprobs(logits_RV, k)
        return _pairs(values.tolist(), ids.tolist(), [r.top_logprobs_num for r in reqs])

    def _mtp_extend_prompt(self, chunks, hidden: torch.Tensor, batch: ForwardBatch) -> None:
        """MTP rows for prompt positions whose next token is known (all but the last prompt position)."""
        rows, tokens, lens, starts, slots = [], [], [], [], []
        for (r, s, e), (_, start, _end) in zip(chunks, batch.sequences()):
            known_end = min(e, len(r.prompt_ids) - 1)
            if known_end <= s:
                continue
            rows.append(hidden[start : start + known_end - s])
            tokens.extend(r.prompt_ids[s + 1 : known_end + 1])
            lens.append(known_end - s)
            starts.append(s)
            slots.append(r.slot)
        if rows:
            self._mtp_forward(torch.cat(rows), tokens, lens, starts, slots)

    def _mtp_forward(self, hidden: torch.Tensor, tokens: list[int], lens: list[int], starts: list[int], slots) -> None:
        """The MTP layer over rows of several requests (``lens[i]`` rows from position ``starts[i]`` in slot
        ``slots[i]``, row j pairing the trunk's hidden state at j with the token after it), for the keys and values
        it caches; its outputs are not needed."""
        batch = ForwardBatch.packed(
            batch_invariant=self.config.batch_invariant,
            decode_parity=self.config.decode_parity,
            seq_lens=lens,
            device=self.device,
            cache_lens=starts,
            slots=slots,
        )
        self.model.mtp_forward(hidden, torch.tensor(tokens, device=self.device), batch, self.cache)

    def _mtp_catch_up(self, reqs: list[Request]) -> None:
        """Before a step without drafts in a speculating engine: the MTP rows each request still owes (those of the
        last verify, prefill or step), from the trunk's hidden states kept in the speculative step's buffer."""
        owing = [r for r in reqs if r.mtp_tokens]
        if not owing:
            return
        hidden = torch.cat([self.spec_step.hidden[r.slot, : len(r.mtp_tokens)] for r in owing])
        tokens = [t for r in owing for t in r.mtp_tokens]
        self._mtp_forward(
            hidden, tokens, [len(r.mtp_tokens) for r in owing], [r.mtp_start for r in owing], [r.slot for r in owing]
        )
        for r in owing:
            r.mtp_tokens = []

    def _decode(self, reqs: list[Request]) -> None:
        """Decode one token for each of ``reqs``; with the overlap schedule, read back the previous step's tokens
        after this step is launched, and this step's in the next call. In a speculating engine (a step over
        ``speculative_max_batch``), the MTP layer first takes the rows the requests owe, each request's new row
        waits in the speculative step's buffer (as after prefill), and the step is read back at once."""
        previous, self.in_flight = self.in_flight, None
        if self.spec_step is not None:
            self._mtp_catch_up(reqs)
        launched = self._launch_decode(reqs, previous)
        if self.config.disable_overlap_schedule or self.spec_step is not None:
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
        reqs = [r for r in reqs if not (id(r) in row_of and self._ends_by_length(r, len(r.output_ids) + 1))]
        if not reqs:
            return None
        lag = [int(id(r) in row_of) for r in reqs]  # tokens of the request still on the device
        positions = [r.num_cached + a for r, a in zip(reqs, lag)]
        slots = [r.slot for r in reqs]
        tokens = torch.tensor([0 if a else r.pending_token for r, a in zip(reqs, lag)]).to(
            self.device, non_blocking=True
        )
        if any(lag):
            source = torch.tensor([row_of.get(id(r), -1) for r in reqs]).to(self.device, non_blocking=True)
            tokens = torch.where(source >= 0, previous.tokens[source.clamp(min=0)], tokens)
        if self.use_graphs and self.graphs is None:
            sizes = self.config.cuda_graph_bs or default_batch_sizes(self.config.max_running_requests)
            self.graphs = DecodeGraphs(
                self.model, self.cache, sizes, scratch_slot=self.num_slots, decode_parity=self.config.decode_parity
            )
        if self.graphs is not None and self.graphs.fits(len(reqs)):
            logits, hidden = self.graphs.run(tokens, positions, slots)
        else:
            batch = ForwardBatch.packed(
                batch_invariant=self.config.batch_invariant,
                decode_parity=self.config.decode_parity,
                seq_lens=[1] * len(reqs),
                device=self.device,
                cache_lens=positions,
                slots=slots,
            )
            hidden = self.model(tokens, batch, self.cache)
            logits = self._logits(hidden)
        self.stats.forward_passes += 1
        if self.spec_step is not None:  # each request's new MTP row: the trunk's hidden state at its new token
            self.spec_step.hidden[torch.tensor(slots, device=self.device), 0] = hidden
        lagging = None
        if any(lag) and any(r.params.penalized for r in reqs):  # the penalties count the tokens still on the device
            lagging = torch.where(source >= 0, previous.tokens[source.clamp(min=0)], -1)[:, None]
        sampled = self._sample_batch(
            reqs, self._penalized(reqs, logits, lagging), [len(r.output_ids) + a for r, a in zip(reqs, lag)]
        )
        logprobs = token_logprobs(logits, sampled)
        k = max(r.top_logprobs_num for r in reqs)
        tops = top_logprobs(logits, k) if k else ()
        pinned = self.device.type == "cuda"
        host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=pinned) for t in (sampled, logprobs, *tops)]
        for h, t in zip(host, (sampled, logprobs, *tops)):
            h.copy_(t, non_blocking=pinned)
        ready = None
        if pinned:
            ready = torch.cuda.Event()
            ready.record()
        return InFlight(
            reqs=reqs, tokens=sampled, host_tokens=host[0], host_logprobs=host[1], host_tops=host[2:], ready=ready
        )

    def _land(self, step: InFlight) -> None:
        """Append a launched step's tokens once they are on the host; rows of requests that ended meanwhile (a
        stop token in the step before, an abort) are dropped."""
        if step.ready is not None:
            step.ready.synchronize()
        tops = (
            _pairs(*(t.tolist() for t in step.host_tops), [r.top_logprobs_num for r in step.reqs])
            if step.host_tops
            else [[] for _ in step.reqs]
        )
        for r, token, logprob, top in zip(step.reqs, step.host_tokens.tolist(), step.host_logprobs.tolist(), tops):
            if r.finish_reason is None:
                if self.spec_step is not None:  # the row of the token just run, paired with the one it gave
                    r.mtp_start, r.mtp_tokens = r.num_cached, [token]
                self._append(r, [token], [logprob], [top])

    def _decode_speculative(self, reqs: list[Request]) -> None:
        num_steps, step = self.config.num_spec_steps, self.spec_step
        if self.use_graphs and not step.graphs:
            sizes = self.config.cuda_graph_bs or default_batch_sizes(self.config.max_running_requests)
            step.capture([s for s in sizes if s <= step.max_rows], scratch_slot=self.num_slots)
        committed, slots = [r.num_cached for r in reqs], [r.slot for r in reqs]
        drafts_BN, logits = step.run(
            slots,
            [r.mtp_start for r in reqs],
            [r.mtp_tokens for r in reqs],
            scratch_slot=self.num_slots if self.use_graphs else None,
        )
        self.stats.forward_passes += 1
        self.stats.verify_passes += 1
        # acceptance, the states' commit and the emitted tokens' log-probs all queued on the device, then one read
        accepted_B, bonus_B = accept_on_device(
            self._penalized_verify(reqs, logits, drafts_BN),
            drafts_BN,
            [r.params for r in reqs],
            [r.seed for r in reqs],
            [len(r.output_ids) for r in reqs],
        )
        slots_B = torch.tensor(slots).to(self.device, non_blocking=True)
        self.model.commit_verified(self.cache, slots_B, accepted_B, self.config.batch_invariant)
        # emitted token t of request i: draft t while t < accepted_i, the bonus at t == accepted_i (and past it,
        # where nothing is emitted)
        steps = torch.arange(num_steps + 1, device=self.device)
        candidates = torch.cat([drafts_BN, bonus_B[:, None]], dim=1)
        emitted_BN1 = torch.where(steps < accepted_B[:, None], candidates, bonus_B[:, None])
        logprobs_BN1 = token_logprobs(logits.reshape(-1, logits.shape[-1]), emitted_BN1.flatten())
        rows = torch.cat([accepted_B[:, None], emitted_BN1], dim=1).tolist()  # the step's one wait
        logprob_rows = logprobs_BN1.view(len(reqs), num_steps + 1).tolist()
        verify_rows = [r for r in reqs for _ in range(num_steps + 1)]
        tops = self._tops(verify_rows, logits.reshape(-1, logits.shape[-1]))
        for i, (r, (num_accepted, *tokens)) in enumerate(zip(reqs, rows)):
            emitted = tokens[: num_accepted + 1]
            stats = SpecStats(
                draft_tokens=num_steps,
                accepted_tokens=num_accepted,
                verify_steps=1,
                verified_output_tokens=len(emitted),
            )
            r.spec.add(stats)
            self.stats.spec.add(stats)
            # the next step's MTP rows: this verify's hidden states (kept by the step) with the emitted tokens
            r.mtp_start, r.mtp_tokens = committed[i], emitted
            row_tops = tops[i * (num_steps + 1) : i * (num_steps + 1) + num_accepted + 1]
            self._append(r, emitted, logprob_rows[i][: num_accepted + 1], row_tops)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.logits(hidden, self.config.batch_invariant)

    # sampling and stopping ----------------------------------------------------------------------------------

    def _sample(self, r: Request, logits_V: torch.Tensor) -> int:
        return int(self._sample_batch([r], self._penalized([r], logits_V[None]), [len(r.output_ids)])[0])

    def _penalized(self, reqs: list[Request], logits_RV: torch.Tensor, extra_RK: torch.Tensor | None = None):
        """``logits_RV`` with the sampling penalties of the requests that ask for them applied to their rows (fp32;
        unchanged when none does). Row i belongs to ``reqs[i]``, whose output so far is its ``output_ids`` followed
        by the tokens of ``extra_RK[i]`` that are >= 0 (still on the device, or drafts before a verify position)."""
        rows = [i for i, r in enumerate(reqs) if r.params.penalized]
        if not rows:
            return logits_RV
        device, vocab = logits_RV.device, logits_RV.shape[-1]

        def padded(lists: list[list[int]]) -> torch.Tensor:
            width = max(1, max(len(x) for x in lists))
            return torch.tensor([x + [-1] * (width - len(x)) for x in lists], dtype=torch.long).to(device)

        chosen = [reqs[i] for i in rows]
        index = torch.tensor(rows, device=device)
        outputs = padded([r.output_ids for r in chosen])
        if extra_RK is not None:
            outputs = torch.cat([outputs, extra_RK[index]], dim=1)
        counts = token_counts(outputs, vocab)
        seen = (counts > 0) | (token_counts(padded([r.prompt_ids for r in chosen]), vocab) > 0)
        stops = padded(
            [r.params.stop_token_ids + ([] if r.params.ignore_eos else sorted(self.eos_ids)) for r in chosen]
        )
        num_out = (outputs >= 0).sum(1)
        early = num_out < torch.tensor([r.params.min_new_tokens for r in chosen], device=device)
        banned = (token_counts(stops, vocab) > 0) & early[:, None]
        values = torch.tensor(
            [[r.params.frequency_penalty, r.params.presence_penalty, r.params.repetition_penalty] for r in chosen],
            dtype=torch.float32,
        ).to(device)
        bias = None
        if any(r.params.logit_bias for r in chosen):
            bias = torch.zeros(len(chosen), vocab, dtype=torch.float32)
            for i, r in enumerate(chosen):
                bias[i, list(r.params.logit_bias)] = torch.tensor(
                    list(r.params.logit_bias.values()), dtype=torch.float32
                )
            bias = bias.to(device)
        logits = logits_RV.float()  # a copy in fp32: the raw logits stay for the log-probs
        logits[index] = penalize(logits[index], counts, seen, banned, *values.unbind(1), bias)
        return logits

    def _penalized_verify(self, reqs: list[Request], logits_BNV: torch.Tensor, drafts_BN: torch.Tensor):
        """:meth:`_penalized` for a verify: row t of a request counts its drafts before t as output."""
        if not any(r.params.penalized for r in reqs):
            return logits_BNV
        batch, width = logits_BNV.shape[:2]
        before_NN = (
            torch.arange(width - 1, device=drafts_BN.device)[None, :]
            < torch.arange(width, device=drafts_BN.device)[:, None]
        )
        extra = torch.where(before_NN[None], drafts_BN[:, None, :], -1).flatten(0, 1)
        rows = [r for r in reqs for _ in range(width)]
        return self._penalized(rows, logits_BNV.flatten(0, 1), extra).view(batch, width, -1)

    def _sample_batch(self, reqs: list[Request], logits_BV: torch.Tensor, out_positions: list[int]) -> torch.Tensor:
        """One token per row, ``[B]`` on the device: argmax for greedy requests; rows sharing sampling settings
        are drawn together, each with its request's seed at its output position ``out_positions[i]`` (so a row's token
        does not depend on the batch)."""
        groups = rows_by_settings([r.params for r in reqs])
        if None in groups:
            tokens = logits_BV.argmax(-1)
        else:  # no greedy row: skip a pass over the logits
            tokens = torch.empty(logits_BV.shape[0], dtype=torch.long, device=logits_BV.device)
        for settings, rows in groups.items():
            if settings is None:  # greedy rows keep the argmax
                continue
            index = slice(None) if len(rows) == len(reqs) else torch.tensor(rows, device=logits_BV.device)
            host = torch.tensor([[reqs[i].seed for i in rows], [out_positions[i] for i in rows]])
            seeds, positions = host.to(logits_BV.device, non_blocking=True).unbind(0)
            if unfiltered(*settings):
                tokens[index] = sample_logits(logits_BV[index], settings[0], seeds, positions)[0]
            else:
                tokens[index] = sample_rows(filtered_probs(logits_BV[index], *settings), seeds, positions)
        return tokens

    def _append(self, r: Request, tokens: list[int], logprobs: list[float], tops: list[list]) -> None:
        """Add generated tokens until one ends the request; the last one stays pending for the next step."""
        for token, logprob, top in zip(tokens, logprobs, tops):
            r.output_ids.append(token)
            r.output_logprobs.append(logprob)
            if r.top_logprobs_num:
                r.output_top_logprobs.append(top)
            r.pending_token = token
            self.stats.generated_tokens += 1
            reason = self._finish_reason(r, token)
            if reason:
                r.finish_reason = reason
                return

    def _ends_by_length(self, r: Request, num_output: int) -> bool:
        """Whether ``num_output`` generated tokens reach the request's max_new_tokens or the context length."""
        return num_output >= r.params.max_new_tokens or len(r.prompt_ids) + num_output >= self.context_length

    def _finish_reason(self, r: Request, token: int) -> str | None:
        p = r.params
        if (token in self.eos_ids and not p.ignore_eos) or token in p.stop_token_ids:
            return "stop"
        if len(r.output_ids) < p.min_new_tokens:
            return "length" if self._ends_by_length(r, len(r.output_ids)) else None
        if p.stop and self.tokenizer is not None:
            text = self.tokenizer.decode(r.output_ids)
            if any(s in text for s in p.stop):
                return "stop"
        if self._ends_by_length(r, len(r.output_ids)):
            return "length"
        return None

    def _text(self, r: Request) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode(r.output_ids)

    # weights -------------------------------------------------------------------------------------------------

    def update_weights_from_disk(self, path: str) -> None:
        """Load a Hugging Face checkpoint folder into the model in place (trunk and MTP head). The whole checkpoint
        is checked against the running model first (architecture, tensor names, shapes, dtypes): on a mismatch
        nothing changes and the ValueError names the first differences."""
        from league.checkpoint.hf import load_hf_weights

        load_hf_weights(self.model, path, strict=True)

    def update_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        """Copy tensors given under league parameter names into the model in place. All are checked (names,
        shapes, floating-point dtypes) before the first copy, so a bad update changes nothing."""
        params = dict(self.model.named_parameters())
        for name, tensor in named_tensors:
            if name not in params:
                raise ValueError(f"update_weights: no parameter named {name!r}")
            if params[name].shape != tensor.shape:
                raise ValueError(
                    f"update_weights: {name} has shape {tuple(params[name].shape)}, got {tuple(tensor.shape)}"
                )
            if not tensor.is_floating_point():
                raise ValueError(f"update_weights: {name} has dtype {tensor.dtype}; a floating-point tensor is needed")
        with torch.no_grad():
            for name, tensor in named_tensors:
                params[name].copy_(tensor)


def _pairs(values: list[list[float]], ids: list[list[int]], counts: list[int]) -> list[list[tuple[float, int]]]:
    """Row i's first ``counts[i]`` ``(log-prob, token id)`` pairs."""
    return [list(zip(v[:k], t[:k])) for v, t, k in zip(values, ids, counts)]
