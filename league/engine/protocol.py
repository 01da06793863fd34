"""The wire format of the server's SGLang routes: request bodies in, answers out (the OpenAI routes: ``openai.py``).

Pure functions: they check the fields the engine does not know about (unknown keys, types, whether the
prompt and ``max_new_tokens`` fit in the context) and leave the rest to ``SamplingParams`` and
``LLMEngine.add_request``, whose ValueErrors name the field. Not responsible for HTTP, threads or
tokenization (text arrives encoded and leaves decoded through the callables the server passes in).
"""

import base64
import dataclasses
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from league.engine.request import GenerateOutput, SamplingParams, is_int, is_int_list

TOP_K_ALL = 1 << 30
"""SGLang's ``top_k`` for the whole vocabulary (its default), league's -1."""

SAMPLING_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams))
# SGLang options besides SamplingParams': n and how output text is decoded (spaces_...: accepted, ignored)
SAMPLING_EXTRA = frozenset({"n", "skip_special_tokens", "no_stop_trim", "spaces_between_special_tokens"})
SAMPLING_UNSUPPORTED = {
    "stop_regex": "stop strings (`stop`)",
    "json_schema": "unconstrained sampling",
    "regex": "unconstrained sampling",
    "ebnf": "unconstrained sampling",
    "structural_tag": "unconstrained sampling",
    "custom_params": "no custom logit processor",
    "stream_interval": "streaming after every engine step (1)",
}
"""SGLang sampling options league does not implement -> what it does instead (a value that asks for nothing,
null / empty / ``stream_interval`` 1, is accepted)."""

GENERATE_FIELDS = {"text", "input_ids", "sampling_params", "return_logprob", "stream", "rid"}
GENERATE_FIELDS |= {"logprob_start_len", "top_logprobs_num", "return_text_in_logprobs", "return_prompt_token_ids"}
GENERATE_FIELDS |= {"return_routed_experts", "routed_experts_start_len"}
GENERATE_INERT = frozenset(
    {"log_metrics", "no_logs", "custom_labels", "conversation_id", "external_trace_header", "received_time"}
    | {"http_worker_ipc", "lora_id", "modalities", "extra_key", "cache_salt"}
)
"""SGLang /generate fields that change nothing league computes, whatever their value: metrics and tracing,
internal routing, and prefix-cache namespaces (league keeps no prefix cache, so no request shares one)."""
GENERATE_UNSUPPORTED = {
    "input_embeds": "prompts as `text` or `input_ids`",
    "image_data": "a text-only model",
    "video_data": "a text-only model",
    "audio_data": "a text-only model",
    "mm_hashes": "a text-only model",
    "mm_content_hashes": "a text-only model",
    "use_audio_in_video": "a text-only model",
    "video_config": "a text-only model",
    "max_dynamic_patch": "a text-only model",
    "min_dynamic_patch": "a text-only model",
    "image_max_dynamic_patch": "a text-only model",
    "video_max_dynamic_patch": "a text-only model",
    "images_config": "a text-only model",
    "need_wait_for_mm_inputs": "a text-only model",
    "num_items_assigned": "a text-only model",
    "encoder_urls": "a text-only model",
    "multi_item_delimiter_indices": "one item per prompt",
    "token_ids_logprob": "`top_logprobs_num`",
    "return_sampling_mask": "`return_logprob`",
    "return_flat_raw_top_logprobs": "`top_logprobs_num` (nested lists)",
    "return_flat_raw_top_logprobs_b64": "`top_logprobs_num` (nested lists)",
    "return_hidden_states": "`league score` for teacher-forced passes",
    "return_indexer_topk": "nothing: the model has no sparse-attention indexer",
    "return_entropy": "`return_logprob` with `top_logprobs_num`",
    "return_bytes": "`text` or `output_ids`",
    "session_id": "resending the conversation's tokens",
    "session_params": "resending the conversation's tokens",
    "lora_path": "the base model (no LoRA adapters)",
    "custom_logit_processor": "`sampling_params` (no custom logit processor)",
    "positional_embed_overrides": "`input_ids`",
    "bootstrap_host": "one server doing prefill and decode",
    "bootstrap_port": "one server doing prefill and decode",
    "bootstrap_room": "one server doing prefill and decode",
    "bootstrap_pair_key": "one server doing prefill and decode",
    "decode_tp_size": "one server doing prefill and decode",
    "disagg_prefill_dp_rank": "one server doing prefill and decode",
    "routed_dp_rank": "one engine per server (send to the server you mean)",
    "data_parallel_rank": "one engine per server (send to the server you mean)",
    "kv_router_hint": "one engine per server",
    "routing_key": "one engine per server",
    "background": "a request answered when it finishes (or `stream`)",
    "require_reasoning": "the chat template's own reasoning",
    "max_thinking_tokens": "`max_new_tokens`",
    "priority": "first come, first served",
}
"""SGLang /generate fields league does not implement -> what to use instead. A value that asks for nothing (null,
false, 0, empty, or a batch of such) is accepted; any other is a 400 naming the field."""
UNSUPPORTED_DEFAULTS: dict[str, Any] = {}


