"""The HTTP server and client: tokens over HTTP equal the in-process engine's (64 concurrent requests,
greedy and seeded sampling, n samples, streaming, speculative counters); bad input gets a 400 that names
the field and the server keeps serving; abort; the admin routes; OpenAI-style completions and chat."""

import http.client
import json
import threading
import time

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from league.engine.client import EngineClient, EngineServerError
from league.engine.config import EngineConfig
from league.engine.engine import LLMEngine
from league.engine.request import SamplingParams
from league.engine.server import EngineServer, build_server
from league.tokenizer import load_tokenizer
from tests.models.test_forms import tiny_model

CONFIG = dict(max_running_requests=16, max_num_batched_tokens=256, context_length=128)
# the bare server: no tokenizer, MTP speculation, room for long requests to abort
BARE = dict(max_running_requests=4, max_num_batched_tokens=256, context_length=1024, speculative_algorithm="EAGLE")
FIRST_WORDS = ["<unk>", "<|eos|>", "user", "assistant"]  # the chat template's role words are ids 2 and 3
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}{{ 'assistant' }}"
TIMEOUT = 60


@pytest.fixture(scope="module")
def model():
    return tiny_model().float()


@pytest.fixture(scope="module")
def tokenizer(model, tmp_path_factory):
    """A word-level tokenizer over the tiny vocabulary: FIRST_WORDS, then w4, w5, ..."""
    vocab = {word: i for i, word in enumerate(FIRST_WORDS + [f"w{i}" for i in range(4, model.args.vocab_size)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<|eos|>")
    tok.chat_template = CHAT_TEMPLATE
    folder = tmp_path_factory.mktemp("tokenizer")
    tok.save_pretrained(folder)
    return load_tokenizer(str(folder))


def start(model, tokenizer, config: dict) -> EngineServer:
    engine = LLMEngine(model, EngineConfig(**config), tokenizer)
    return EngineServer(engine, "127.0.0.1", 0, model_path="tiny-model", tokenizer=tokenizer).start()


@pytest.fixture(scope="module")
def server(model, tokenizer):
    server = start(model, tokenizer, CONFIG)
    yield server
    server.shutdown()


@pytest.fixture(scope="module")
def bare(model):
    server = start(model, None, BARE)
    yield server
    server.shutdown()


@pytest.fixture(scope="module")
def client(server):
    return EngineClient(server.url, timeout=TIMEOUT)


def reference(model, tokenizer, prompts, params, n=1, config=CONFIG):
    return LLMEngine(model, EngineConfig(**config), tokenizer).generate(prompts, params, n=n)


def workload(vocab: int, count: int = 64):
    gen = torch.Generator().manual_seed(5)
    lengths = torch.randint(1, 40, (count,), generator=gen).tolist()
    prompts = [torch.randint(4, vocab, (n,), generator=gen).tolist() for n in lengths]
    params = [
        SamplingParams(max_new_tokens=4 + i % 13, temperature=0.0)
        if i % 2
        else SamplingParams(max_new_tokens=4 + i % 13, temperature=0.9, top_p=0.9, top_k=40 if i % 4 else -1, seed=i)
        for i in range(count)
    ]
    return prompts, params


def post(server, path: str, body, method: str = "POST") -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request(method, path, body=None if method == "GET" else data, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    status, answer = response.status, json.loads(response.read())
    conn.close()
    return status, answer


def open_stream(server, body: dict) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)
    conn.request("POST", "/generate", body=json.dumps({**body, "stream": True}))
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("Content-Type") == "text/event-stream"
    return response


def next_event(response: http.client.HTTPResponse) -> dict | None:
    """The next server-sent event, or None at ``data: [DONE]``."""
    line = response.readline()
    while line == b"\n":
        line = response.readline()
    assert line.startswith(b"data: "), line
    payload = line[len(b"data: ") :].strip()
    return None if payload == b"[DONE]" else json.loads(payload)


def all_events(response: http.client.HTTPResponse, limit: int = 10_000) -> list[dict]:
    events = []
    for _ in range(limit):
        event = next_event(response)
        if event is None:
            return events
        events.append(event)
    raise AssertionError("the stream did not end")


def test_64_concurrent_requests_match_the_in_process_engine(server, client, model, tokenizer):
    prompts, params = workload(model.args.vocab_size)
    expected = reference(model, tokenizer, prompts, params)
    passes_before = server.engine.stats.forward_passes
    got = client.generate(prompts, params)
    assert [o.output_ids for o in got] == [o.output_ids for o in expected]
    assert [o.finish_reason for o in got] == [o.finish_reason for o in expected]
    assert {"stop", "length"} <= {o.finish_reason for o in got}
    for g, e, p in zip(got, expected, prompts):
        assert g.prompt_ids == p
        assert torch.allclose(torch.tensor(g.output_logprobs), torch.tensor(e.output_logprobs), atol=1e-4)
        assert g.text == tokenizer.decode(e.output_ids, skip_special_tokens=True)
    assert len({o.rid for o in got}) == len(got)
    # the requests were batched together: far fewer forwards than generated tokens
    assert server.engine.stats.forward_passes - passes_before < sum(len(o.output_ids) for o in got) / 4


def test_n_samples_and_text_prompts(server, client, model, tokenizer):
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
    params = SamplingParams(max_new_tokens=6, temperature=1.0, seed=3)
    expected = reference(model, tokenizer, prompts, params, n=3)
    assert [o.output_ids for o in client.generate(prompts, params, n=3)] == [o.output_ids for o in expected]
    status, answer = post(server, "/generate", {"text": ["w5 w6 w7", "w9 w10 w11 w12 w13"], "sampling_params": {}})
    assert status == 200 and len(answer) == 2
    assert answer[0]["meta_info"]["prompt_tokens"] == 3 and answer[1]["meta_info"]["prompt_tokens"] == 5
    single = dict(input_ids=[5, 6, 7], sampling_params=dict(max_new_tokens=6, temperature=1.0, sampling_seed=3, n=3))
    status, answer = post(server, "/generate", single)
    assert status == 200 and [a["output_ids"] for a in answer] == [o.output_ids for o in expected[:3]]


def test_streaming_returns_the_same_tokens(server, model, tokenizer):
    prompts = [[5, 6, 7, 8], [20, 21]]
    sampling = dict(max_new_tokens=12, temperature=0.8, seed=17, ignore_eos=True)
    expected = reference(model, tokenizer, prompts, SamplingParams(**sampling))
    events = all_events(open_stream(server, dict(input_ids=prompts, sampling_params=sampling, return_logprob=True)))
    for index, exp in enumerate(expected):
        mine = [e for e in events if e["index"] == index]
        assert len(mine) > 1 and all(e["meta_info"]["finish_reason"] is None for e in mine[:-1])
        assert all(exp.output_ids[: len(e["output_ids"])] == e["output_ids"] for e in mine)
        assert mine[-1]["output_ids"] == exp.output_ids
        assert mine[-1]["meta_info"]["finish_reason"] == {"type": "length", "length": 12}
        assert [t for _, t, _ in mine[-1]["meta_info"]["output_token_logprobs"]] == exp.output_ids


def test_speculative_counters_and_greedy_tokens(bare, model):
    prompts = [[5, 6, 7], [30, 31, 32, 33, 34, 35]]
    params = SamplingParams(max_new_tokens=20, temperature=0.0, ignore_eos=True)
    expected = reference(model, None, prompts, params, config=BARE)
    got = EngineClient(bare.url, timeout=TIMEOUT).generate(prompts, params)
    assert [o.output_ids for o in got] == [o.output_ids for o in expected]
    for g, e in zip(got, expected):
        assert g.spec == e.spec and g.spec.verify_steps > 0 and g.spec.draft_tokens == 2 * g.spec.verify_steps
        assert g.text == ""


GOOD = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 2, "temperature": 0}}
BAD_INPUTS = [
    (b'{"input_ids": [1, 2', "JSON"),
    (b"[1, 2]", "JSON object"),
    ({**GOOD, "colour": "red"}, "colour"),
    ({**GOOD, "sampling_params": {"max_new_tokens": 2, "beam_width": 4}}, "beam_width"),
    ({**GOOD, "sampling_params": {"max_new_tokens": -1}}, "max_new_tokens"),
    ({**GOOD, "sampling_params": {"max_new_tokens": 10**9}}, "max_new_tokens"),
    ({**GOOD, "sampling_params": {"max_new_tokens": 126}}, "max_new_tokens"),
    ({"input_ids": [5] * 128}, "input_ids"),
    ({"input_ids": [5, 96, 7]}, "input_ids"),
    ({"input_ids": [[5, 6], [5, -1]]}, "input_ids"),
    ({"input_ids": "w5 w6"}, "input_ids"),
    ({"input_ids": []}, "input_ids"),
    ({**GOOD, "sampling_params": {"temperature": "hot"}}, "temperature"),
    ({**GOOD, "sampling_params": {"top_p": 0}}, "top_p"),
    ({**GOOD, "sampling_params": {"n": 0}}, "n"),
    ({**GOOD, "sampling_params": {"stop_token_ids": 3}}, "stop_token_ids"),
    ({**GOOD, "sampling_params": {"repetition_penalty": 3}}, "repetition_penalty"),
    ({**GOOD, "return_logprob": "yes"}, "return_logprob"),
    ({**GOOD, "text": "w5"}, "text"),
    ({**GOOD, "rid": 7}, "rid"),
    ({"sampling_params": {}}, "input_ids"),
]


@pytest.mark.parametrize("body, field", BAD_INPUTS, ids=[f for _, f in BAD_INPUTS])
def test_bad_input_gets_a_400_naming_the_field(server, client, body, field):
    status, answer = post(server, "/generate", body)
    assert status == 400 and field in answer["error"]["message"], answer
    assert client.generate([[5, 6, 7]], SamplingParams(max_new_tokens=2, temperature=0))[0].output_ids


def test_client_raises_the_servers_message(server, client, bare):
    with pytest.raises(EngineServerError, match="max_new_tokens") as info:
        client.generate([[5, 6]], SamplingParams(max_new_tokens=500))
    assert info.value.status == 400
    status, answer = post(bare, "/generate", {"text": "w5 w6"})
    assert status == 400 and "text" in answer["error"]["message"] and "tokenizer" in answer["error"]["message"]
    status, answer = post(bare, "/v1/chat/completions", {"messages": [{"role": "user", "content": "w5"}]})
    assert status == 400 and "chat template" in answer["error"]["message"]
    assert post(server, "/no_such_route", {})[0] == 404


def test_abort_request_ends_a_running_request(bare):
    body = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 1000, "ignore_eos": True}, "rid": "long"}
    response = open_stream(bare, body)
    first = next_event(response)
    assert first["meta_info"]["finish_reason"] is None and first["meta_info"]["id"] == "long"
    assert post(bare, "/abort_request", {"rid": "long"}) == (200, {"success": True, "num_aborted": 1})
    last = all_events(response)[-1]
    assert last["meta_info"]["finish_reason"]["type"] == "abort"
    assert len(first["output_ids"]) <= len(last["output_ids"]) < 1000


