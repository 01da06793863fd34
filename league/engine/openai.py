"""The wire format of the OpenAI routes (``/v1/completions``, ``/v1/chat/completions``): request bodies in, answers
and stream chunks out, field by field as the OpenAI API defines them.

Pure functions and one small class (:class:`TextStream`, the text a stream has sent). A field the OpenAI API has
and league does not implement is accepted while its value asks for nothing (``tools: []``, ``suffix: null``) and
is a 400 naming it otherwise; a name the API does not have is a 400. Not responsible for HTTP, threads or
tokenization (text leaves decoded through the callables the server passes in).
"""

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from league.engine import protocol
from league.engine.request import GenerateOutput, is_int

# OpenAI name -> league sampling name (SGLang's and vLLM's extensions included)
SAMPLING = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens", "min_tokens": "min_new_tokens"}
SAMPLING |= {k: k for k in ("temperature", "top_p", "top_k", "min_p", "n", "stop", "seed", "logit_bias")}
SAMPLING |= {k: k for k in ("frequency_penalty", "presence_penalty", "repetition_penalty")}
SAMPLING |= {k: k for k in ("stop_token_ids", "ignore_eos", "skip_special_tokens", "no_stop_trim")}
COMMON = {"model", "stream", "stream_options", "logprobs", "user", "metadata", "store", "service_tier"}
COMPLETION_FIELDS = frozenset(SAMPLING) | COMMON | {"prompt", "echo", "suffix", "best_of"}
CHAT_FIELDS = frozenset(SAMPLING) | COMMON | {"messages", "top_logprobs", "chat_template_kwargs"}
CHAT_FIELDS |= {"tools", "tool_choice", "parallel_tool_calls", "functions", "function_call", "response_format"}
CHAT_FIELDS |= {"reasoning_effort", "modalities", "audio", "prediction", "web_search_options"}
# fields league does not implement: the values that ask for nothing
NEUTRAL: dict[str, Callable[[Any], bool]] = {
    "suffix": lambda v: v in (None, ""),
    "tools": lambda v: v in (None, []),
    "functions": lambda v: v in (None, []),
    "tool_choice": lambda v: v in (None, "none", "auto"),
    "function_call": lambda v: v in (None, "none", "auto"),
    "response_format": lambda v: v is None or v == {"type": "text"},
    "reasoning_effort": lambda v: v is None,
    "modalities": lambda v: v in (None, ["text"]),
    "audio": lambda v: v is None,
    "prediction": lambda v: v is None,
    "web_search_options": lambda v: v is None,
    "store": lambda v: v in (None, False),
}
MAX_TOP_LOGPROBS = 20


@dataclass(kw_only=True, slots=True)
class OpenAIRequest:
    """What an OpenAI request asks for, beyond its prompt."""

    options: protocol.SamplingOptions
    stream: bool = False
    include_usage: bool = False
    """``stream_options.include_usage``: a last chunk with the usage and no choices."""
    logprobs: bool = False
    """Return the chosen tokens' log-probs."""
    top_logprobs: int = 0
    """And this many most likely tokens at each position."""
    echo: bool = False
    """Completions: the answer's text (and log-probs) begin with the prompt's."""
    model: str | None = None


def parse_request(body: dict, chat: bool, default_max_tokens: int | None) -> OpenAIRequest:
    """Check an OpenAI body's fields (the prompt or messages aside) and turn them into league's options."""
    protocol.check_fields(body, set(CHAT_FIELDS if chat else COMPLETION_FIELDS), "the body")
    for name, neutral in NEUTRAL.items():
        if name in body and not neutral(body[name]):
            raise ValueError(f"`{name}` {body[name]!r:.100} is not supported by league's server (leave it out)")
    raw = {SAMPLING[k]: v for k, v in body.items() if k in SAMPLING and v is not None}
    try:
        options = protocol.parse_sampling(raw, "body", default_max_tokens)
    except ValueError as e:
        raise openai_names(e) from None
    best_of = body.get("best_of")
    if best_of is not None and best_of != options.n:
        raise ValueError(f"`best_of` {best_of!r} is not supported by league's server (only best_of == n)")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ValueError(f"`model` must be a string, got {model!r:.100}")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise ValueError(f"`stream_options` must be an object, got {stream_options!r:.100}")
    protocol.check_fields(stream_options, {"include_usage", "continuous_usage_stats"}, "`stream_options`")
    if stream_options.get("continuous_usage_stats"):
        raise ValueError("`stream_options.continuous_usage_stats` is not supported by league's server")
    request = OpenAIRequest(
        options=options,
        stream=protocol.flag(body, "stream"),
        include_usage=protocol.flag(stream_options, "include_usage"),
        echo=not chat and protocol.flag(body, "echo"),
        model=model,
    )
    if stream_options and not request.stream:
        raise ValueError("`stream_options` is only allowed with `stream: true`")
    logprobs = body.get("logprobs")
    if chat:
        request.logprobs = protocol.flag(body, "logprobs")
        top = body.get("top_logprobs")
        if top is not None:
            if not is_int(top) or not 0 <= top <= MAX_TOP_LOGPROBS:
                raise ValueError(f"`top_logprobs` must be an integer in [0, {MAX_TOP_LOGPROBS}], got {top!r:.100}")
            if not request.logprobs:
                raise ValueError("`top_logprobs` needs `logprobs: true`")
            request.top_logprobs = top
    elif logprobs is not None:
        if not is_int(logprobs) or not 0 <= logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"`logprobs` must be an integer in [0, {MAX_TOP_LOGPROBS}], got {logprobs!r:.100}")
        request.logprobs, request.top_logprobs = True, logprobs
    return request