def parse_routed_experts(body: dict) -> int | None:
    """``routed_experts_start_len`` when ``return_routed_experts`` asks for the routing (None otherwise); the engine
    checks it against the prompt."""
    start = body.get("routed_experts_start_len")
    start = 0 if start is None else start
    if not is_int(start) or start < 0:
        raise ValueError(f"`routed_experts_start_len` must be an integer >= 0, got {start!r}")
    return start if flag(body, "return_routed_experts") else None


def encode_routes(routes) -> str:
    """SGLang's encoding of routed experts: base64 of the raw bytes of an int32 ``[rows, layers, top_k]`` array."""
    return base64.b64encode(routes.contiguous().numpy().tobytes()).decode()


def asks_nothing(value: Any, default: Any = None) -> bool:
    """Whether an unimplemented option's value leaves it off: null, false, empty, its default, or a list of such
    (a batch's per-prompt values)."""
    if value is None or value is False or value == default or (isinstance(value, list | dict | str) and not value):
        return True
    return isinstance(value, list) and all(asks_nothing(v, default) for v in value)


def check_unsupported(body: dict, unsupported: dict[str, str], where: str, defaults: dict | None = None) -> None:
    """A 400 (ValueError) naming the first field of ``unsupported`` whose value asks for something."""
    for key, instead in unsupported.items():
        if key in body and not asks_nothing(body[key], (defaults or {}).get(key)):
            raise ValueError(f"{where}{key} = {body[key]!r:.80} is not supported by league; use {instead} instead")


@dataclass(kw_only=True, slots=True)
class SamplingOptions:
    """The sampling options of one HTTP request, before they meet each prompt's length."""

    fields: dict[str, Any]
    """SamplingParams keyword arguments."""
    n: int = 1
    """Samples per prompt."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the output text."""
    trim_stop: bool = True
    """Cut the output text before a matched stop string (SGLang's ``no_stop_trim`` false)."""
    default_max_new_tokens: int | None = 128
    """Used when the request gives none; None: the room the context leaves."""


