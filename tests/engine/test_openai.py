"""The OpenAI routes as standard clients use them (through the ``openai`` package where installed, else on the wire):
streaming (chunks, [DONE], usage), logprobs and top_logprobs, echo, stop, n, seed, penalties with their effect,
list-form content, /v1/models, an unknown model (404), the API key; and the HTTP layer's limits: read timeout,
body size, methods, malformed bodies, clients that leave."""

import http.client
import json
import socket
import time

import pytest

from league.engine.config import EngineConfig
from league.engine.engine import LLMEngine
from league.engine.request import SamplingParams
from league.engine.server import EngineServer
from tests.engine.test_server import CONFIG, TIMEOUT, model, post, reference, tokenizer  # noqa: F401

openai = pytest.importorskip("openai")


def start(model, tokenizer, **kw) -> EngineServer:  # noqa: F811
    engine = LLMEngine(model, EngineConfig(**CONFIG), tokenizer)
    return EngineServer(engine, "127.0.0.1", 0, model_path="/models/tiny", tokenizer=tokenizer, **kw).start()


@pytest.fixture(scope="module")
def server(model, tokenizer):  # noqa: F811
    server = start(model, tokenizer, served_model_name="tiny")
    yield server
    server.shutdown()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)


def greedy(model, tokenizer, prompt: list[int], **kw):  # noqa: F811
    return reference(model, tokenizer, [prompt], SamplingParams(temperature=0.0, **kw))[0]


def test_completion_echo_logprobs_and_streaming(server, client, model, tokenizer):  # noqa: F811
    expected = greedy(model, tokenizer, [5, 6, 7], max_new_tokens=6, ignore_eos=True)
    text = tokenizer.decode(expected.output_ids, skip_special_tokens=True)
    answer = client.completions.create(
        model="tiny", prompt="w5 w6 w7", max_tokens=6, temperature=0, logprobs=2, extra_body={"ignore_eos": True}
    )
    (choice,) = answer.choices
    assert choice.text == text and choice.finish_reason == "length"
    assert choice.logprobs.tokens == [tokenizer.decode([t]) for t in expected.output_ids]
    assert choice.logprobs.token_logprobs == pytest.approx(expected.output_logprobs, abs=1e-5)
    for token, top in zip(choice.logprobs.tokens, choice.logprobs.top_logprobs):
        assert token in top and len(top) in (2, 3) and max(top.values()) == top[token]  # greedy: chosen is best
    assert answer.usage.prompt_tokens == 3 and answer.usage.completion_tokens == 6 and answer.model == "tiny"
    echoed = client.completions.create(
        model="tiny",
        prompt=[5, 6, 7],
        max_tokens=6,
        temperature=0,
        logprobs=0,
        echo=True,
        extra_body={"ignore_eos": True},
    )
    (choice,) = echoed.choices
    assert choice.text == "w5 w6 w7" + text
    assert choice.logprobs.tokens[:3] == ["w5", "w6", "w7"] and choice.logprobs.token_logprobs[0] is None
    assert len(choice.logprobs.token_logprobs) == 9 and choice.logprobs.text_offset[:3] == [0, 2, 4]
    chunks = list(
        client.completions.create(
            model="tiny",
            prompt="w5 w6 w7",
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6


def test_n_seed_and_stop(server, client, model, tokenizer):  # noqa: F811
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=7)
    expected = reference(model, tokenizer, [[5, 6, 7]], params, n=2)
    answer = client.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=8, n=2, seed=7, temperature=1)
    assert [c.text for c in answer.choices] == [
        tokenizer.decode(e.output_ids, skip_special_tokens=True) for e in expected
    ]
    assert [c.index for c in answer.choices] == [0, 1]
    free = greedy(model, tokenizer, [5, 6, 7, 8, 9], max_new_tokens=12, ignore_eos=True)
    words = tokenizer.decode(free.output_ids).split()
    stop = words[len(words) // 2]
    body = dict(
        model="tiny", prompt=[5, 6, 7, 8, 9], max_tokens=12, temperature=0, stop=[stop], extra_body={"ignore_eos": True}
    )
    plain = client.completions.create(**body).choices[0]
    assert plain.finish_reason == "stop" and stop not in plain.text and plain.text
    streamed = "".join(c.choices[0].text for c in client.completions.create(**body, stream=True) if c.choices)
    assert streamed == plain.text


def test_penalties_take_effect(server, client, model, tokenizer):  # noqa: F811
    """The OpenAI penalties (and SGLang's repetition_penalty) give the engine's penalized tokens (whose effect
    tests/engine/test_penalties.py checks by hand); on this model the repetition penalty changes them."""
    plain = greedy(model, tokenizer, [5, 6, 7], max_new_tokens=10, ignore_eos=True)
    body = dict(model="tiny", prompt=[5, 6, 7], max_tokens=10, temperature=0)
    cases = [(dict(presence_penalty=1.5, frequency_penalty=-0.5), {}), ({}, dict(repetition_penalty=2.0))]
    for openai_kw, extra in cases:
        expected = greedy(model, tokenizer, [5, 6, 7], max_new_tokens=10, ignore_eos=True, **openai_kw, **extra)
        answer = client.completions.create(**body, **openai_kw, extra_body={"ignore_eos": True, **extra})
        assert answer.choices[0].text == tokenizer.decode(expected.output_ids, skip_special_tokens=True)
    assert expected.output_ids != plain.output_ids


def test_chat_list_content_logprobs_and_streaming(server, client, model, tokenizer):  # noqa: F811
    expected = greedy(model, tokenizer, [2, 8, 9, 3], max_new_tokens=6, ignore_eos=True)
    text = tokenizer.decode(expected.output_ids, skip_special_tokens=True)
    parts = [{"type": "text", "text": "w8 "}, {"type": "text", "text": "w9"}]
    extra = {"ignore_eos": True}
    for content in ("w8 w9", parts):
        answer = client.chat.completions.create(
            model="/models/tiny",
            messages=[{"role": "user", "content": content}],
            max_tokens=6,
            temperature=0,
            logprobs=True,
            top_logprobs=3,
            extra_body=extra,
        )
        (choice,) = answer.choices
        assert choice.message.content == text and choice.message.role == "assistant"
        assert [c.token for c in choice.logprobs.content] == [tokenizer.decode([t]) for t in expected.output_ids]
        assert all(len(c.top_logprobs) == 3 and c.top_logprobs[0].token == c.token for c in choice.logprobs.content)
        assert choice.logprobs.content[0].bytes == list(choice.logprobs.content[0].token.encode())
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": parts}],
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=extra,
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.prompt_tokens == 4 and chunks[-1].usage.completion_tokens == 6


def test_models_and_unknown_model(server, client):
    assert sorted(m.id for m in client.models.list()) == ["/models/tiny", "tiny"]
    with pytest.raises(openai.NotFoundError, match="gpt-4o"):
        client.completions.create(model="gpt-4o", prompt="w5", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "w5"}],
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
        )
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "w5"}], top_logprobs=2)
    answer = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "w5"}],
        max_tokens=2,
        tools=[],
        response_format={"type": "text"},
    )
    assert answer.choices[0].message.content is not None


