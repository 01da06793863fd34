"""Projections of one input joined into one GEMM (``ops.linear.join_rows`` / ``linear_joined``) and the model's
use of them (``Transformer.join_projections``): same values and gradients, one GEMM per group without gradients."""

import copy

import pytest
import torch
from torch import nn

from league.engine.config import EngineConfig
from league.engine.engine import LLMEngine
from league.engine.request import SamplingParams
from league.models.qwen3_5_moe import ForwardBatch
from league.ops import linear as linear_module
from league.ops.linear import join_rows, joined, linear_joined, with_spare_rows
from league.ops.numerics import BATCH_INVARIANT
from tests.models.test_forms import tiny_model


def params(*rows: int, dim: int = 8, seed: int = 0) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(n, dim, generator=gen, dtype=torch.float64)) for n in rows]


def test_join_rows_keeps_values_and_parameters_and_lays_them_end_to_end():
    ws = params(5, 3, 1)
    before = [w.detach().clone() for w in ws]
    ids = [id(w) for w in ws]
    assert joined(ws) is None  # separate allocations
    join_rows(ws)
    assert [id(w) for w in ws] == ids  # the same Parameter objects (optimizers keep theirs)
    assert all(torch.equal(w, b) for w, b in zip(ws, before))
    whole = joined(ws)
    assert whole.shape == (9, 8) and whole.data_ptr() == ws[0].data_ptr()
    join_rows(ws)  # joined already: left where they are
    assert joined(ws).data_ptr() == whole.data_ptr()
    assert torch.equal(whole, torch.cat(before))
    assert joined(ws[::-1]) is None  # out of order
    assert joined([ws[0], ws[2]]) is None  # a gap
    ws[1].data.mul_(2)  # an in-place update stays joined, and is seen by the joined matrix
    assert joined(ws) is not None and torch.equal(joined(ws)[5:8], 2 * before[1])
    ws[1].data = ws[1].detach().clone()  # a replaced tensor leaves the group
    assert joined(ws) is None


def test_join_rows_pads_the_buffer_to_a_multiple_of_eight_rows():
    ws = params(6, 4, 1)
    join_rows(ws)
    whole = joined(ws)
    assert whole.shape == (11, 8)
    padded = with_spare_rows(whole)
    assert padded.shape == (16, 8) and padded.data_ptr() == whole.data_ptr()
    assert torch.equal(padded[11:], torch.zeros(5, 8, dtype=padded.dtype))
    aligned = params(6, 2)  # already 8 rows: no padding
    join_rows(aligned)
    assert with_spare_rows(joined(aligned)).shape == (8, 8)
    loose = torch.randn(11, 8)  # a tensor whose storage ends with it: nothing to grow into
    assert with_spare_rows(loose) is loose


def test_linear_joined_equals_one_gemm_each_and_keeps_gradients():
    ws = params(6, 4, 2)
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    expected = [x @ w.detach().T for w in ws]
    join_rows(ws)
    calls = []
    original = linear_module.linear

    def recorded(*args, **kwargs):
        calls.append(args[1].shape)
        return original(*args, **kwargs)

    linear_module.linear = recorded
    try:
        with torch.no_grad():
            outs = linear_joined(x, ws)
        assert calls == [(16, 8)]  # one GEMM over the joined matrix and the 4 zero rows padding it to 16
        assert [o.shape for o in outs] == [(3, 5, 6), (3, 5, 4), (3, 5, 2)]
        for out, exp in zip(outs, expected):
            torch.testing.assert_close(out, exp, rtol=1e-12, atol=1e-12)
        calls.clear()
        outs = linear_joined(x, ws)  # gradients asked for: one GEMM each, so each weight gets its own
        assert calls == [(6, 8), (4, 8), (2, 8)]
        calls.clear()
        outs_inv = linear_joined(x, ws, BATCH_INVARIANT)
        assert len(calls) == 3
    finally:
        linear_module.linear = original
    sum(o.square().sum() for o in outs).backward()
    for w, out in zip(ws, outs):
        torch.testing.assert_close(w.grad, 2 * out.detach().reshape(-1, w.shape[0]).T @ x.reshape(-1, 8))
    for out, exp in zip(outs_inv, expected):
        torch.testing.assert_close(out.detach(), exp, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["gqa2_interval2"])
def test_joined_model_computes_as_before_with_one_gemm_per_group(name, monkeypatch):
    model = tiny_model(name)
    reference = copy.deepcopy(model)
    names = [n for n, _ in model.named_parameters()]
    model.join_projections()
    assert [n for n, _ in model.named_parameters()] == names
    for (n, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), n
    layer = model.layers[0]
    assert (
        joined([layer.gdn.w_qkv.weight, layer.gdn.w_z.weight, layer.gdn.w_a.weight, layer.gdn.w_b.weight]) is not None
    )
    tokens = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3])
    batch = ForwardBatch.packed([4, 6])
    calls = []
    original = linear_module.linear

    def recorded(*args, **kwargs):
        calls.append(args[1].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(linear_module, "linear", recorded)
    with torch.no_grad():
        got = model.logits(model(tokens, batch))
        assert len(calls) == 2 * len(model.layers)  # one GEMM per mixer group and one per MoE group
        calls.clear()
        want = reference.logits(reference(tokens, batch))
        kinds = [layer.layer_type for layer in model.layers]
        assert len(calls) == sum((3 if kind == "full_attention" else 4) + 4 for kind in kinds)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    mtp = model.mtp.layers[0]
    assert joined([mtp.attn.wq.weight, mtp.attn.wk.weight, mtp.attn.wv.weight]) is not None
    # training (gradients on): the projections run one GEMM each, and the gradients are the unjoined model's
    for m in (model, reference):
        m.logits(m(tokens, batch)).square().mean().backward()
    for (n, p), q in zip(model.named_parameters(), reference.parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=n)


def test_engine_on_a_joined_model_decodes_as_on_the_plain_one():
    """The engine joins its model's projections on CUDA; on a CPU it may be given a joined model too: greedy
    decoding then gives the plain model's tokens and log-probs, and weight updates land in place."""
    model = tiny_model("gqa2_interval2")
    joined_model = copy.deepcopy(model)
    joined_model.join_projections()
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6, 5, 3, 5, 8, 9, 7]]
    params = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)
    config = EngineConfig(max_running_requests=2, context_length=32)
    outs = [LLMEngine(m, config).generate(prompts, params) for m in (model, joined_model)]
    for a, b in zip(*outs):
        assert a.output_ids == b.output_ids
        torch.testing.assert_close(torch.tensor(a.output_logprobs), torch.tensor(b.output_logprobs))
    engine = LLMEngine(joined_model, EngineConfig(max_running_requests=2, context_length=32))
    wq = joined_model.layers[3].attn.wq.weight
    engine.update_weights([("layers.3.attn.wq.weight", torch.zeros_like(wq))])
    attn = joined_model.layers[3].attn
    assert joined([attn.wq.weight, attn.wk.weight, attn.wv.weight]) is not None
    assert joined([attn.wq.weight, attn.wk.weight, attn.wv.weight])[: wq.shape[0]].abs().sum() == 0