def test_abort_all_returns_partial_outputs_to_waiting_clients(bare):
    client = EngineClient(bare.url, timeout=TIMEOUT)
    results = []
    params = SamplingParams(max_new_tokens=1000, ignore_eos=True, seed=1)
    thread = threading.Thread(target=lambda: results.extend(client.generate([[5, 6], [7, 8, 9]], params, n=2)))
    thread.start()
    deadline = time.monotonic() + TIMEOUT
    while len(bare.engine.scheduler.running) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert client.abort_all() == 4
    thread.join(TIMEOUT)
    assert [o.finish_reason for o in results] == ["abort"] * 4
    assert all(len(o.output_ids) < 1000 for o in results)
    assert client.abort("nothing-by-this-id") == 0


def test_health_model_info_flush_cache(server, client):
    assert client.health()
    info = client.model_info()
    assert info["model_path"] == "tiny-model" and info["is_generation"] is True
    assert info["model_args"]["vocab_size"] == 96 and info["context_length"] == 128
    client.generate([[5, 6, 7, 8] * 10], SamplingParams(max_new_tokens=4, temperature=0))
    before = client.server_info()["internal_states"][0]
    assert before["radix_cache"] and before["cache_blocks"] > 0 and before["blocks_total"] > 0
    assert "empty" in client.flush_cache()["message"]
    after = client.server_info()["internal_states"][0]
    assert after["cache_blocks"] == 0 and after["blocks_in_use"] == 0
    status, models_answer = post(server, "/v1/models", b"", method="GET")
    assert status == 200 and models_answer["data"][0]["max_model_len"] == 128
    assert not EngineClient("http://127.0.0.1:1", timeout=5).health()


