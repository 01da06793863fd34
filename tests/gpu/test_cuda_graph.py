"""Captured decode steps equal eager decode (skipped without CUDA).

Run on the GPU machine with ``python -m pytest tests/gpu -q``.
"""

import pytest
import torch

from league.engine.config import EngineConfig
from league.engine.engine import LLMEngine
from league.engine.request import SamplingParams
from league.models.qwen3_5_moe import Transformer
from league.models.qwen3_5_moe.presets import PRESETS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def bf16_model() -> Transformer:
    model = Transformer(PRESETS["tiny"])
    model.init_weights(seed=3, std=0.2)
    return model.cuda().to(torch.bfloat16).eval()


def prompts_of(lengths, vocab):
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


def run(model, prompts, params, **config):
    engine = LLMEngine(model, EngineConfig(max_running_requests=8, context_length=96, **config))
    return engine, engine.generate(prompts, params)


def test_graph_decode_matches_eager_at_a_captured_size():
    model = bf16_model()
    prompts = prompts_of([5, 17, 33, 2, 9, 12, 40, 3], model.args.vocab_size)
    params = SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True)
    graphed_engine, graphed = run(model, prompts, params, cuda_graph_bs=[8])
    _, eager = run(model, prompts, params, disable_cuda_graph=True)
    assert graphed_engine.runner.graphs is not None and graphed_engine.runner.graphs.sizes == [8]
    for g, e in zip(graphed, eager):  # cuBLAS may pick other kernels inside a capture: close, not bitwise
        assert g.output_ids == e.output_ids
        assert max(abs(a - b) for a, b in zip(g.output_logprobs, e.output_logprobs)) < 2e-2


def test_padded_graph_batches_match_eager_closely():
    """Batches smaller than a captured size run padded; requests finishing at different times shrink the batch."""
    model = bf16_model()
    prompts = prompts_of([5, 17, 33, 2, 9], model.args.vocab_size)
    params = [SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True) for n in (4, 30, 11, 25, 2)]
    graphed_engine = LLMEngine(model, EngineConfig(max_running_requests=8, context_length=96, cuda_graph_bs=[2, 8]))
    eager_engine = LLMEngine(model, EngineConfig(max_running_requests=8, context_length=96, disable_cuda_graph=True))
    graphed = [graphed_engine.generate([p], q)[0] for p, q in zip(prompts, params)]  # batch 1 -> padded to 2
    eager = [eager_engine.generate([p], q)[0] for p, q in zip(prompts, params)]
    graphed_all = LLMEngine(model, EngineConfig(max_running_requests=8, context_length=96, cuda_graph_bs=[8])).generate(
        prompts, params[1]
    )
    for g, e in zip(graphed, eager):
        assert g.output_ids == e.output_ids
    lp_g = torch.tensor([x for o in graphed for x in o.output_logprobs])
    lp_e = torch.tensor([x for o in eager for x in o.output_logprobs])
    assert (lp_g - lp_e).abs().max().item() < 2e-2
    assert all(len(o.output_ids) == 30 for o in graphed_all)


def test_sampled_graph_decode_is_reproducible():
    model = bf16_model()
    prompts = prompts_of([5, 17, 33], model.args.vocab_size)
    params = SamplingParams(max_new_tokens=16, temperature=1.0, seed=11)
    _, first = run(model, prompts, params, cuda_graph_bs=[4])
    _, second = run(model, prompts, params, cuda_graph_bs=[4])
    assert [o.output_ids for o in first] == [o.output_ids for o in second]


@pytest.mark.parametrize("num_steps", [1, 3])
def test_graph_speculation_matches_eager(num_steps):
    """Draft-and-verify steps replayed from graphs equal the eager steps: batches of 5 and, as requests finish,
    fewer run padded in graphs of 2 and 8 rows; tokens, log-probs and acceptance agree."""
    model = bf16_model()
    prompts = prompts_of([5, 17, 33, 2, 9], model.args.vocab_size)
    params = [SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True) for n in (4, 30, 11, 25, 2)]
    spec = dict(speculative_algorithm="EAGLE", speculative_num_steps=num_steps)
    graphed_engine, graphed = run(model, prompts, params, cuda_graph_bs=[2, 8], **spec)
    eager_engine, eager = run(model, prompts, params, disable_cuda_graph=True, **spec)
    assert sorted(graphed_engine.runner.spec_step.graphs) == [2, 8] and not eager_engine.runner.spec_step.graphs
    for g, e in zip(graphed, eager):
        assert g.output_ids == e.output_ids
        assert max(abs(a - b) for a, b in zip(g.output_logprobs, e.output_logprobs)) < 2e-2
    assert graphed_engine.stats.spec.verify_steps == eager_engine.stats.spec.verify_steps > 0
    assert graphed_engine.stats.spec.accepted_tokens == eager_engine.stats.spec.accepted_tokens


def test_sampled_graph_speculation_is_reproducible():
    model = bf16_model()
    prompts = prompts_of([5, 17, 33], model.args.vocab_size)
    params = SamplingParams(max_new_tokens=16, temperature=1.0, seed=11)
    spec = dict(speculative_algorithm="EAGLE", speculative_num_steps=2, cuda_graph_bs=[4])
    _, first = run(model, prompts, params, **spec)
    _, second = run(model, prompts, params, **spec)
    assert [o.output_ids for o in first] == [o.output_ids for o in second]
    assert all(len(o.output_ids) == 16 or o.finish_reason == "stop" for o in first)
