"""The server as a reference-system rollout engine: /generate bodies built as SGLang's API and miles' rollout build
them (default, legacy and eval paths; written from their field definitions), every meta_info field, and the
control plane with real effects: weight version, pause / continue, update windows, weight updates by tensor
reference and by broadcast group (outputs become the new weights' exactly), release / resume of memory (outputs
unchanged), and a 4xx with a message for bad bodies on each route while the server stays up."""

import socket
import threading
import time

import pytest
import torch

from league.checkpoint.qwen3_5_moe import to_hf
from league.engine import weight_sync
from league.engine.config import EngineConfig
from league.engine.engine import LLMEngine
from league.engine.request import SamplingParams
from league.engine.server import EngineServer
from tests.engine.test_server import TIMEOUT, all_events, open_stream, post
from tests.models.test_forms import tiny_model

CONFIG = dict(max_running_requests=8, max_num_batched_tokens=256, context_length=256, speculative_algorithm="EAGLE")
PROMPT = [5, 6, 7, 8]
GREEDY = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    return tiny_model().float()


@pytest.fixture()
def server(model):
    """A server over its own copy of the model (weight updates change it)."""
    own = tiny_model().float()
    own.load_state_dict(model.state_dict())
    server = EngineServer(LLMEngine(own, EngineConfig(**CONFIG)), "127.0.0.1", 0, model_path="tiny-model").start()
    yield server
    server.shutdown()


def expected_ids(model, prompt=PROMPT, params=GREEDY) -> list[int]:
    return LLMEngine(model, EngineConfig(**CONFIG)).generate([prompt], params)[0].output_ids


def miles_sampling_params(max_new_tokens: int = 8) -> dict:
    """The sampling_params miles' rollout sends (GenerateState): all of its keys, greedy here."""
    return {
        "temperature": 0.0,
        "top_p": 1.0,
        "top_k": -1,
        "max_new_tokens": max_new_tokens,
        "stop": None,
        "stop_token_ids": None,
        "skip_special_tokens": True,
        "no_stop_trim": True,
        "spaces_between_special_tokens": False,
    }


def generate(server, body: dict) -> dict:
    status, answer = post(server, "/generate", body)
    assert status == 200, answer
    return answer


def test_miles_default_legacy_and_eval_bodies(server, model):
    expected = expected_ids(model)
    legacy = {"input_ids": PROMPT, "sampling_params": miles_sampling_params(), "return_logprob": True}
    default = legacy | {"return_routed_experts": False, "return_indexer_topk": False}
    evaluation = legacy | {"sampling_params": miles_sampling_params() | {"sampling_seed": 7, "top_k": 1 << 30}}
    for body in (legacy, default, evaluation):
        answer = generate(server, body)
        meta = answer["meta_info"]
        assert answer["output_ids"] == expected
        assert [entry[1] for entry in meta["output_token_logprobs"]] == expected  # how miles reads the tokens
        assert all(isinstance(e[0], float) and e[2] is None for e in meta["output_token_logprobs"])
        assert meta["output_token_logprobs_length"] == len(expected)
        assert meta["finish_reason"] == {"type": "length", "length": 8}
        assert meta["prompt_tokens"] == 4 and meta["completion_tokens"] == 8 and meta["cached_tokens"] == 0
        assert meta["weight_version"] == "default" and meta["num_retractions"] == 0
        assert meta["e2e_latency"] > 0
        steps = server.engine.config.num_spec_steps
        assert meta["spec_verify_ct"] > 0 and meta["spec_draft_token_num"] == steps * meta["spec_verify_ct"]
        assert meta["spec_num_proposed_drafts"] == meta["spec_draft_token_num"]
        assert meta["spec_num_correct_drafts"] == meta["spec_accept_token_num"]


