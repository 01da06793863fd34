"""A trainer process and a `league serve` process on the CPU: the trainer's weights reach the server through
``/update_weights_from_tensor`` (shared memory between the processes) and through a gloo broadcast group
(``/init_weights_update_group`` + ``/update_weights_from_distributed``); after each, the served engine's log-probs of
a sequence equal the trainer's."""

import socket

import pytest
import torch

from league.checkpoint.hf import load_model
from league.checkpoint.init import init_checkpoint
from league.engine.client import EngineClient
from league.models.qwen3_5_moe import ForwardBatch
from league.ops.logprob import token_logprobs
from tests.engine.servers import league_serve

SEQUENCE = [5, 9, 14, 3, 22, 7, 31, 8, 2, 40]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = init_checkpoint("tiny", tmp_path_factory.mktemp("start") / "tiny", seed=1)
    args = ["--model", str(folder), "--port", "0", "--context-length", "64", "--device", "cpu", "--dtype", "float32"]
    with league_serve(args) as (_, client):
        yield client


def trainer_model(tmp_path, seed: int):
    return load_model(init_checkpoint("tiny", tmp_path / f"seed{seed}", seed=seed), "cpu", torch.float32)


def trainer_logprobs(model) -> list[float]:
    with torch.no_grad():
        hidden = model(torch.tensor(SEQUENCE), ForwardBatch.training([len(SEQUENCE)]))
        return token_logprobs(model.logits(hidden[:-1]), torch.tensor(SEQUENCE[1:])).tolist()


def served_logprobs(client: EngineClient) -> list[float]:
    body = {"input_ids": SEQUENCE, "sampling_params": {"max_new_tokens": 1, "temperature": 0}}
    answer = client._request("POST", "/generate", body | {"return_logprob": True, "logprob_start_len": 0})
    entries = answer["meta_info"]["input_token_logprobs"]
    assert entries[0][0] is None and [e[1] for e in entries] == SEQUENCE
    return [e[0] for e in entries[1:]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tensor_route_then_broadcast_route(served, tmp_path):
    before = served_logprobs(served)
    first = trainer_model(tmp_path, seed=9)
    expected = trainer_logprobs(first)
    assert not torch.allclose(torch.tensor(before), torch.tensor(expected), atol=1e-3)
    served.update_weights(((n, p.detach()) for n, p in first.named_parameters()), version="1", bucket_bytes=1 << 16)
    assert torch.allclose(torch.tensor(served_logprobs(served)), torch.tensor(expected), atol=1e-5)
    assert served._request("GET", "/get_weight_version") == {"weight_version": "1"}

    second = trainer_model(tmp_path, seed=13)
    group = served.join_weight_group("127.0.0.1", free_port(), backend="gloo")
    served.broadcast_weights(group, ((n, p.detach()) for n, p in second.named_parameters()), version="2")
    assert torch.allclose(torch.tensor(served_logprobs(served)), torch.tensor(trainer_logprobs(second)), atol=1e-5)
    assert served._request("POST", "/destroy_weights_update_group", {})["success"]
