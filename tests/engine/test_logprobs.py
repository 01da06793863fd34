"""Log-probs beyond the sampled tokens': the prompt's tokens from ``logprob_start_len`` on (across prefill chunks)
and the most likely tokens at each position, against teacher-forced scoring of the whole sequence, in plain and
speculative engines."""

import pytest
import torch

from league.engine.config import EngineConfig
from league.engine.engine import LLMEngine
from league.engine.request import SamplingParams
from league.models.qwen3_5_moe import ForwardBatch
from tests.engine.test_speculative import small_vocab_model

ENGINES = {"plain": {}, "speculative": dict(speculative_algorithm="EAGLE", speculative_num_steps=2)}


@pytest.fixture(scope="module")
def model():
    return small_vocab_model(seed=4)


def scored(model, tokens: list[int]) -> torch.Tensor:
    """``[len - 1, V]`` log-softmax of the rows that predict tokens 1..len-1, by one forward of the sequence."""
    with torch.no_grad():
        hidden = model(torch.tensor(tokens), ForwardBatch.packed([len(tokens)]))
        return model.logits(hidden)[:-1].float().log_softmax(-1)


@pytest.mark.parametrize("engine_kw", ENGINES.values(), ids=ENGINES.keys())
def test_input_and_top_logprobs_equal_teacher_forced_scoring(model, engine_kw):
    # a 4-token prefill budget splits the prompts into chunks; the group of 2 shares its leader's prompt log-probs
    eng = LLMEngine(
        model, EngineConfig(max_running_requests=4, max_num_batched_tokens=4, context_length=64, **engine_kw)
    )
    eng.eos_ids = set()
    prompts, starts, k = [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], [7, 2, 8]], [0, 1], 3
    params = SamplingParams(max_new_tokens=9, temperature=0.7, seed=5)
    rids = [eng.add_request(p, params, n=2, top_logprobs_num=k, logprob_start_len=s) for p, s in zip(prompts, starts)]
    outs = {}
    while eng.has_unfinished():
        outs.update({o.rid: o for o in eng.step()})
    for prompt, start, group in zip(prompts, starts, rids):
        for rid in group:
            out = outs[rid]
            table = scored(model, prompt + out.output_ids)
            expected_input = table[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
            got = out.input_logprobs
            assert len(got) == len(prompt) - start and (got[0] is None) == (start == 0)
            assert torch.allclose(
                torch.tensor(got[1 - min(start, 1) :]), expected_input[max(start, 1) - 1 :], atol=1e-4
            )
            output_rows = table[len(prompt) - 1 :]
            assert torch.allclose(
                torch.tensor(out.output_logprobs), output_rows[torch.arange(9), torch.tensor(out.output_ids)], atol=1e-4
            )
            for tops, row in zip(out.output_top_logprobs, output_rows):
                assert [t for _, t in tops] == row.topk(k).indices.tolist()
                assert torch.allclose(torch.tensor([v for v, _ in tops]), row.topk(k).values, atol=1e-4)
            assert len(out.output_top_logprobs) == 9 and len(out.input_top_logprobs) == len(got)
            assert [t for _, t in out.input_top_logprobs[-1]] == table[len(prompt) - 2].topk(k).indices.tolist()


def test_no_extra_log_probs_unless_asked(model):
    eng = LLMEngine(model, EngineConfig(max_running_requests=2, context_length=64))
    out = eng.generate([[3, 1, 4]], SamplingParams(max_new_tokens=4, temperature=0))[0]
    assert out.input_logprobs == [] and out.output_top_logprobs == [] and out.input_top_logprobs == []
    for bad in (dict(top_logprobs_num=-1), dict(top_logprobs_num=True), dict(logprob_start_len=3)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            eng.add_request([3, 1, 4], **bad)
