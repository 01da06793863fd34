"""Routing replay (R3): the engine returns, per position, the experts each trunk MoE layer chose (SGLang's rows and
encoding), equal to those a teacher-forced forward of the same tokens chooses, with and without speculation and
for n samples sharing a prompt; a forward given those experts (the trainer's replay) reproduces its log-probs, and
other experts change them while the router still gets a gradient."""

import base64

import numpy as np
import pytest
import torch

from league.engine.config import EngineConfig
from league.engine.engine import LLMEngine
from league.engine.request import SamplingParams
from league.engine.server import EngineServer
from league.models.qwen3_5_moe import ForwardBatch
from league.models.qwen3_5_moe import model as model_module
from tests.engine.test_server import post
from tests.models.test_forms import tiny_model

CONFIG = dict(max_running_requests=8, max_num_batched_tokens=64, context_length=128)


def teacher_forced_routes(model, tokens: list[int]) -> torch.Tensor:
    """``[len(tokens), layers, top_k]``: the experts each trunk layer picks for each token in one forward."""
    picked = []
    original = model_module.route_topk

    def recorded(logits, top_k):
        weights, experts = original(logits, top_k)
        picked.append(experts)
        return weights, experts

    model_module.route_topk = recorded
    try:
        with torch.no_grad():
            model(torch.tensor(tokens), ForwardBatch.training([len(tokens)]))
    finally:
        model_module.route_topk = original
    return torch.stack(picked, dim=1).to(torch.int32)


@pytest.fixture(scope="module")
def model():
    return tiny_model().float()


@pytest.mark.parametrize("spec", [None, "EAGLE"])
def test_engine_routes_equal_a_teacher_forced_forward(model, spec):
    engine = LLMEngine(model, EngineConfig(**CONFIG, speculative_algorithm=spec, enable_return_routed_experts=True))
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=3, ignore_eos=True)
    order = [rid for p in prompts for rid in engine.add_request(p, params, n=2, routed_experts_start_len=0)]
    order += engine.add_request([20, 21, 22, 23], params, routed_experts_start_len=2)
    done = {}
    while len(done) < len(order):
        done.update({out.rid: out for out in engine.step()})
    for rid in order:
        out = done[rid]
        tokens = out.prompt_ids + out.output_ids
        start = 2 if len(out.prompt_ids) == 4 else 0
        expected = teacher_forced_routes(model, tokens)[start : len(tokens) - 1]
        assert out.routed_experts.shape == (
            len(tokens) - 1 - start,
            model.args.num_layers,
            model.args.num_experts_per_tok,
        )
        assert torch.equal(out.routed_experts, expected), rid


def test_routes_need_the_engine_option_and_a_start_within_the_prompt(model):
    plain = LLMEngine(model, EngineConfig(**CONFIG))
    with pytest.raises(ValueError, match="enable-return-routed-experts"):
        plain.add_request([5, 6], SamplingParams(max_new_tokens=2), routed_experts_start_len=0)
    keeping = LLMEngine(model, EngineConfig(**CONFIG, enable_return_routed_experts=True))
    with pytest.raises(ValueError, match="routed_experts_start_len"):
        keeping.add_request([5, 6], SamplingParams(max_new_tokens=2), routed_experts_start_len=3)


def test_server_returns_sglang_encoded_routes(model):
    config = EngineConfig(**CONFIG, enable_return_routed_experts=True)
    server = EngineServer(LLMEngine(model, config), "127.0.0.1", 0).start()
    try:
        body = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}}
        status, answer = post(server, "/generate", body | {"return_routed_experts": True, "return_logprob": True})
        assert status == 200
        meta = answer["meta_info"]
        tokens = [5, 6, 7] + answer["output_ids"]
        # as miles decodes it: int32 rows of (layers, top_k), one per position but the last
        routes = np.frombuffer(base64.b64decode(meta["routed_experts"]), dtype=np.int32)
        routes = routes.reshape(len(tokens) - 1, model.args.num_layers, model.args.num_experts_per_tok)
        assert np.array_equal(routes, teacher_forced_routes(model, tokens)[:-1].numpy())
        status, answer = post(
            server, "/generate", body | {"return_routed_experts": True, "routed_experts_start_len": 9}
        )
        assert status == 400 and "routed_experts_start_len" in answer["error"]["message"]
        assert "routed_experts" not in post(server, "/generate", body)[1]["meta_info"]
    finally:
        server.shutdown()


def test_replay_reproduces_and_overrides_the_routing(model):
    tokens = [5, 6, 7, 8, 9, 10, 11]
    routes = teacher_forced_routes(model, tokens).long()
    ids = torch.tensor(tokens)

    def logits(replay):
        return model.logits(model(ids, ForwardBatch.training([len(tokens)], routed_experts=replay)))

    with torch.no_grad():
        plain = logits(None)
        assert torch.equal(logits(routes), plain)
        partial = routes.clone()
        partial[-1] = -1  # the last token routes as usual
        assert torch.equal(logits(partial), plain)
        other = (routes + 1) % model.args.num_experts
        assert not torch.allclose(logits(other), plain)
    model.zero_grad()
    logits(other).sum().backward()
    assert model.layers[0].moe.router.weight.grad.abs().sum() > 0
    model.zero_grad()


def test_packed_routes_mark_each_samples_last_token_as_routed_as_usual():
    from league.rl.batching import pack_samples
    from league.rl.sample import Sample

    def sample(prompt, response, value):
        rows = len(prompt) + len(response) - 1
        routes = torch.full((rows, 2, 3), value, dtype=torch.int32)
        return Sample(
            prompt_ids=prompt, response_ids=response, rollout_logprobs=[0.0] * len(response), routed_experts=routes
        )

    packed = pack_samples([sample([1, 2], [3, 4], 5), sample([6], [7, 8, 9], 6)])
    expected = [5, 5, 5, -1, 6, 6, 6, -1]
    assert packed.routed_experts.shape == (8, 2, 3) and packed.routed_experts[:, 0, 0].tolist() == expected
    assert (
        pack_samples(
            [sample([1], [2], 1), Sample(prompt_ids=[1], response_ids=[2], rollout_logprobs=[0.0])]
        ).routed_experts
        is None
    )
    with pytest.raises(ValueError, match="routed_experts"):
        Sample(prompt_ids=[1], response_ids=[2], rollout_logprobs=[0.0], routed_experts=torch.zeros(3, 2, 3))