def test_v1_completions_and_chat(server, model, tokenizer):
    prompts = [[5, 6, 7], [2, 8, 9, 3]]  # the second is the chat template's rendering of the message below
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    expected = reference(model, tokenizer, prompts, params)
    texts = [tokenizer.decode(e.output_ids, skip_special_tokens=True) for e in expected]
    for prompt in ([5, 6, 7], "w5 w6 w7"):
        status, answer = post(
            server, "/v1/completions", {"prompt": prompt, "max_tokens": 6, "temperature": 0, "logprobs": 1}
        )
        choice = answer["choices"][0]
        assert status == 200 and choice["text"] == texts[0] and choice["finish_reason"] == expected[0].finish_reason
        assert len(choice["logprobs"]["token_logprobs"]) == len(expected[0].output_ids)
        assert answer["usage"]["prompt_tokens"] == 3
    chat = {"messages": [{"role": "user", "content": "w8 w9"}], "max_tokens": 6, "temperature": 0}
    status, answer = post(server, "/v1/chat/completions", chat | {"model": "tiny-model"})
    assert status == 200 and answer["choices"][0]["message"]["content"] == texts[1]
    assert answer["usage"]["prompt_tokens"] == 4
    status, answer = post(server, "/v1/chat/completions", chat | {"model": "gpt-4o"})
    assert status == 404 and answer["error"]["param"] == "model" and "gpt-4o" in answer["error"]["message"]
    status, answer = post(server, "/v1/completions", {"prompt": [5], "max_tokens": 2, "best_of": 3})
    assert status == 400 and "best_of" in answer["error"]["message"]