def test_top_and_prompt_logprobs_prompt_ids_and_streaming(server, model):
    body = {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 4, "temperature": 0}, "return_logprob": True}
    answer = generate(server, body | {"logprob_start_len": 0, "top_logprobs_num": 2, "return_prompt_token_ids": True})
    meta = answer["meta_info"]
    assert answer["prompt_token_ids"] == PROMPT
    assert [e[1] for e in meta["input_token_logprobs"]] == PROMPT and meta["input_token_logprobs"][0][0] is None
    assert len(meta["output_top_logprobs"]) == 4 and all(len(top) == 2 for top in meta["output_top_logprobs"])
    # greedy: the token drawn is the most likely one
    assert [top[0][1] for top in meta["output_top_logprobs"]] == answer["output_ids"]
    events = all_events(open_stream(server, body))
    assert all(e["meta_info"]["weight_version"] == "default" for e in events)
    assert events[-1]["output_ids"] == answer["output_ids"] and "e2e_latency" in events[-1]["meta_info"]
    assert all(e["meta_info"]["finish_reason"] is None for e in events[:-1])


def test_fields_that_ask_nothing_pass_and_the_rest_are_named(server):
    base = {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 2}}
    inert = {"lora_path": None, "image_data": None, "return_hidden_states": False, "log_metrics": True}
    inert |= {"routed_experts_start_len": 0, "custom_logit_processor": None, "extra_key": "run-3", "priority": None}
    inert |= {"data_parallel_rank": None, "session_params": None, "token_ids_logprob": None, "return_entropy": False}
    assert post(server, "/generate", base | inert)[0] == 200
    sampling = base["sampling_params"] | {"json_schema": None, "stream_interval": 1, "custom_params": None}
    assert post(server, "/generate", base | {"sampling_params": sampling})[0] == 200
    status, answer = post(server, "/generate", base | {"return_routed_experts": True})  # needs the engine option
    assert status == 400 and "--enable-return-routed-experts" in answer["error"]["message"]
    for field, value in (
        ("return_indexer_topk", True),
        ("lora_path", "adapter"),
        ("image_data", ["x.png"]),
        ("return_hidden_states", True),
        ("bootstrap_host", "10.0.0.1"),
        ("token_ids_logprob", [5]),
    ):
        status, answer = post(server, "/generate", base | {field: value})
        assert status == 400 and field in answer["error"]["message"] and "not supported" in answer["error"]["message"]
    for key, value in (("regex", "a+"), ("custom_params", {"return_top_p_token_ids": True}), ("stream_interval", 4)):
        status, answer = post(server, "/generate", base | {"sampling_params": base["sampling_params"] | {key: value}})
        assert status == 400 and key in answer["error"]["message"]
    status, answer = post(server, "/generate", base | {"return_routed_expert": True})  # not SGLang's name
    assert status == 400 and "unknown fields" in answer["error"]["message"]
    assert post(server, "/generate", base)[0] == 200


def test_info_routes_and_weight_version(server):
    for path in ("/get_server_info", "/server_info"):
        status, info = post(server, path, b"", method="GET")
        assert status == 200 and info["speculative_algorithm"] == "EAGLE" and info["max_running_requests"] == 8
        assert info["internal_states"][0]["num_running_requests"] == 0 and info["weight_version"] == "default"
    for path in ("/get_model_info", "/model_info"):
        status, info = post(server, path, b"", method="GET")
        assert status == 200 and info["model_path"] == "tiny-model" and info["weight_version"] == "default"
    assert post(server, "/health_generate", b"", method="GET")[0] == 200
    status, answer = post(server, "/update_weight_version", {"new_version": "7", "abort_all_requests": False})
    assert status == 200 and answer["new_version"] == "7" and answer["success"]
    assert post(server, "/get_weight_version", b"", method="GET") == (200, {"weight_version": "7"})
    answer = generate(server, {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 1}})
    assert answer["meta_info"]["weight_version"] == "7"
    for body in ({}, {"new_version": ["7"]}, {"new_version": "8", "bogus": 1}):
        status, answer = post(server, "/update_weight_version", body)
        assert status == 400 and answer["error"]["message"]