def check_fields(body: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ValueError(f"{where} has unknown fields {unknown}; known fields: {sorted(allowed)}")


def flag(body: dict, key: str, default: bool = False) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ValueError(f"`{key}` must be true or false, got {value!r}")
    return value


def parse_sampling(raw: Any, where: str, default_max_new_tokens: int | None) -> SamplingOptions:
    """Check an SGLang ``sampling_params`` object; the values themselves are checked by SamplingParams."""
    if not isinstance(raw, dict):
        raise ValueError(f"`{where}` must be a JSON object, got {raw!r}")
    raw = {("seed" if k == "sampling_seed" else k): v for k, v in raw.items() if v is not None}
    check_fields(raw, set(SAMPLING_FIELDS | SAMPLING_EXTRA | SAMPLING_UNSUPPORTED.keys()), f"`{where}`")
    check_unsupported(raw, SAMPLING_UNSUPPORTED, f"{where}.", {"stream_interval": 1})
    n = raw.get("n", 1)
    if not is_int(n) or n < 1:
        raise ValueError(f"{where}.n must be an integer >= 1, got {n!r}")
    if "logit_bias" in raw:
        raw["logit_bias"] = token_keys(raw["logit_bias"], f"{where}.logit_bias")
    for key, kind in (("stop", (list, str)), ("stop_token_ids", list)):
        if key in raw and not isinstance(raw[key], kind):
            raise ValueError(f"{where}.{key} must be a list, got {raw[key]!r}")
    return SamplingOptions(
        fields={k: v for k, v in raw.items() if k in SAMPLING_FIELDS and not (k == "top_k" and v == TOP_K_ALL)},
        n=n,
        skip_special_tokens=flag(raw, "skip_special_tokens", True),
        trim_stop=not flag(raw, "no_stop_trim"),
        default_max_new_tokens=default_max_new_tokens,
    )


def token_keys(value: Any, where: str) -> dict[int, Any]:
    """A JSON object keyed by token ids (JSON keys are strings: ``"42"``) -> a dict keyed by ints."""
    if not isinstance(value, dict):
        raise ValueError(f"`{where}` must be an object of token id -> bias, got {value!r:.100}")
    keys = {k: k if is_int(k) else int(k) if isinstance(k, str) and k.isdecimal() else None for k in value}
    bad = [k for k, v in keys.items() if v is None]
    if bad:
        raise ValueError(f"`{where}` keys must be token ids (decimal integers), got {bad[:5]}")
    return {keys[k]: v for k, v in value.items()}


def params_for(options: SamplingOptions, prompt_len: int, context_length: int, field: str) -> SamplingParams:
    """SamplingParams for one prompt; the prompt and max_new_tokens must fit in the context together."""
    room = context_length - prompt_len
    if room <= 0:
        raise ValueError(f"`{field}` has {prompt_len} tokens; the context length is {context_length}")
    fields = dict(options.fields)
    fields.setdefault("max_new_tokens", min(options.default_max_new_tokens or room, room))
    params = SamplingParams(**fields)
    if params.max_new_tokens > room:
        raise ValueError(
            f"sampling_params.max_new_tokens ({params.max_new_tokens}) does not fit: the context length is "
            f"{context_length} and the prompt has {prompt_len} tokens, leaving room for {room}"
        )
    return params


def parse_prompts(
    value: Any, field: str, encode: Callable[[str], list[int]], text: bool, ids: bool, vocab_size: int
) -> tuple[list[list[int]], bool]:
    """A prompt or a batch, as text and/or token ids -> (token id lists, whether it was a batch).

    Token ids must be integers (not booleans) in ``[0, vocab_size)``; ``LLMEngine.add_request`` checks the rest
    (empty, too long).
    """
    if text and isinstance(value, str):
        return [encode(value)], False
    if text and isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return [encode(v) for v in value], True
    if ids and isinstance(value, list) and value and all(isinstance(v, list) for v in value):
        prompts, batched = value, True
    elif ids and isinstance(value, list) and not any(isinstance(v, list) for v in value):
        prompts, batched = [value], False
    else:
        kinds = ["a string", "a list of strings"] * text + ["a list of token ids", "a list of such lists"] * ids
        raise ValueError(f"`{field}` must be {' or '.join(kinds)}, got {value!r:.200}")
    for i, prompt in enumerate(prompts):
        if not is_int_list(prompt, 0, vocab_size):
            bad = [t for t in prompt if not is_int_list([t], 0, vocab_size)][:5]
            where = f"`{field}[{i}]`" if batched else f"`{field}`"
            raise ValueError(f"{where} must hold integer token ids in [0, {vocab_size}), got {bad}")
    return prompts, batched


def parse_rids(value: Any, count: int, batched: bool) -> list[str]:
    if value is None:
        return [uuid.uuid4().hex for _ in range(count)]
    rids = value if batched else [value]
    if not (isinstance(rids, list) and len(rids) == count and all(isinstance(r, str) and r for r in rids)):
        raise ValueError(f"`rid` must be {f'a list of {count} strings' if batched else 'a string'}, got {value!r}")
    if len(set(rids)) != count:
        raise ValueError("`rid` has duplicates")
    return rids


def finish_reason(out: GenerateOutput, params: SamplingParams) -> dict:
    """SGLang's finish reason: length, abort, or stop with the stop string or token that matched."""
    if out.finish_reason == "length":
        return {"type": "length", "length": len(out.output_ids)}
    if out.finish_reason == "abort":
        return {"type": "abort", "message": "aborted by /abort_request"}
    last = out.output_ids[-1] if out.output_ids else None
    return {"type": "stop", "matched": next((s for s in params.stop if out.text and s in out.text), last)}


def trim(text: str, out: GenerateOutput, params: SamplingParams, options: SamplingOptions) -> str:
    """The output text, cut before the stop string that ended it (unless ``no_stop_trim``)."""
    matched = finish_reason(out, params).get("matched")
    if options.trim_stop and isinstance(matched, str) and matched in text:
        return text[: text.index(matched)]
    return text


@dataclass(kw_only=True, slots=True)
class LogprobOptions:
    """Which log-probs a ``/generate`` request returns (SGLang's ``return_logprob`` and companions)."""

    return_logprob: bool = False
    """Return the log-probs of the output tokens (and of the prompt's from ``logprob_start_len``)."""
    logprob_start_len: int = -1
    """First prompt position whose token's log-prob is returned; -1: output tokens only."""
    top_logprobs_num: int = 0
    """Also return this many most likely tokens at each of those positions."""
    return_text_in_logprobs: bool = False
    """Each entry's third element is the token's text (else None)."""


def parse_logprob_options(body: dict) -> LogprobOptions:
    start, top = body.get("logprob_start_len", -1), body.get("top_logprobs_num", 0)
    start, top = -1 if start is None else start, 0 if top is None else top
    if not is_int(start) or start < -1:
        raise ValueError(f"`logprob_start_len` must be -1 or a prompt position >= 0, got {start!r}")
    if not is_int(top) or top < 0:
        raise ValueError(f"`top_logprobs_num` must be an integer >= 0, got {top!r}")
    options = LogprobOptions(
        return_logprob=flag(body, "return_logprob"),
        logprob_start_len=start,
        top_logprobs_num=top,
        return_text_in_logprobs=flag(body, "return_text_in_logprobs"),
    )
    if not options.return_logprob:  # the other fields ask for nothing without it (as in SGLang)
        return LogprobOptions()
    return options


def generate_result(
    out: GenerateOutput,
    params: SamplingParams,
    text: str,
    finished: bool,
    logprobs: LogprobOptions,
    token_text: Callable[[int], str],
    served: "ServedFacts",
) -> dict:
    """One SGLang ``/generate`` answer (or, unfinished, one streamed snapshot). Log-prob entries are
    ``[log-prob, token id, text or None]`` (the first prompt token's log-prob is None). The speculative counters
    come under both of SGLang's names (``spec_accept_token_num`` / ``spec_draft_token_num``, which miles reads, and
    ``spec_num_correct_drafts`` / ``spec_num_proposed_drafts``)."""
    spec = out.spec
    meta = {
        "id": out.rid,
        "finish_reason": finish_reason(out, params) if finished else None,
        "prompt_tokens": len(out.prompt_ids),
        "weight_version": served.weight_version,
        "num_retractions": out.num_retractions,
        "reasoning_tokens": 0,
        "completion_tokens": len(out.output_ids),
        "cached_tokens": out.cached_tokens,
        "spec_verify_ct": spec.verify_steps,
        "spec_accept_token_num": spec.accepted_tokens,
        "spec_draft_token_num": spec.draft_tokens,
        "spec_accept_length": spec.accept_length,
    }
    if served.weight_versions:
        meta["weight_versions"] = served.weight_versions
    if finished:
        meta["e2e_latency"] = served.e2e_latency
        if spec.verify_steps:
            meta |= {
                "spec_accept_rate": spec.accept_rate,
                "spec_num_correct_drafts": spec.accepted_tokens,
                "spec_num_proposed_drafts": spec.draft_tokens,
                "spec_accepted_drafts": spec.accepted_tokens,
                "spec_proposed_drafts": spec.draft_tokens,
            }
    if logprobs.return_logprob:

        def entry(logprob: float | None, token: int) -> list:
            return [logprob, token, token_text(token) if logprobs.return_text_in_logprobs else None]

        def tops(pairs: list[tuple[float, int]] | None) -> list | None:
            return None if pairs is None else [entry(lp, t) for lp, t in pairs]

        input_ids = out.prompt_ids[max(logprobs.logprob_start_len, 0) :] if out.input_logprobs else []
        meta["input_token_logprobs"] = [entry(lp, t) for lp, t in zip(out.input_logprobs, input_ids)]
        meta["output_token_logprobs"] = [entry(lp, t) for lp, t in zip(out.output_logprobs, out.output_ids)]
        meta["output_token_logprobs_length"] = len(out.output_logprobs)
        if logprobs.top_logprobs_num:
            meta["input_top_logprobs"] = [tops(pairs) for pairs in out.input_top_logprobs]
            meta["output_top_logprobs"] = [tops(pairs) for pairs in out.output_top_logprobs]
    if finished and out.routed_experts is not None:
        meta["routed_experts"] = encode_routes(out.routed_experts)
    answer = {"text": text, "output_ids": out.output_ids, "meta_info": meta}
    if served.prompt_token_ids:
        answer["prompt_token_ids"] = out.prompt_ids
    return answer


@dataclass(kw_only=True, slots=True)
class ServedFacts:
    """What the server knows of one request besides the engine's output."""

    weight_version: str
    """The server's weight version now (``/update_weight_version``, weight updates)."""
    weight_versions: list[dict] | None = None
    """``[{"version", "start", "end"}]`` spans of output tokens, when the request spanned a weight update."""
    e2e_latency: float = 0.0
    """Seconds from the request's arrival to its end."""
    prompt_token_ids: bool = False
    """Return the prompt's token ids (``return_prompt_token_ids``)."""
