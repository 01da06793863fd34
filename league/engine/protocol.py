"""The wire format of the server's SGLang routes: request bodies in, answers out (the OpenAI routes: ``openai.py``).

Pure functions: they check the fields the engine does not know about (unknown keys, types, whether the
prompt and ``max_new_tokens`` fit in the context) and leave the rest to ``SamplingParams`` and
``LLMEngine.add_request``, whose ValueErrors name the field. Not responsible for HTTP, threads or
tokenization (text arrives encoded and leaves decoded through the callables the server passes in).
"""

import dataclasses
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from league.engine.request import GenerateOutput, SamplingParams, is_int, is_int_list

SAMPLING_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams))
# SGLang options besides SamplingParams': n and how output text is decoded (spaces_...: accepted, ignored)
SAMPLING_EXTRA = frozenset({"n", "skip_special_tokens", "no_stop_trim", "spaces_between_special_tokens"})
GENERATE_FIELDS = {"text", "input_ids", "sampling_params", "return_logprob", "stream", "rid"}
GENERATE_FIELDS |= {"logprob_start_len", "top_logprobs_num", "return_text_in_logprobs"}


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
    check_fields(raw, set(SAMPLING_FIELDS | SAMPLING_EXTRA), f"`{where}`")
    n = raw.get("n", 1)
    if not is_int(n) or n < 1:
        raise ValueError(f"{where}.n must be an integer >= 1, got {n!r}")
    if "logit_bias" in raw:
        raw["logit_bias"] = token_keys(raw["logit_bias"], f"{where}.logit_bias")
    for key, kind in (("stop", (list, str)), ("stop_token_ids", list)):
        if key in raw and not isinstance(raw[key], kind):
            raise ValueError(f"{where}.{key} must be a list, got {raw[key]!r}")
    return SamplingOptions(
        fields={k: v for k, v in raw.items() if k in SAMPLING_FIELDS},
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
) -> dict:
    """One SGLang ``/generate`` answer (or, unfinished, one streamed snapshot). Log-prob entries are
    ``[log-prob, token id, text or None]`` (the first prompt token's log-prob is None)."""
    meta = {
        "id": out.rid,
        "finish_reason": finish_reason(out, params) if finished else None,
        "prompt_tokens": len(out.prompt_ids),
        "completion_tokens": len(out.output_ids),
        "cached_tokens": 0,
        "spec_verify_ct": out.spec.verify_steps,
        "spec_accept_token_num": out.spec.accepted_tokens,
        "spec_draft_token_num": out.spec.draft_tokens,
        "spec_accept_length": out.spec.accept_length,
    }
    if logprobs.return_logprob:

        def entry(logprob: float | None, token: int) -> list:
            return [logprob, token, token_text(token) if logprobs.return_text_in_logprobs else None]

        def tops(pairs: list[tuple[float, int]] | None) -> list | None:
            return None if pairs is None else [entry(lp, t) for lp, t in pairs]

        input_ids = out.prompt_ids[max(logprobs.logprob_start_len, 0) :] if out.input_logprobs else []
        meta["input_token_logprobs"] = [entry(lp, t) for lp, t in zip(out.input_logprobs, input_ids)]
        meta["output_token_logprobs"] = [entry(lp, t) for lp, t in zip(out.output_logprobs, out.output_ids)]
        if logprobs.top_logprobs_num:
            meta["input_top_logprobs"] = [tops(pairs) for pairs in out.input_top_logprobs]
            meta["output_top_logprobs"] = [tops(pairs) for pairs in out.output_top_logprobs]
    return {"text": text, "output_ids": out.output_ids, "meta_info": meta}