def wait_for(predicate, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def in_thread(server, body: dict) -> tuple[threading.Thread, list]:
    results: list = []
    thread = threading.Thread(target=lambda: results.append(post(server, "/generate", body)))
    thread.start()
    return thread, results


@pytest.mark.parametrize("mode", ["in_place", "retract"])
def test_pause_holds_requests_and_continue_finishes_them(server, model, mode):
    long = {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 60, "temperature": 0, "ignore_eos": True}}
    thread, results = in_thread(server, long)
    wait_for(lambda: server.engine.scheduler.running)
    assert post(server, "/pause_generation", {"mode": mode})[0] == 200
    held = sum(len(r.output_ids) for r in server.engine.scheduler.running)
    late, late_results = in_thread(server, {"input_ids": [9, 10], "sampling_params": {"max_new_tokens": 3}})
    time.sleep(0.5)
    assert not results and not late_results  # nothing finishes while paused
    assert sum(len(r.output_ids) for r in server.engine.scheduler.running) == held
    assert post(server, "/continue_generation", {})[0] == 200
    thread.join(TIMEOUT), late.join(TIMEOUT)
    status, answer = results[0]
    assert status == 200 and answer["output_ids"] == expected_ids(
        model, params=SamplingParams(**long["sampling_params"])
    )
    assert late_results[0][0] == 200 and len(late_results[0][1]["output_ids"]) == 3


def test_pause_abort_ends_requests_in_flight(server):
    long = {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 200, "ignore_eos": True}}
    thread, results = in_thread(server, long)
    wait_for(lambda: server.engine.scheduler.running)
    assert post(server, "/pause_generation", {})[0] == 200  # SGLang's default mode: abort
    thread.join(TIMEOUT)
    status, answer = results[0]
    assert status == 200 and answer["meta_info"]["finish_reason"]["type"] == "abort"
    assert len(answer["output_ids"]) < 200
    assert post(server, "/continue_generation", {"torch_empty_cache": True})[0] == 200
    status, answer = post(server, "/pause_generation", {"mode": "later"})
    assert status == 400 and "mode" in answer["error"]["message"]


def hf_named(model) -> list[tuple[str, torch.Tensor]]:
    return list(to_hf({k: v.detach() for k, v in model.state_dict().items()}).items())


@pytest.mark.parametrize("load_format", [None, "flattened_bucket"])
def test_update_weights_from_tensor_gives_the_new_weights_outputs(server, model, load_format):
    other = tiny_model(seed=9).float()
    before, after = expected_ids(model), expected_ids(other)
    assert before != after
    assert generate(server, {"input_ids": PROMPT, "sampling_params": GREEDY_JSON})["output_ids"] == before
    named = hf_named(other)
    payload = weight_sync.flatten_bucket(named) if load_format else named
    body = {"serialized_named_tensors": [weight_sync.serialize(payload)], "load_format": load_format}
    for window in ("/pause_generation", "/begin_weight_update"):
        assert (
            post(server, window, {"mode": "retract"} if window == "/pause_generation" else {"selector": "all"})[0]
            == 200
        )
    status, answer = post(server, "/update_weights_from_tensor", body | {"weight_version": "2", "flush_cache": False})
    assert status == 200 and answer["success"], answer
    for window in ("/end_weight_update", "/continue_generation"):
        assert post(server, window, {})[0] == 200
    answer = generate(server, {"input_ids": PROMPT, "sampling_params": GREEDY_JSON})
    assert answer["output_ids"] == after and answer["meta_info"]["weight_version"] == "2"


GREEDY_JSON = {"max_new_tokens": 8, "temperature": 0.0, "ignore_eos": True}


