"""Sampling penalties (repetition, frequency, presence, min_new_tokens): the op on hand-computed numbers, and the
engine's greedy tokens (plain, overlapped, speculative) against a reference that recomputes the whole sequence and
applies the penalties token by token in Python."""

import math

import pytest
import torch

from league.engine.config import EngineConfig
from league.engine.engine import LLMEngine
from league.engine.request import SamplingParams
from league.models.qwen3_5_moe import ForwardBatch
from league.ops.penalties import penalize, token_counts
from league.ops.sampling import sample_logits
from tests.engine.test_speculative import small_vocab_model

INF = float("inf")


def test_penalize_on_hand_computed_numbers():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]])
    counts = token_counts(torch.tensor([[0, 2, 0, -1]]), 5)  # output: tokens 0, 2, 0
    assert counts.tolist() == [[2.0, 0.0, 1.0, 0.0, 0.0]]
    seen = (counts > 0) | torch.tensor([[False, False, False, True, True]])  # prompt: 3, 4
    banned = torch.tensor([[False, True, False, False, False]])
    got = penalize(logits, counts, seen, banned, torch.tensor([0.5]), torch.tensor([0.25]), torch.tensor([2.0]))
    # repetition: 2 / 2 = 1, 0.5 / 2, 3 / 2, -2 * 2; then - 0.5 * count - 0.25 * (count > 0); token 1 banned
    assert got.tolist() == [[1 - 1 - 0.25, -INF, 0.25 - 0.5 - 0.25, 1.5, -4.0]]


def reference_greedy(model, prompt: list[int], p: SamplingParams, stop_ids: set[int]) -> list[int]:
    """Greedy decoding by recomputing the whole sequence each token, penalties applied in Python."""
    out: list[int] = []
    while len(out) < p.max_new_tokens:
        tokens = torch.tensor(prompt + out)
        with torch.no_grad():
            logits = model.logits(model(tokens, ForwardBatch.packed([len(tokens)])))[-1].float().tolist()
        for t in range(len(logits)):
            logits[t] += p.logit_bias.get(t, 0.0)
            if t in prompt or t in out:
                logits[t] = logits[t] / p.repetition_penalty if logits[t] > 0 else logits[t] * p.repetition_penalty
            count = out.count(t)
            logits[t] -= p.frequency_penalty * count + p.presence_penalty * (count > 0)
            if len(out) < p.min_new_tokens and t in stop_ids:
                logits[t] = -math.inf
        token = max(range(len(logits)), key=lambda t: logits[t])
        out.append(token)
        if token in stop_ids:
            break
    return out


PENALTIES = [
    dict(frequency_penalty=0.7),
    dict(presence_penalty=1.5),
    dict(repetition_penalty=1.8),
    dict(frequency_penalty=-0.4, presence_penalty=0.9, repetition_penalty=0.6),
    dict(logit_bias={4: 3.0, 7: -2.5}, presence_penalty=0.5),
]
ENGINES = {
    "overlap": {},
    "no_overlap": dict(disable_overlap_schedule=True),
    "speculative": dict(speculative_algorithm="EAGLE", speculative_num_steps=2),
}


@pytest.fixture(scope="module")
def model():
    return small_vocab_model(seed=2)


@pytest.mark.parametrize("engine_kw", ENGINES.values(), ids=ENGINES.keys())
def test_greedy_with_penalties_equals_the_recomputed_reference(model, engine_kw):
    prompts = [[3, 1, 4, 1, 5], [2, 7], [9, 9, 9, 8]]
    config = EngineConfig(max_running_requests=4, context_length=64, **engine_kw)
    eng = LLMEngine(model, config)
    eng.eos_ids = set()
    plain = SamplingParams(max_new_tokens=14, temperature=0.0)
    unpenalized = [o.output_ids for o in eng.generate(prompts, plain)]
    for kw in PENALTIES:
        params = SamplingParams(max_new_tokens=14, temperature=0.0, **kw)
        # a penalized request next to a plain one: only its own rows are penalized
        outs = eng.generate(prompts + prompts[:1], [params] * len(prompts) + [plain])
        expected = [reference_greedy(model, p, params, set()) for p in prompts]
        assert [o.output_ids for o in outs[:-1]] == expected, kw
        assert outs[-1].output_ids == unpenalized[0]
        assert expected != unpenalized  # the penalty changed the tokens
        # log-probs stay those of the raw logits: the unpenalized greedy token's is the largest
        assert all(lp <= 0 for o in outs for lp in o.output_logprobs)


@pytest.mark.parametrize("engine_kw", ENGINES.values(), ids=ENGINES.keys())
def test_min_new_tokens_bans_stop_tokens_until_reached(model, engine_kw):
    prompt = [3, 1, 4, 1, 5]
    eng = LLMEngine(model, EngineConfig(max_running_requests=2, context_length=64, **engine_kw))
    eng.eos_ids = set()
    free = eng.generate([prompt], SamplingParams(max_new_tokens=10, temperature=0.0))[0].output_ids
    stop = free[0]
    early = eng.generate([prompt], SamplingParams(max_new_tokens=10, temperature=0.0, stop_token_ids=[stop]))[0]
    assert early.output_ids == [stop] and early.finish_reason == "stop"
    params = SamplingParams(max_new_tokens=10, temperature=0.0, stop_token_ids=[stop], min_new_tokens=4)
    out = eng.generate([prompt], params)[0]
    assert out.output_ids == reference_greedy(model, prompt, params, {stop})
    assert len(out.output_ids) >= 4 and stop not in out.output_ids[:4]


def test_sampled_penalized_tokens_are_drawn_from_the_penalized_logits(model):
    """Seeded sampling draws token t with the noise of (seed, t) from the penalized logits, as the engine's own
    draw function does on logits penalized by hand."""
    prompt, seed = [3, 1, 4, 1, 5], 11
    params = SamplingParams(max_new_tokens=8, temperature=0.8, seed=seed, presence_penalty=2.0, repetition_penalty=1.3)
    eng = LLMEngine(model, EngineConfig(max_running_requests=2, context_length=64))
    eng.eos_ids = set()
    got = eng.generate([prompt], params)[0].output_ids
    out: list[int] = []
    for position in range(8):
        tokens = torch.tensor(prompt + out)
        with torch.no_grad():
            logits = model.logits(model(tokens, ForwardBatch.packed([len(tokens)])))[-1:].float()
        seen = torch.zeros_like(logits, dtype=torch.bool)
        seen[0, prompt + out] = True
        counts = token_counts(torch.tensor([out or [-1]]), logits.shape[-1])
        no = torch.zeros_like(seen)
        penalized = penalize(logits, counts, seen, no, torch.tensor([0.0]), torch.tensor([2.0]), torch.tensor([1.3]))
        token = sample_logits(penalized, 0.8, torch.tensor([seed]), torch.tensor([position]))[0]
        out.append(int(token))
    assert got == out