def test_build_server_and_update_weights_from_disk(model, tmp_path):
    from league.checkpoint import hf

    other = tiny_model(seed=9).float()
    hf.save_hf(model, str(tmp_path / "first"))
    hf.save_hf(other, str(tmp_path / "second"))
    prompts, params = [[5, 6, 7, 8]], SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
    expected = [reference(m, None, prompts, params)[0].output_ids for m in (model, other)]
    assert expected[0] != expected[1]
    config = EngineConfig(**CONFIG)
    server = build_server(str(tmp_path / "first"), "127.0.0.1", 0, config, device="cpu", dtype="float32").start()
    try:
        client = EngineClient(server.url, timeout=TIMEOUT)
        assert client.model_info()["model_path"] == str(tmp_path / "first")
        assert client.generate(prompts, params)[0].output_ids == expected[0]
        assert client.update_weights_from_disk(str(tmp_path / "second"))["success"] is True
        assert client.generate(prompts, params)[0].output_ids == expected[1]
        with pytest.raises(EngineServerError) as info:
            client.update_weights_from_disk(str(tmp_path / "missing"))
        assert info.value.status == 400
    finally:
        server.shutdown()


def test_weight_updates_of_another_architecture_change_nothing(model, tmp_path):
    """8 layers into a 4-layer server, an extra tensor, an integer tensor: 400 naming the difference, and the
    server keeps generating with its own weights."""
    from safetensors.torch import load_file, save_file

    from league.checkpoint import hf
    from league.models.qwen3_5_moe import ModelArgs, Transformer
    from tests.conftest import hf_text_config

    deeper_args = ModelArgs.from_hf_config(hf_text_config("gqa2_interval2", num_hidden_layers=8).to_dict())
    assert model.args.num_layers == 4
    deeper = Transformer(deeper_args)
    deeper.init_weights(1)
    hf.save_hf(deeper, str(tmp_path / "deeper"))
    hf.save_hf(model, str(tmp_path / "extra"))
    hf.save_hf(model, str(tmp_path / "ints"))
    for folder, change in (("extra", "model.layers.9.mlp.gate.weight"), ("ints", None)):
        (file,) = (tmp_path / folder).glob("*.safetensors")
        tensors = load_file(file)
        if change:
            tensors[change] = torch.zeros(3)
        else:
            tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.int32)
        save_file(tensors, file, metadata={"format": "pt"})
    server = start(model, None, CONFIG)
    try:
        prompts, params = [[5, 6, 7, 8]], SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
        expected = reference(model, None, prompts, params)[0].output_ids
        client = EngineClient(server.url, timeout=TIMEOUT)
        for folder, words in (("deeper", "num_layers 8"), ("extra", "model.layers.9"), ("ints", "I32")):
            status, answer = post(server, "/update_weights_from_disk", {"model_path": str(tmp_path / folder)})
            assert status == 400 and answer["success"] is False and words in answer["message"], answer
            assert client.generate(prompts, params)[0].output_ids == expected
    finally:
        server.shutdown()


def test_stop_strings_are_matched_and_trimmed(server, model, tokenizer):
    prompt = [5, 6, 7, 8, 9]
    free = reference(model, tokenizer, [prompt], SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True))
    words = tokenizer.decode(free[0].output_ids).split()
    stop = words[len(words) // 2]
    params = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True, stop=[stop])
    expected = reference(model, tokenizer, [prompt], params)[0]
    assert expected.finish_reason == "stop"
    sampling = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True, "stop": stop}
    for no_stop_trim in (False, True):
        body = {"input_ids": prompt, "sampling_params": sampling | {"no_stop_trim": no_stop_trim}}
        status, answer = post(server, "/generate", body)
        assert status == 200 and answer["output_ids"] == expected.output_ids
        assert answer["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
        assert answer["text"].endswith(stop) == no_stop_trim


def test_shutdown_stops_the_engine_thread_and_answers_waiting_requests(model):
    server = start(model, None, BARE)
    client, errors = EngineClient(server.url, timeout=TIMEOUT), []
    assert client.health()

    def wait_for_long_request():
        try:
            client.generate([[5, 6]], SamplingParams(max_new_tokens=1000, ignore_eos=True))
        except EngineServerError as e:
            errors.append(e)

    waiting = threading.Thread(target=wait_for_long_request)
    waiting.start()
    deadline = time.monotonic() + TIMEOUT
    while server.engine.stats.generated_tokens == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    engine_thread = server.worker._thread
    server.shutdown()
    waiting.join(TIMEOUT)
    assert not engine_thread.is_alive() and not client.health()
    assert [e.status for e in errors] == [503] and "shutting down" in errors[0].message