def test_update_weights_from_tensor_bad_bodies(server, model):
    good = weight_sync.serialize(hf_named(model)[:1])
    bad_shape = weight_sync.serialize([("model.norm.weight", torch.zeros(3))])
    for body, words in (
        ({}, "serialized_named_tensors"),
        ({"serialized_named_tensors": ["not base64!"]}, "base64"),
        ({"serialized_named_tensors": [good], "load_format": "zip"}, "load_format"),
        ({"serialized_named_tensors": [bad_shape]}, "shape"),
        ({"serialized_named_tensors": [weight_sync.serialize([("nope", torch.zeros(1))])]}, "nope"),
        ({"serialized_named_tensors": [weight_sync.serialize({"x": print})]}, "tensors only"),
    ):
        status, answer = post(server, "/update_weights_from_tensor", body)
        assert status == 400 and words in answer["error"]["message"], answer
    assert generate(server, {"input_ids": PROMPT, "sampling_params": GREEDY_JSON})["output_ids"] == expected_ids(model)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_update_weights_from_distributed_by_a_gloo_group(server, model):
    """The trainer (rank 0 of a group of its own) broadcasts another model's weights in two buckets."""
    other = tiny_model(seed=9).float()
    port, joined = free_port(), {}
    init = {"master_address": "127.0.0.1", "master_port": port, "rank_offset": 1, "world_size": 2}
    thread, results = None, []
    thread = threading.Thread(
        target=lambda: results.append(post(server, "/init_weights_update_group", init | {"backend": "gloo"}))
    )
    thread.start()
    joined["trainer"] = weight_sync.new_group("127.0.0.1", port, 0, 2, "gloo")
    thread.join(TIMEOUT)
    assert results[0][0] == 200 and results[0][1]["success"]
    named = hf_named(other)
    for bucket in (named[: len(named) // 2], named[len(named) // 2 :]):
        body = {
            "names": [n for n, _ in bucket],
            "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in bucket],
            "shapes": [list(t.shape) for _, t in bucket],
            "weight_version": "3",
        }
        results.clear()
        thread = threading.Thread(
            target=lambda b=body: results.append(post(server, "/update_weights_from_distributed", b))
        )
        thread.start()
        weight_sync.broadcast(joined["trainer"], [t.contiguous() for _, t in bucket])
        thread.join(TIMEOUT)
        assert results[0][0] == 200, results
    answer = generate(server, {"input_ids": PROMPT, "sampling_params": GREEDY_JSON})
    assert answer["output_ids"] == expected_ids(other) and answer["meta_info"]["weight_version"] == "3"
    status, answer = post(
        server, "/update_weights_from_distributed", {"names": [], "dtypes": [], "shapes": [], "group_name": "x"}
    )
    assert status == 400 and "group_name" in answer["error"]["message"]
    assert post(server, "/destroy_weights_update_group", {})[0] == 200
    assert post(server, "/destroy_weights_update_group", {})[0] == 400
    for body in (init | {"rank_offset": 0}, init | {"master_port": "x"}, init | {"backend": "mpi"}):
        status, answer = post(server, "/init_weights_update_group", body)
        assert status == 400 and answer["error"]["message"]


def test_release_and_resume_memory_leave_outputs_unchanged(server, model):
    expected = expected_ids(model)
    assert generate(server, {"input_ids": PROMPT, "sampling_params": GREEDY_JSON})["output_ids"] == expected
    cache_layer = server.engine.runner.cache.layers[0]
    assert post(server, "/release_memory_occupation", {"tags": None}) == (200, None)
    bucket = weight_sync.serialize(hf_named(model)[:1])
    status, answer = post(server, "/update_weights_from_tensor", {"serialized_named_tensors": [bucket]})
    assert status == 400 and "released" in answer["error"]["message"]  # nothing is written into freed weights
    assert cache_layer.conv.untyped_storage().nbytes() == 0
    assert all(p.untyped_storage().nbytes() == 0 for p in server.engine.model.parameters())
    thread, results = in_thread(server, {"input_ids": PROMPT, "sampling_params": GREEDY_JSON})
    time.sleep(0.3)
    assert not results  # requests wait while the memory is released
    assert post(server, "/resume_memory_occupation", {"tags": ["kv_cache", "cuda_graph"]}) == (200, None)
    assert post(server, "/resume_memory_occupation", {"tags": ["weights", "weights_drafter"]}) == (200, None)
    thread.join(TIMEOUT)
    assert results[0][0] == 200 and results[0][1]["output_ids"] == expected
    status, answer = post(server, "/release_memory_occupation", {"tags": ["gpu"]})
    assert status == 400 and "tags" in answer["error"]["message"]
    long = {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 240, "ignore_eos": True}}
    thread, results = in_thread(server, long)
    wait_for(lambda: server.engine.scheduler.running)
    status, answer = post(server, "/release_memory_occupation", {"tags": ["kv_cache"]})
    assert status == 400 and "in flight" in answer["error"]["message"]
    post(server, "/abort_request", {"abort_all": True})
    thread.join(TIMEOUT)
