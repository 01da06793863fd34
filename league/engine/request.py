"""What a generation request is: its sampling parameters, its state in the engine, and its output.

Not responsible for scheduling or for the model.
"""

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from league.checks import SEED_MAX as MAX_SEED

SEED_RANGE = f"an integer in [0, {MAX_SEED}] (a 64-bit seed)"


def is_int(value: Any) -> bool:
    """An integer and not a bool (JSON's true and false are not numbers)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_int_list(value: Any, low: int, high: int | None = None) -> bool:
    """A list of integers (not bools) in ``[low, high)`` (no upper bound with ``high`` None)."""
    return isinstance(value, list) and all(is_int(v) and v >= low and (high is None or v < high) for v in value)


@dataclass(kw_only=True, slots=True)
class SamplingParams:
    """How to sample one request. Field names follow SGLang's ``sampling_params``."""

    max_new_tokens: int = 128
    """Most tokens to generate."""
    temperature: float = 1.0
    """0 is greedy."""
    top_p: float = 1.0
    """Nucleus mass in (0, 1]."""
    top_k: int = -1
    """Keep the k most likely tokens; -1 keeps all."""
    min_p: float = 0.0
    """Drop tokens below min_p times the most likely one's probability."""
    seed: int | None = None
    """Per-request seed: the same seed gives the same tokens, whatever else is in the batch."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Extra token ids that end the request (besides the model's EOS)."""
    stop: list[str] = field(default_factory=list)
    """Strings that end the request when the decoded text contains them (needs a tokenizer)."""
    ignore_eos: bool = False
    """Keep generating past EOS."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once for each time the request has generated it, in [-2, 2]."""
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token the request has generated, in [-2, 2]."""
    repetition_penalty: float = 1.0
    """Divides the positive logits (multiplies the negative ones) of tokens in the prompt or the output, in (0, 2];
    1 is off."""
    min_new_tokens: int = 0
    """EOS and the stop tokens cannot be drawn, and stop strings do not end the request, before this many tokens."""
    logit_bias: dict[int, float] = field(default_factory=dict)
    """Added to the logits of these token ids before every draw, each in [-100, 100] (-100 in effect bans one)."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            (is_int(self.max_new_tokens) and self.max_new_tokens >= 0, "max_new_tokens", "an integer >= 0"),
            (is_number(self.temperature) and self.temperature >= 0, "temperature", "a finite number >= 0"),
            (is_number(self.top_p) and 0 < self.top_p <= 1, "top_p", "a number in (0, 1]"),
            (is_int(self.top_k) and (self.top_k == -1 or self.top_k >= 1), "top_k", "-1 or an integer >= 1"),
            (is_number(self.min_p) and 0 <= self.min_p < 1, "min_p", "a number in [0, 1)"),
            (self.seed is None or (is_int(self.seed) and 0 <= self.seed <= MAX_SEED), "seed", SEED_RANGE),
            (is_int_list(self.stop_token_ids, 0), "stop_token_ids", "a list of token ids (integers >= 0)"),
            (
                isinstance(self.stop, list) and all(isinstance(s, str) and s for s in self.stop),
                "stop",
                "a list of non-empty strings",
            ),
            (isinstance(self.ignore_eos, bool), "ignore_eos", "true or false"),
            (
                is_number(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
                "frequency_penalty",
                "a number in [-2, 2]",
            ),
            (
                is_number(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
                "presence_penalty",
                "a number in [-2, 2]",
            ),
            (
                is_number(self.repetition_penalty) and 0 < self.repetition_penalty <= 2,
                "repetition_penalty",
                "a number in (0, 2]",
            ),
            (is_int(self.min_new_tokens) and self.min_new_tokens >= 0, "min_new_tokens", "an integer >= 0"),
            (
                isinstance(self.logit_bias, dict)
                and all(is_int(t) and t >= 0 and is_number(b) and -100 <= b <= 100 for t, b in self.logit_bias.items()),
                "logit_bias",
                "an object of token id -> bias in [-100, 100]",
            ),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise ValueError(f"sampling_params.{name} must be {expected}, got {getattr(self, name)!r:.200}")

    @property
    def penalized(self) -> bool:
        """Whether the logits need :func:`league.ops.penalties.penalize` before this request's draws."""
        return (
            self.frequency_penalty != 0
            or self.presence_penalty != 0
            or self.repetition_penalty != 1
            or self.min_new_tokens > 0
            or bool(self.logit_bias)
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def filter_settings(self) -> tuple[float, int, float, float] | None:
        """``(temperature, top_k, top_p, min_p)`` as :func:`league.ops.sampling.filtered_probs` takes them; None
        when greedy."""
        return None if self.greedy else (self.temperature, self.top_k, self.top_p, self.min_p)


def rows_by_settings(params: list[SamplingParams]) -> dict[tuple | None, list[int]]:
    """Batch rows grouped by their filter settings (None: greedy), in row order, so each group is filtered and
    drawn with one set of batched ops."""
    groups: dict[tuple | None, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault(p.filter_settings, []).append(i)
    return groups


@dataclass(kw_only=True, slots=True)
class SpecStats:
    """Speculative-decoding counters of one request (or summed over the engine)."""

    draft_tokens: int = 0
    """Draft tokens proposed."""
    accepted_tokens: int = 0
    """Draft tokens accepted."""
    verify_steps: int = 0
    """Target forwards that verified drafts."""
    verified_output_tokens: int = 0
    """Tokens emitted by verify steps (accepted drafts + one bonus each)."""

    def add(self, other: "SpecStats") -> None:
        self.draft_tokens += other.draft_tokens
        self.accepted_tokens += other.accepted_tokens
        self.verify_steps += other.verify_steps
        self.verified_output_tokens += other.verified_output_tokens

    @property
    def accept_length(self) -> float:
        """Mean tokens emitted per verify step (1.0 means no draft was ever accepted)."""
        return self.verified_output_tokens / self.verify_steps if self.verify_steps else 0.0

    @property
    def accept_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0


@dataclass(kw_only=True, slots=True)
class GenerateOutput:
    """The result of one request."""

    rid: str
    prompt_ids: list[int]
    output_ids: list[int]
    output_logprobs: list[float]
    """fp32 log-softmax of the raw logits at each generated token."""
    finish_reason: str
    """``stop`` (EOS, stop token or stop string), ``length`` (max_new_tokens or context) or ``abort``."""
    text: str | None = None
    spec: SpecStats = field(default_factory=SpecStats)
    output_top_logprobs: list[list[tuple[float, int]]] = field(default_factory=list)
    """For each generated token, the ``top_logprobs_num`` most likely ``(log-prob, token id)`` (empty if none)."""
    input_logprobs: list[float | None] = field(default_factory=list)
    """Log-probs of the prompt's tokens from ``logprob_start_len`` on (None for the first prompt token)."""
    input_top_logprobs: list[list[tuple[float, int]] | None] = field(default_factory=list)
    """The most likely tokens at each of those prompt positions (with ``top_logprobs_num``)."""
    routed_experts: torch.Tensor | None = None
    """int32 ``[rows, layers, top_k]``: the experts of each position from ``routed_experts_start_len`` to the one
    before the last token, when asked for (routing replay)."""
    cached_tokens: int = 0
    """Prompt tokens the prefix cache supplied (not computed again)."""
    num_retractions: int = 0
    """Times the request was preempted (its cache taken back, computed again later), SGLang's retractions."""


TopLogprobs = list[tuple[float, int]]


@dataclass(kw_only=True, slots=True)
class Request:
    """A request's state inside the engine."""

    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    """The seed of this request's sampling: its draws are a function of (seed, output position), see
    ``ops.sampling``."""
    group: list["Request"] = field(default_factory=list)
    """Siblings that share this request's prefill (n samples); filled on the group's leader only."""
    leader: "Request | None" = None
    slot: int | None = None
    """The request's GDN states and row of the block table."""
    blocks: list[int] = field(default_factory=list)
    """The cache blocks holding its positions, in order (some shared with other requests or the prefix cache)."""
    fill_ids: list[int] = field(default_factory=list)
    """The tokens its prefill runs: the prompt, or after a preemption the prompt and every output token but the
    last (which is still pending)."""
    num_prefilled: int = 0
    """Tokens of ``fill_ids`` already in the cache (reused from the prefix cache or run through the model)."""
    resumed_outputs: int = 0
    """Output tokens that ``fill_ids`` holds (0 until a preemption)."""
    cached_tokens: int = 0
    """Prompt tokens reused from the prefix cache at the first admission (SGLang's ``cached_tokens``)."""
    snapshot_points: list[int] = field(default_factory=list)
    """Positions where the prefill stops to leave a GDN snapshot for the prefix cache."""
    num_retractions: int = 0
    """Times it was preempted."""
    pending_token: int | None = None
    """The last sampled token, not yet run through the model (the bonus token under speculation)."""
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    spec: SpecStats = field(default_factory=SpecStats)
    mtp_start: int = 0
    """Position of the first row the MTP head must still run (speculation): the first verified position, or
    the last prompt position after prefill; the trunk's hidden states of those rows wait in the speculative
    step's buffer at this request's slot."""
    mtp_tokens: list[int] = field(default_factory=list)
    """The token after each of those rows (the emitted ones; their count is the number of rows)."""
    top_logprobs_num: int = 0
    """Keep this many most likely tokens, with their log-probs, at each output (and returned input) position."""
    logprob_start_len: int = -1
    """Return the log-probs of the prompt's tokens from this position on; -1: none."""
    routed_experts_start_len: int | None = None
    """Return the experts chosen at each position from this one on (None: not asked)."""
    routed_experts: torch.Tensor | None = None
    """Read from the cache when the request finishes (with ``routed_experts_start_len``)."""
    output_top_logprobs: list[TopLogprobs] = field(default_factory=list)
    input_logprobs: list[float | None] = field(default_factory=list)
    input_top_logprobs: list[TopLogprobs | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.fill_ids = self.fill_ids or self.prompt_ids

    @property
    def num_cached(self) -> int:
        """Tokens whose KV and GDN state are committed in the slot."""
        decoded = max(len(self.output_ids) - 1 - self.resumed_outputs, 0) if self.prefill_done else 0
        return self.num_prefilled + decoded

    @property
    def prefill_done(self) -> bool:
        return self.num_prefilled >= len(self.fill_ids)

    @property
    def resumed(self) -> bool:
        """Prefilled again after a preemption (its first token was sampled before)."""
        return bool(self.output_ids) and self.fill_ids is not self.prompt_ids

    def preempt(self) -> None:
        """Forget the cache (its blocks and slot were taken back): the next prefill runs the prompt and the outputs
        but the last, which stays pending. A sample of a group becomes a request of its own, keeping the prompt's
        log-probs its leader computed."""
        if self.leader is not None:
            self.input_logprobs, self.input_top_logprobs = self.leader.input_logprobs, self.leader.input_top_logprobs
            self.leader = None
        for member in self.group:  # the samples of a preempted leader go on as requests of their own
            if member is not self:
                member.input_logprobs, member.input_top_logprobs = self.input_logprobs, self.input_top_logprobs
                member.leader, member.group = None, [member]
        self.group = [self]
        self.resumed_outputs = max(len(self.output_ids) - 1, 0)
        self.fill_ids = self.prompt_ids + self.output_ids[:-1] if self.output_ids else self.prompt_ids
        self.num_prefilled, self.snapshot_points = 0, []
        self.mtp_tokens = []
        self.num_retractions += 1

    def to_output(self, text: str | None = None) -> GenerateOutput:
        prefilled = self.leader or self  # the group's prompt log-probs are its leader's
        return GenerateOutput(
            rid=self.rid,
            prompt_ids=self.prompt_ids,
            output_ids=list(self.output_ids),
            output_logprobs=list(self.output_logprobs),
            finish_reason=self.finish_reason or "abort",
            text=text,
            spec=self.spec,
            output_top_logprobs=list(self.output_top_logprobs),
            input_logprobs=list(prefilled.input_logprobs),
            input_top_logprobs=list(prefilled.input_top_logprobs),
            routed_experts=self.routed_experts,
            cached_tokens=self.cached_tokens,
            num_retractions=self.num_retractions,
        )


def check_request(
    prompt_ids: list[int],
    params: SamplingParams,
    n: int,
    top_logprobs_num: int,
    logprob_start_len: int,
    vocab_size: int,
) -> None:
    """What a request must be before an engine takes it (``LLMEngine.add_request``'s arguments): a ValueError naming
    the field otherwise. The engine checks what depends on its sizes (context length, slots)."""
    if not isinstance(prompt_ids, list) or not prompt_ids:
        raise ValueError(f"input_ids must be a non-empty list of token ids, got {prompt_ids!r:.100}")
    if not is_int_list(prompt_ids, 0, vocab_size):
        bad = [t for t in prompt_ids if not is_int_list([t], 0, vocab_size)]
        raise ValueError(f"input_ids must hold integer token ids in [0, {vocab_size}), got {bad[:5]}")
    if not is_int(n) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if not is_int(top_logprobs_num) or not 0 <= top_logprobs_num <= vocab_size:
        raise ValueError(f"top_logprobs_num must be an integer in [0, {vocab_size}], got {top_logprobs_num!r}")
    if not is_int(logprob_start_len) or not -1 <= logprob_start_len < len(prompt_ids):
        raise ValueError(
            f"logprob_start_len must be -1 or a prompt position in [0, {len(prompt_ids)}), got {logprob_start_len!r}"
        )
    if any(t >= vocab_size for t in params.logit_bias):
        raise ValueError(f"sampling_params.logit_bias has token ids outside [0, {vocab_size})")
    if params.seed is not None and params.seed + n - 1 > MAX_SEED:
        raise ValueError(f"sampling_params.seed ({params.seed}) + n - 1 must be <= {MAX_SEED} (sample i uses seed + i)")


def check_routes_asked(start: int | None, prompt_len: int, kept: bool) -> None:
    """A request for the routed experts (``start``: the first position returned; None: not asked) needs an engine
    that keeps them, and a start within the prompt."""
    if start is None:
        return
    if not kept:
        raise ValueError("return_routed_experts needs an engine started with --enable-return-routed-experts")
    if not is_int(start) or not 0 <= start <= prompt_len:
        raise ValueError(f"routed_experts_start_len must be in [0, {prompt_len}] (the prompt's length), got {start!r}")


def ends_by_length(r: Request, num_output: int, context_length: int) -> bool:
    """Whether ``num_output`` generated tokens reach the request's max_new_tokens or the context length."""
    return num_output >= r.params.max_new_tokens or len(r.prompt_ids) + num_output >= context_length


def finish_reason(r: Request, token: int, eos_ids: set[int], context_length: int, tokenizer=None) -> str | None:
    """Why ``r`` ends with ``token`` just appended (``stop``: EOS, a stop token or stop string; ``length``), or
    None; no stop before ``min_new_tokens``."""
    p = r.params
    if (token in eos_ids and not p.ignore_eos) or token in p.stop_token_ids:
        return "stop"
    if len(r.output_ids) < p.min_new_tokens:
        return "length" if ends_by_length(r, len(r.output_ids), context_length) else None
    if p.stop and tokenizer is not None and any(s in tokenizer.decode(r.output_ids) for s in p.stop):
        return "stop"
    return "length" if ends_by_length(r, len(r.output_ids), context_length) else None


@dataclass(kw_only=True, slots=True)
class InFlight:
    """A decode step launched and not yet read back: its requests in row order, their sampled tokens on the device
    (the inputs of the next step), and host copies of the tokens, log-probs and top log-probs (when asked for),
    complete once ``ready`` has passed (None: already complete)."""

    reqs: list[Request]
    tokens: torch.Tensor
    host: list[torch.Tensor]
    ready: torch.cuda.Event | None


@dataclass(kw_only=True, slots=True)
class EngineStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    forward_passes: int = 0
    prefill_passes: int = 0
    """Forward passes that prefilled prompt chunks (the rest decoded or verified)."""
    prefill_tokens: int = 0
    """Tokens those passes ran (prompt tokens the prefix cache did not supply, and those prefilled again after a
    preemption)."""
    verify_passes: int = 0
    """Forward passes that verified drafts (speculative steps)."""
    spec: SpecStats = field(default_factory=SpecStats)