def openai_names(error: ValueError) -> ValueError:
    """A sampling error in the OpenAI API's names (``sampling_params.max_new_tokens`` -> ``max_tokens``)."""
    text = str(error)
    for league_name, openai_name in (("max_new_tokens", "max_tokens"), ("min_new_tokens", "min_tokens")):
        text = text.replace(f"sampling_params.{league_name}", openai_name).replace(f"body.{league_name}", openai_name)
    return ValueError(text.replace("sampling_params.", "").replace("`body.", "`"))


def message_text(messages: Any) -> list[dict]:
    """Chat messages with list-form ``content`` (``[{"type": "text", "text": ...}, ...]``) joined into strings."""
    if not (isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages)):
        raise ValueError(f"`messages` must be a non-empty list of {{role, content}} objects, got {messages!r:.200}")
    out = []
    for i, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise ValueError(
                        f"`messages[{i}].content` parts must be {{type: text, text}} (league serves text only), "
                        f"got {part!r:.100}"
                    )
                parts.append(part["text"])
            message = {**message, "content": "".join(parts)}
        elif content is not None and not isinstance(content, str):
            raise ValueError(f"`messages[{i}].content` must be a string or a list of text parts, got {content!r:.100}")
        out.append(message)
    return out


def completion_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"


def usage(prompts: list[list[int]], outs: list[GenerateOutput]) -> dict:
    prompt_tokens, completion_tokens = sum(len(p) for p in prompts), sum(len(o.output_ids) for o in outs)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def envelope(ident: str, chat: bool, model: str, chunk: bool = False) -> dict:
    kind = "chat.completion" if chat else "text_completion"
    return {
        "id": ident,
        "object": kind + ".chunk" if chat and chunk else kind,
        "created": int(time.time()),
        "model": model,
    }


@dataclass(kw_only=True, slots=True)
class TokenLogprobs:
    """The log-prob facts of some tokens of one choice: ids, log-probs and top alternatives (None: none known)."""

    ids: list[int]
    logprobs: list[float | None]
    tops: list[list[tuple[float, int]] | None]


def token_logprobs_of(out: GenerateOutput, start: int, echo_prompt: bool) -> TokenLogprobs:
    """Output tokens from ``start`` on, preceded by the prompt's (first one without a log-prob) when echoed."""
    ids, logprobs = list(out.output_ids[start:]), list(out.output_logprobs[start:])
    tops: list = list(out.output_top_logprobs[start:]) or [None] * len(ids)
    if echo_prompt:
        ids, logprobs = out.prompt_ids + ids, list(out.input_logprobs) + logprobs
        tops = (list(out.input_top_logprobs) or [None] * len(out.prompt_ids)) + tops
    return TokenLogprobs(ids=ids, logprobs=logprobs, tops=tops)


def completion_logprobs(facts: TokenLogprobs, token_text: Callable[[int], str], offset: int) -> dict:
    """A completion's ``logprobs``: tokens, their log-probs, the top alternatives (the chosen token always among
    them) and each token's character offset from ``offset``."""
    tokens = [token_text(t) for t in facts.ids]
    offsets, position = [], offset
    for text in tokens:
        offsets.append(position)
        position += len(text)
    top_logprobs = []
    for token, logprob, tops in zip(facts.ids, facts.logprobs, facts.tops):
        if tops is None:
            top_logprobs.append(None)
            continue
        entry = {token_text(t): lp for lp, t in tops}
        entry.setdefault(token_text(token), logprob)
        top_logprobs.append(entry)
    return {"tokens": tokens, "token_logprobs": facts.logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


def chat_logprobs(facts: TokenLogprobs, token_text: Callable[[int], str]) -> dict:
    """A chat choice's ``logprobs``: one ``{token, logprob, bytes, top_logprobs}`` per token."""

    def item(token: int, logprob: float) -> dict:
        text = token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", "replace"))}

    return {
        "content": [
            item(t, lp) | {"top_logprobs": [item(tt, tlp) for tlp, tt in (tops or [])]}
            for t, lp, tops in zip(facts.ids, facts.logprobs, facts.tops)
        ]
    }


def choice(index: int, text: str, chat: bool, logprobs: dict | None, reason: str | None) -> dict:
    """One choice of an answer: a chat message or a completion's text."""
    body = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
    return {"index": index, **body, "logprobs": logprobs, "finish_reason": reason}


def chunk_choice(index: int, text: str, chat: bool, logprobs: dict | None, reason: str | None, first: bool) -> dict:
    """One choice of a stream chunk: a chat delta (the role in the first) or a completion's new text."""
    if chat:
        delta = ({"role": "assistant"} if first else {}) | ({"content": text} if text or first else {})
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}


class TextStream:
    """The text a stream has sent of one choice. A snapshot's new text is sent except what may still change: a
    trailing incomplete UTF-8 character (U+FFFD) and, with stop strings that are trimmed, the last ``len(stop) - 1``
    characters (they may begin the stop string). At the end the rest of the final, trimmed text goes out, so the
    deltas add up to the non-streamed text.

    Args:
        stops (list[str]): the request's stop strings.
        trim (bool): whether a matched stop string is cut from the text.
    """

    def __init__(self, stops: list[str], trim: bool):
        self.hold = max((len(s) for s in stops), default=1) - 1 if trim else 0
        self.sent = 0

    def delta(self, text: str, finished: bool) -> str:
        if finished:
            end = len(text)
        else:
            end = len(text.rstrip("\ufffd")) - self.hold
        if end <= self.sent:
            return ""
        out, self.sent = text[self.sent : end], end
        return out
