"""Every bad input the server was tried with, and its answer: each is a 4xx JSON error whose message names what to
change, none disturbs the server (a good request afterwards gets the same tokens), and docs/robustness.md's table
is these answers exactly. Regenerate the table with ``python -m tests.engine.test_bad_inputs --write``."""

import json
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from league.engine.config import EngineConfig
from league.engine.engine import LLMEngine
from league.engine.server import EngineServer

DOC = Path(__file__).resolve().parents[2] / "docs" / "robustness.md"
BEGIN, END = "<!-- http-bad-inputs:begin -->", "<!-- http-bad-inputs:end -->"
KEY = "k3y"
GOOD = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 4, "temperature": 0}}
CHAT = {"messages": [{"role": "user", "content": "w5"}], "max_tokens": 2}


@dataclass(frozen=True)
class Case:
    """One bad request: ``body`` is JSON (a dict) or raw bytes; ``raw`` is a whole HTTP request instead."""

    what: str
    path: str
    body: object = None
    status: int = 400
    words: str = ""
    """A piece of the answer's message (usually the field's name)."""
    method: str = "POST"
    raw: bytes | None = None
    key: str | None = KEY


def gen(**sampling) -> dict:
    return {"input_ids": [5, 6, 7], "sampling_params": sampling}


CASES = [
    # /generate: the body
    Case("body is not JSON", "/generate", b'{"input_ids": [1, 2', words="not valid JSON"),
    Case("body is a JSON array", "/generate", b"[1, 2]", words="JSON object"),
    Case("unknown field", "/generate", {**GOOD, "colour": "red"}, words="colour"),
    Case("text and input_ids both", "/generate", {**GOOD, "text": "w5"}, words="exactly one"),
    Case("neither text nor input_ids", "/generate", {"sampling_params": {}}, words="exactly one"),
    Case("input_ids holds booleans", "/generate", {"input_ids": [True, False]}, words="input_ids"),
    Case("input_ids holds a float", "/generate", {"input_ids": [5.0, 6]}, words="input_ids"),
    Case("input_ids holds -1", "/generate", {"input_ids": [-1]}, words="input_ids"),
    Case("input_ids outside the vocabulary", "/generate", {"input_ids": [5, 96]}, words="input_ids"),
    Case("input_ids empty", "/generate", {"input_ids": []}, words="input_ids"),
    Case("input_ids is a string", "/generate", {"input_ids": "w5 w6"}, words="input_ids"),
    Case("a batch item holds a boolean", "/generate", {"input_ids": [[5, 6], [True, 7]]}, words="input_ids[1]"),
    Case("prompt fills the context", "/generate", {"input_ids": [5] * 128}, words="context length"),
    Case("text is a number", "/generate", {"text": 12}, words="text"),
    Case("sampling_params is a string", "/generate", {**GOOD, "sampling_params": "x"}, words="sampling_params"),
    Case("unknown sampling field", "/generate", gen(beam_width=4), words="beam_width"),
    # /generate: sampling values
    Case("max_new_tokens -1", "/generate", gen(max_new_tokens=-1), words="max_new_tokens"),
    Case("max_new_tokens past the context", "/generate", gen(max_new_tokens=10**9), words="max_new_tokens"),
    Case("max_new_tokens true", "/generate", gen(max_new_tokens=True), words="max_new_tokens"),
    Case("max_new_tokens 2.5", "/generate", gen(max_new_tokens=2.5), words="max_new_tokens"),
    Case("temperature a string", "/generate", gen(temperature="hot"), words="temperature"),
    Case("temperature -1", "/generate", gen(temperature=-1), words="temperature"),
    Case(
        "temperature NaN",
        "/generate",
        b'{"input_ids": [5], "sampling_params": {"temperature": NaN}}',
        words="temperature",
    ),
    Case(
        "temperature 1e999 (infinite)",
        "/generate",
        b'{"input_ids": [5], "sampling_params": {"temperature": 1e999}}',
        words="temperature",
    ),
    Case("temperature false", "/generate", gen(temperature=False), words="temperature"),
    Case("top_p 0", "/generate", gen(top_p=0), words="top_p"),
    Case("top_p 1.5", "/generate", gen(top_p=1.5), words="top_p"),
    Case("top_k 0", "/generate", gen(top_k=0), words="top_k"),
    Case("top_k true", "/generate", gen(top_k=True), words="top_k"),
    Case("min_p 1", "/generate", gen(min_p=1), words="min_p"),
    Case("n 0", "/generate", gen(n=0), words="n must"),
    Case("n true", "/generate", gen(n=True), words="n must"),
    Case("n above max_running_requests", "/generate", gen(n=1000), words="n (1000)"),
    Case("seed 2**63", "/generate", gen(seed=2**63), words="seed"),
    Case("seed -1", "/generate", gen(seed=-1), words="seed"),
    Case("seed 2**63 - 1 with n 2", "/generate", gen(seed=2**63 - 1, n=2), words="seed"),
    Case("sampling_seed 10**30", "/generate", gen(sampling_seed=10**30), words="seed"),
    Case("seed a string", "/generate", gen(seed="7"), words="seed"),
    Case("stop_token_ids a number", "/generate", gen(stop_token_ids=3), words="stop_token_ids"),
    Case("stop_token_ids holds true", "/generate", gen(stop_token_ids=[True]), words="stop_token_ids"),
    Case("stop holds an empty string", "/generate", gen(stop=[""]), words="stop"),
    Case("stop a number", "/generate", gen(stop=5), words="stop"),
    Case("ignore_eos 1", "/generate", gen(ignore_eos=1), words="ignore_eos"),
    Case("frequency_penalty 3", "/generate", gen(frequency_penalty=3), words="frequency_penalty"),
    Case("presence_penalty a string", "/generate", gen(presence_penalty="x"), words="presence_penalty"),
    Case("repetition_penalty 0", "/generate", gen(repetition_penalty=0), words="repetition_penalty"),
    Case("min_new_tokens -1", "/generate", gen(min_new_tokens=-1), words="min_new_tokens"),
    Case("logit_bias key not a token id", "/generate", gen(logit_bias={"abc": 1}), words="logit_bias"),
    Case("logit_bias value 500", "/generate", gen(logit_bias={"5": 500}), words="logit_bias"),
    Case("logit_bias token outside the vocabulary", "/generate", gen(logit_bias={"96": 1}), words="logit_bias"),
    # /generate: other fields
    Case("return_logprob a string", "/generate", {**GOOD, "return_logprob": "yes"}, words="return_logprob"),
    Case(
        "logprob_start_len -2",
        "/generate",
        {**GOOD, "return_logprob": True, "logprob_start_len": -2},
        words="logprob_start_len",
    ),
    Case(
        "logprob_start_len past the prompt",
        "/generate",
        {**GOOD, "return_logprob": True, "logprob_start_len": 9},
        words="logprob_start_len",
    ),
    Case(
        "top_logprobs_num -1",
        "/generate",
        {**GOOD, "return_logprob": True, "top_logprobs_num": -1},
        words="top_logprobs_num",
    ),
    Case("rid a number", "/generate", {**GOOD, "rid": 7}, words="rid"),
    Case("rid duplicates in a batch", "/generate", {"input_ids": [[5], [6]], "rid": ["a", "a"]}, words="duplicates"),
    Case("stream a string", "/generate", {**GOOD, "stream": "yes"}, words="stream"),
    # OpenAI completions
    Case("prompt holds booleans", "/v1/completions", {"prompt": [True, False]}, words="prompt"),
    Case("prompt missing", "/v1/completions", {"max_tokens": 2}, words="prompt"),
    Case("max_tokens -5", "/v1/completions", {"prompt": [5], "max_tokens": -5}, words="max_tokens"),
    Case("logprobs 30", "/v1/completions", {"prompt": "w5", "logprobs": 30}, words="logprobs"),
    Case("logprobs true (a chat form)", "/v1/completions", {"prompt": "w5", "logprobs": True}, words="logprobs"),
    Case("echo a string", "/v1/completions", {"prompt": "w5", "echo": "yes"}, words="echo"),
    Case("suffix given", "/v1/completions", {"prompt": "w5", "suffix": "x"}, words="suffix"),
    Case("best_of above n", "/v1/completions", {"prompt": "w5", "best_of": 3}, words="best_of"),
    Case("unknown model", "/v1/completions", {"prompt": "w5", "model": "gpt-4o"}, 404, "gpt-4o"),
    Case(
        "stream_options without stream",
        "/v1/completions",
        {"prompt": "w5", "stream_options": {}} | {"stream_options": {"include_usage": True}},
        words="stream_options",
    ),
    Case(
        "continuous_usage_stats",
        "/v1/completions",
        {"prompt": "w5", "stream": True, "stream_options": {"continuous_usage_stats": True}},
        words="continuous_usage_stats",
    ),
    Case("seed 2**64", "/v1/completions", {"prompt": [5], "seed": 2**64}, words="seed"),
    Case("unknown field", "/v1/completions", {"prompt": "w5", "foo": 1}, words="foo"),
    # OpenAI chat
    Case("messages a string", "/v1/chat/completions", {"messages": "hi"}, words="messages"),
    Case("messages empty", "/v1/chat/completions", {"messages": []}, words="messages"),
    Case("content a number", "/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, words="content"),
    Case(
        "an image part",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        words="text only",
    ),
    Case("tools given", "/v1/chat/completions", CHAT | {"tools": [{"type": "function"}]}, words="tools"),
    Case("top_logprobs without logprobs", "/v1/chat/completions", CHAT | {"top_logprobs": 3}, words="logprobs"),
    Case(
        "top_logprobs 50", "/v1/chat/completions", CHAT | {"logprobs": True, "top_logprobs": 50}, words="top_logprobs"
    ),
    Case(
        "response_format json_object",
        "/v1/chat/completions",
        CHAT | {"response_format": {"type": "json_object"}},
        words="response_format",
    ),
    Case(
        "chat_template_kwargs a string",
        "/v1/chat/completions",
        CHAT | {"chat_template_kwargs": "x"},
        words="chat_template_kwargs",
    ),
    Case("model a number", "/v1/chat/completions", CHAT | {"model": 5}, words="model"),
    # admin routes
    Case("update without model_path", "/update_weights_from_disk", {}, words="model_path"),
    Case("model_path a number", "/update_weights_from_disk", {"model_path": 5}, words="model_path"),
    Case(
        "model_path missing on disk", "/update_weights_from_disk", {"model_path": "/nonexistent"}, words="/nonexistent"
    ),
    Case("update with an unknown field", "/update_weights_from_disk", {"model_path": "/x", "mode": 1}, words="mode"),
    Case(
        "update with load_format pt",
        "/update_weights_from_disk",
        {"model_path": "/x", "load_format": "pt"},
        words="load_format",
    ),
    Case(
        "update asking is_async", "/update_weights_from_disk", {"model_path": "/x", "is_async": True}, words="is_async"
    ),
    Case(
        "generate asking routed experts",
        "/generate",
        {**GOOD, "return_routed_experts": True},
        words="return_routed_experts",
    ),
    Case("generate with a LoRA adapter", "/generate", {**GOOD, "lora_path": "a"}, words="lora_path"),
    Case("sampling with a regex", "/generate", {**GOOD, "sampling_params": {"regex": "a+"}}, words="regex"),
    Case("tensor update without tensors", "/update_weights_from_tensor", {}, words="serialized_named_tensors"),
    Case(
        "tensor update not base64", "/update_weights_from_tensor", {"serialized_named_tensors": ["%%"]}, words="base64"
    ),
    Case(
        "group with rank 0",
        "/init_weights_update_group",
        {"master_address": "127.0.0.1", "master_port": 1234, "rank_offset": 0, "world_size": 2},
        words="rank_offset",
    ),
    Case("group without an address", "/init_weights_update_group", {"master_port": 1}, words="master_address"),
    Case("broadcast to no group", "/update_weights_from_distributed", {"names": []}, words="group_name"),
    Case("leave no group", "/destroy_weights_update_group", {"group_name": "g"}, words="group_name"),
    Case("version missing", "/update_weight_version", {}, words="new_version"),
    Case("version a list", "/update_weight_version", {"new_version": [1]}, words="new_version"),
    Case("pause mode unknown", "/pause_generation", {"mode": "soon"}, words="mode"),
    Case("continue with an unknown field", "/continue_generation", {"now": True}, words="now"),
    Case("window selector unknown", "/begin_weight_update", {"selector": "draft"}, words="selector"),
    Case("release unknown tag", "/release_memory_occupation", {"tags": ["gpu"]}, words="tags"),
    Case("resume tags a string", "/resume_memory_occupation", {"tags": "weights"}, words="tags"),
    Case("abort rid a number", "/abort_request", {"rid": 5}, words="rid"),
    Case("abort with an unknown field", "/abort_request", {"request": "x"}, words="request"),
    # HTTP
    Case("GET on a POST route", "/generate", method="GET", status=405, words="POST"),
    Case("PUT on a POST route", "/generate", GOOD, method="PUT", status=405, words="POST"),
    Case("unknown route", "/nope", {}, status=404, words="no route"),
    Case(
        "Content-Length not a number",
        "/generate",
        raw=b"POST /generate HTTP/1.1\r\nAuthorization: Bearer k3y\r\nContent-Length: abc\r\n\r\n",
        words="Content-Length",
    ),
    Case(
        "chunked body",
        "/generate",
        status=411,
        words="Content-Length",
        raw=b"POST /generate HTTP/1.1\r\nAuthorization: Bearer k3y\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ),
    Case("body over the size limit", "/generate", b"{" + b" " * 200_000 + b"}", status=413, words="200002 bytes"),
    Case(
        "body shorter than Content-Length",
        "/generate",
        status=408,
        words="did not arrive",
        raw=b'POST /generate HTTP/1.1\r\nAuthorization: Bearer k3y\r\nContent-Length: 50\r\n\r\n{"input_ids"',
    ),
    Case("lone UTF-16 surrogate", "/generate", b'{"text": "\\ud800"}', words="surrogate"),
    Case("JSON nested 5,000 deep", "/generate", b"[" * 5_000 + b"]" * 5_000, words="nested"),
    Case("malformed request line", "/", raw=b"GET /a b HTTP/1.1\r\n\r\n", words="Bad request"),
    Case("no API key", "/generate", GOOD, status=401, words="Bearer", key=None),
    Case("wrong API key", "/v1/models", method="GET", status=401, words="Bearer", key="guess"),
]


def send(port: int, case: Case) -> tuple[int, dict]:
    """The answer to one case, over a fresh connection."""
    if case.raw is not None:
        data = case.raw
    else:
        body = (
            b"" if case.body is None else case.body if isinstance(case.body, bytes) else json.dumps(case.body).encode()
        )
        auth = f"Authorization: Bearer {case.key}\r\n" if case.key else ""
        head = f"{case.method} {case.path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: {len(body)}\r\n\r\n"
        data = head.encode() + body
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):  # answered before the whole body was read (413)
            pass
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def make_server(model) -> EngineServer:
    """The server the cases meet: no tokenizer, an API key, a 0.5 s read timeout and a 100 kB body limit."""
    engine = LLMEngine(model, EngineConfig(max_running_requests=8, max_num_batched_tokens=256, context_length=128))
    return EngineServer(
        engine, "127.0.0.1", 0, model_path="tiny", api_key=KEY, read_timeout=0.5, max_body_bytes=100_000
    ).start()


def table(answers: list[tuple[Case, int, str]]) -> str:
    def cell(text: str) -> str:
        text = text if len(text) <= 160 else text[:157] + "..."
        return text.replace("|", "\\|").replace("\n", " ")

    rows = ["| # | route | bad input | status | answer |", "| --- | --- | --- | --- | --- |"]
    for i, (case, status, message) in enumerate(answers, start=1):
        rows.append(f"| {i} | `{case.method} {case.path}` | {cell(case.what)} | {status} | {cell(message)} |")
    return "\n".join(rows)


def answers_of(server) -> list[tuple[Case, int, str]]:
    out = []
    for case in CASES:
        status, answer = send(server.port, case)
        out.append((case, status, answer["error"]["message"]))
    return out


def documented_table() -> str:
    text = DOC.read_text()
    return text[text.index(BEGIN) + len(BEGIN) : text.index(END)].strip()


def test_every_bad_input_gets_its_4xx_and_the_server_serves_on(model):
    server = make_server(model)
    try:
        before = send_good(server)
        answers = answers_of(server)
        for case, status, message in answers:
            assert status == case.status and case.words in message, (case, status, message)
        assert send_good(server) == before
        assert len(CASES) >= 60
        assert documented_table() == table(answers), (
            f"regenerate: {sys.executable} -m tests.engine.test_bad_inputs --write"
        )
    finally:
        server.shutdown()


def send_good(server) -> list[int]:
    status, answer = send(server.port, Case("good", "/generate", GOOD))
    assert status == 200, answer
    return answer["output_ids"]


@pytest.fixture(scope="module")
def model():
    from tests.models.test_forms import tiny_model

    return tiny_model().float()


def write_doc() -> None:
    from tests.models.test_forms import tiny_model

    server = make_server(tiny_model().float())
    try:
        rendered = table(answers_of(server))
    finally:
        server.shutdown()
    text = DOC.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    DOC.write_text(text[:start] + "\n" + rendered + "\n" + text[end:])
    print(f"wrote {DOC}: {len(CASES)} cases")


if __name__ == "__main__" and "--write" in sys.argv:
    write_doc()
