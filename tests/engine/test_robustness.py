"""No request can take the server down: requests that once disabled the engine get a 400 and good requests keep
their outputs; a step that raises fails only the requests it ran, the engine serves on, ``/health`` reports the
failure until the engine runs again; an engine that cannot recover answers 503."""

import pytest

from league.engine.config import EngineConfig
from league.engine.engine import LLMEngine
from league.engine.request import SamplingParams
from league.engine.server import EngineServer
from tests.engine.test_server import post
from tests.models.test_forms import tiny_model

CONFIG = dict(max_running_requests=8, max_num_batched_tokens=256, context_length=128)
GOOD = {"input_ids": [5, 6, 7, 8], "sampling_params": {"max_new_tokens": 6, "temperature": 0}}
SEEDED = {"input_ids": [9, 10], "sampling_params": {"max_new_tokens": 6, "temperature": 1.0, "seed": 3, "n": 2}}

POISON = [
    ("/generate", {"input_ids": [True, False]}, "input_ids"),
    ("/generate", {"input_ids": [[5, 6], [True, 7]]}, "input_ids"),
    ("/generate", {"input_ids": [5.0, 6]}, "input_ids"),
    ("/generate", {**GOOD, "sampling_params": {"seed": 2**63}}, "seed"),
    ("/generate", {**GOOD, "sampling_params": {"seed": -1}}, "seed"),
    ("/generate", {**GOOD, "sampling_params": {"seed": 2**63 - 1, "n": 2}}, "seed"),
    ("/generate", {**GOOD, "sampling_params": {"sampling_seed": 10**30}}, "seed"),
    ("/generate", {**GOOD, "sampling_params": {"top_k": True}}, "top_k"),
    ("/generate", {**GOOD, "sampling_params": {"max_new_tokens": True}}, "max_new_tokens"),
    ("/generate", {**GOOD, "sampling_params": {"temperature": False}}, "temperature"),
    ("/generate", {**GOOD, "sampling_params": {"n": True}}, "n"),
    ("/generate", {**GOOD, "sampling_params": {"stop_token_ids": [True]}}, "stop_token_ids"),
    ("/generate", {**GOOD, "sampling_params": {"ignore_eos": 1}}, "ignore_eos"),
    ("/generate", {**GOOD, "sampling_params": {"frequency_penalty": 3}}, "frequency_penalty"),
    ("/generate", {**GOOD, "sampling_params": {"min_new_tokens": -1}}, "min_new_tokens"),
    ("/v1/completions", {"prompt": [True, False], "max_tokens": 2}, "prompt"),
    ("/v1/completions", {"prompt": [5, 6], "max_tokens": 2, "seed": 2**64}, "seed"),
]


@pytest.fixture(scope="module")
def model():
    return tiny_model().float()


@pytest.fixture()
def server(model):
    server = EngineServer(LLMEngine(model, EngineConfig(**CONFIG)), "127.0.0.1", 0, model_path="tiny").start()
    yield server
    server.shutdown()


def good_outputs(server) -> list:
    status, greedy = post(server, "/generate", GOOD)
    assert status == 200, greedy
    status, seeded = post(server, "/generate", SEEDED)
    assert status == 200, seeded
    return [greedy["output_ids"], [s["output_ids"] for s in seeded]]


def test_poison_requests_get_a_400_and_the_server_serves_on(server):
    expected = good_outputs(server)
    for path, body, field in POISON:
        status, answer = post(server, path, body)
        assert status == 400 and field in answer["error"]["message"], (body, answer)
        assert post(server, "/health", b"", method="GET")[0] == 200
    assert good_outputs(server) == expected


class Fault:
    """Makes the engine's decode raise while ``on``."""

    def __init__(self, engine: LLMEngine):
        self.on, self.calls, original = False, 0, engine._decode

        def decode(reqs):
            if self.on:
                self.calls += 1
                raise RuntimeError("injected fault")
            return original(reqs)

        engine._decode = decode


def test_a_failed_step_fails_its_requests_only_and_the_engine_recovers(server):
    expected = good_outputs(server)
    fault = Fault(server.engine)
    fault.on = True
    status, answer = post(server, "/generate", GOOD)
    assert status == 500 and "injected fault" in answer["error"]["message"]
    # while every step fails, /health says so (its probe generation fails too)
    status, answer = post(server, "/health", b"", method="GET")
    assert status == 503 and "injected fault" in answer["error"]["message"]
    assert server.engine.scheduler.running == [] and server.engine.scheduler.pool.num_free == 8
    fault.on = False
    # no restart: /health's probe runs, the engine serves again, with the same outputs
    assert post(server, "/health", b"", method="GET")[0] == 200
    assert server.worker.failure is None and server.worker.num_failed_steps >= 2
    assert good_outputs(server) == expected
    assert post(server, "/health_generate", b"", method="GET")[0] == 200


def test_requests_waiting_for_a_slot_survive_a_failed_step(model):
    config = EngineConfig(max_running_requests=1, max_num_batched_tokens=256, context_length=128)
    engine, params = LLMEngine(model, config), SamplingParams(max_new_tokens=6, temperature=0.0)
    expected = LLMEngine(model, config).generate([GOOD["input_ids"]], params)[0].output_ids
    fault = Fault(engine)
    fault.on = True
    engine.add_request([5, 6], params, rid="running")
    engine.add_request(GOOD["input_ids"], params, rid="waiting")
    with pytest.raises(RuntimeError, match="injected fault"):
        engine.step()
    assert engine.recover() == {"waiting"}
    fault.on = False
    done = {}
    while engine.has_unfinished():
        done.update({out.rid: out for out in engine.step()})
    assert list(done) == ["waiting"] and done["waiting"].output_ids == expected


def test_an_engine_that_cannot_recover_answers_503(server):
    fault = Fault(server.engine)
    fault.on = True

    def broken():
        raise RuntimeError("device lost")

    server.engine.recover = broken
    status, answer = post(server, "/generate", GOOD)
    assert status == 503 and "device lost" in answer["error"]["message"] and "restart" in answer["error"]["message"]
    assert post(server, "/health", b"", method="GET")[0] == 503
    assert post(server, "/generate", GOOD)[0] == 503