def test_api_key(model, tokenizer):  # noqa: F811
    server = start(model, tokenizer, api_key="s3cret")
    try:
        good = openai.OpenAI(base_url=server.url + "/v1", api_key="s3cret", max_retries=0, timeout=TIMEOUT)
        bad = openai.OpenAI(base_url=server.url + "/v1", api_key="guess", max_retries=0, timeout=TIMEOUT)
        assert good.completions.create(model="/models/tiny", prompt="w5", max_tokens=2).choices
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model="/models/tiny", prompt="w5", max_tokens=2)
        status, answer = post(server, "/generate", {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 2}})
        assert status == 401 and "Authorization: Bearer" in answer["error"]["message"]
        assert post(server, "/health", b"", method="GET")[0] == 200
    finally:
        server.shutdown()


def raw(server, data: bytes) -> tuple[int, dict]:
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_http_limits_answer_json_4xx(model, tokenizer):  # noqa: F811
    server = start(model, tokenizer, read_timeout=0.5, max_body_bytes=1000)
    try:
        status, answer = raw(server, b'POST /generate HTTP/1.1\r\nContent-Length: 50\r\n\r\n{"input_ids"')
        assert status == 408 and "0.5 s" in answer["error"]["message"]
        status, answer = post(server, "/generate", b"{" + b" " * 2000 + b"}")
        assert status == 413 and "1000" in answer["error"]["message"]
        status, answer = raw(server, b"POST /generate HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        assert status == 411
        status, answer = raw(server, b"POST /generate HTTP/1.1\r\nContent-Length: abc\r\n\r\n")
        assert status == 400 and "Content-Length" in answer["error"]["message"]
        status, answer = raw(server, b"GET /a b HTTP/1.1\r\n\r\n")
        assert status == 400 and "error" in answer
        status, answer = post(server, "/generate", {"input_ids": [5]}, method="PUT")
        assert status == 405 and "POST" in answer["error"]["message"]
        status, answer = post(server, "/generate", b'{"text": "\\ud800"}')
        assert status == 400 and "surrogate" in answer["error"]["message"]
        assert post(server, "/health", b"", method="GET")[0] == 200
    finally:
        server.shutdown()


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_aborts_its_request(server, stream):
    engine = server.engine
    generated = engine.stats.generated_tokens
    body = {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 120, "ignore_eos": True}, "stream": stream}
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)
    conn.request("POST", "/generate", body=json.dumps(body))
    deadline = time.monotonic() + TIMEOUT
    while not engine.scheduler.running and time.monotonic() < deadline:
        time.sleep(0.005)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    while engine.scheduler.running and time.monotonic() < deadline:
        time.sleep(0.005)
    assert not engine.scheduler.running
    assert engine.stats.generated_tokens - generated < 120
