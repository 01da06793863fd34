"""Decode parity (``--numerics decode_parity``): whole-sequence forwards that compute the token mixers as decode
does. On CPU the mixers are the references (the recurrent GDN rule, per-sequence attention), so these tests check
the plumbing and the math: the forward equals the ordinary one, gradients flow, an engine with parity prefill
decodes the same tokens, and a trainer's parity forward scores them as the engine did. The kernels' bitwise claims
are tested on CUDA (``tests/ops/test_decode_parity_kernels.py``, ``tests/gpu``)."""

import pytest
import torch

from league.engine.config import EngineConfig
from league.engine.engine import LLMEngine
from league.engine.request import SamplingParams
from league.models.qwen3_5_moe import ForwardBatch
from league.models.qwen3_5_moe import batch as batch_py
from league.models.qwen3_5_moe import model as model_py
from league.ops import linear as linear_module
from league.ops.logprob import token_logprobs
from league.ops.numerics import DECODE_PARITY, FAST
from tests.models.test_forms import tiny_model

LENS = [9, 23, 4]


def packed_tokens(model, lens, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.args.vocab_size, (sum(lens),), generator=gen)


def test_parity_forward_equals_the_ordinary_forward_with_gradients():
    model = tiny_model("gqa2_interval2").float()
    tokens = packed_tokens(model, LENS)
    outs = []
    for parity in (False, True):
        model.zero_grad()
        hidden = model(tokens, ForwardBatch.packed(LENS, numerics=DECODE_PARITY if parity else FAST))
        logits = model.logits(hidden)
        logits.float().pow(2).mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        outs.append((logits.detach(), grads))
    (ref, ref_grads), (got, got_grads) = outs
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    assert got_grads.keys() == ref_grads.keys() and any(".gdn." in n for n in got_grads)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-3, atol=1e-6, msg=name)


def test_engine_with_parity_prefill_decodes_as_the_trainer_scores():
    """The engine prefills ragged prompts the parity way; a parity forward of prompt + output scores the sampled
    tokens as the engine logged them (fp32 on CPU: to rounding)."""
    model = tiny_model("gqa2_interval2").float()
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, model.args.vocab_size, (n,), generator=gen).tolist() for n in (5, 30, 12)]
    params = SamplingParams(max_new_tokens=10, temperature=1.0, seed=5)
    outs = {}
    for parity in (False, True):
        config = EngineConfig(max_running_requests=3, context_length=64, numerics="decode_parity" if parity else "fast")
        engine = LLMEngine(model, config)
        engine.eos_ids = set()
        outs[parity] = engine.generate(prompts, params)
    assert [o.output_ids for o in outs[True]] == [o.output_ids for o in outs[False]]
    seqs = [p + o.output_ids for p, o in zip(prompts, outs[True])]
    with torch.no_grad():
        hidden = model(
            torch.tensor([t for s in seqs for t in s]),
            ForwardBatch.packed([len(s) for s in seqs], numerics=DECODE_PARITY),
        )
    start = 0
    for prompt, seq, out in zip(prompts, seqs, outs[True]):
        rows = hidden[start + len(prompt) - 1 : start + len(seq) - 1]
        scored = token_logprobs(model.logits(rows), torch.tensor(out.output_ids))
        torch.testing.assert_close(scored, torch.tensor(out.output_logprobs), rtol=0, atol=1e-5)
        start += len(seq)


@pytest.mark.parametrize(
    "bad, message",
    [(dict(mamba_ssm_dtype="bfloat16"), "float32"), (dict(numerics="exact"), "numerics")],
)
def test_parity_config_is_checked(bad, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**{"numerics": "decode_parity", **bad})


@pytest.mark.parametrize("spec_steps", [0, 2])
def test_every_projection_of_every_parity_forward_asks_for_fixed_tiles(monkeypatch, spec_steps):
    """Under parity the trainer's forward and each engine forward (prefill, decode, MTP drafts and verify) run the
    dense projections by the fixed-tiles GEMM, so decode's rounding equals training's; without parity none does.
    (On CPU the flag falls back to F.linear: this checks the plumbing, the GPU tests the bits.)"""
    calls = []
    original = model_py.linear

    def recorded(x, weight, numerics=FAST):
        calls.append((tuple(weight.shape), numerics.as_decode))
        return original(x, weight, numerics)

    monkeypatch.setattr(model_py, "linear", recorded)
    monkeypatch.setattr(batch_py, "linear", recorded)  # ForwardBatch.linear's
    monkeypatch.setattr(linear_module, "linear", recorded)  # the joined projections' (``linear_joined``)
    model = tiny_model("gqa2_interval2").float()
    head = tuple(model.output_weight().shape)
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6, 5, 3, 5, 8, 9, 7]]
    for parity in (False, True):
        calls.clear()
        config = dict(speculative_algorithm="EAGLE", speculative_num_steps=spec_steps) if spec_steps else {}
        engine = LLMEngine(
            model,
            EngineConfig(
                max_running_requests=2, context_length=32, numerics="decode_parity" if parity else "fast", **config
            ),
        )
        engine.generate(prompts, SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True))
        with torch.no_grad():
            model(
                torch.tensor(prompts[1]),
                ForwardBatch.packed([len(prompts[1])], numerics=DECODE_PARITY if parity else FAST),
            )
        projections = [tiles for shape, tiles in calls if shape != head]  # the output head is the log-prob kernels'
        assert len(projections) > 20
        assert all(tiles == parity for tiles in projections)
