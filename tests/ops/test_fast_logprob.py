"""The fused output head + log-prob against the unfused ``token_logprobs(F.linear(h, W))``: values and gradients."""

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

from league.ops import logprob as logprob_module
from league.ops.logprob import entropy, linear_token_logprobs, linear_token_logprobs_entropy, token_logprobs
from league.ops.numerics import BATCH_INVARIANT, FAST


def make_inputs(num_rows, dim, vocab, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(num_rows, dim, generator=gen) * 2).to(dtype)
    weight = (torch.randn(vocab, dim, generator=gen) / dim**0.5).to(dtype)
    tokens = torch.randint(0, vocab, (num_rows,), generator=gen)
    return hidden, weight, tokens


def unfused(hidden, weight, tokens, temperature):
    logits = F.linear(hidden, weight).float() / temperature
    return token_logprobs(logits, tokens), entropy(logits)


def assert_near(out, ref, tol=1e-6):
    """``max |out - ref| <= tol * max(1, max |ref|)``: fp32 rounding, relative to the largest entry."""
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    assert (out - ref).abs().max().item() <= tol * scale if ref.numel() else out.shape == ref.shape


def grads_of(fn, hidden, weight, tokens, temperature, seed=1):
    """Value and the gradients of hidden and weight under random cotangents of the log-prob (and entropy)."""
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    outs = fn(h, w, tokens, temperature)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=gen)).sum() for o in outs)
    if loss.requires_grad:
        loss.backward()
    return [o.detach() for o in outs], h.grad, w.grad


@pytest.mark.parametrize("num_rows,chunk_size", [(37, 8), (37, 37), (37, 100), (64, 16), (1, 4)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_and_grads_equal_unfused(num_rows, chunk_size, temperature):
    hidden, weight, tokens = make_inputs(num_rows, 24, 103)
    (ref,), gh_ref, gw_ref = grads_of(lambda *a: unfused(*a)[:1], hidden, weight, tokens, temperature)
    fused = lambda h, w, t, temp: (linear_token_logprobs(h, w, t, temp, chunk_size=chunk_size),)
    (out,), gh, gw = grads_of(fused, hidden, weight, tokens, temperature)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    assert_near(gh, gh_ref)
    assert_near(gw, gw_ref)


@pytest.mark.parametrize("temperature", [1.0, 1.3])
def test_entropy_and_grads_equal_unfused(temperature):
    hidden, weight, tokens = make_inputs(29, 16, 67)
    ref, gh_ref, gw_ref = grads_of(unfused, hidden, weight, tokens, temperature)
    fused = lambda h, w, t, temp: linear_token_logprobs_entropy(h, w, t, temp, chunk_size=7)
    out, gh, gw = grads_of(fused, hidden, weight, tokens, temperature)
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, rtol=0, atol=1e-6)
    assert_near(gh, gh_ref)
    assert_near(gw, gw_ref)
    # entropy alone (no gradient reaches the log-prob output)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    linear_token_logprobs_entropy(h, w, tokens, temperature, chunk_size=7)[1].sum().backward()
    h_ref, w_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    unfused(h_ref, w_ref, tokens, temperature)[1].sum().backward()
    assert_near(h.grad, h_ref.grad)
    assert_near(w.grad, w_ref.grad)


def test_bf16_weights_round_like_the_unfused_path():
    """Logits in the parameter dtype, then fp32. The backward works in blocks of vocabulary columns over all rows:
    each weight-gradient entry is one matmul over all rows, the very product the unfused backward computes, so it
    rounds alike whatever the chunking. Each hidden-gradient entry is summed in fp32 over the blocks and rounded once,
    where the unfused path sums the same products in fp32 in one matmul: the two differ only in the order of fp32
    additions, so at most by one bf16 ulp (a rounding that falls the other way)."""
    hidden, weight, tokens = make_inputs(64, 32, 300, torch.bfloat16)
    logp = lambda h, w, t, temp: unfused(h, w, t, temp)[:1]
    (ref,), gh_ref, gw_ref = grads_of(logp, hidden, weight, tokens, 1.0)
    bf16_ulp = lambda g: torch.exp2(torch.floor(torch.log2(g.float().abs().clamp(min=1e-30))) - 7)
    for chunk_size in (64, 6):  # one block of all 300 columns; five of at most 64
        fused = lambda h, w, t, temp, c=chunk_size: (linear_token_logprobs(h, w, t, temp, chunk_size=c),)
        (out,), gh, gw = grads_of(fused, hidden, weight, tokens, 1.0)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
        assert gh.dtype == gw.dtype == torch.bfloat16
        assert ((gh.float() - gh_ref.float()).abs() <= bf16_ulp(gh_ref)).all()
        assert torch.equal(gw, gw_ref)


def test_no_rows():
    hidden, weight, tokens = make_inputs(0, 24, 103)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    out = linear_token_logprobs(h, w, tokens)
    assert out.shape == (0,) and out.dtype == torch.float32
    out.sum().backward()
    assert h.grad.shape == (0, 24) and torch.count_nonzero(w.grad) == 0
    logp, ent = linear_token_logprobs_entropy(hidden, weight, tokens)
    assert logp.shape == ent.shape == (0,)


def test_no_grad_forward_and_frozen_weight():
    hidden, weight, tokens = make_inputs(11, 24, 103)
    with torch.no_grad():
        out = linear_token_logprobs(hidden, weight, tokens, chunk_size=4)
    torch.testing.assert_close(out, unfused(hidden, weight, tokens, 1.0)[0], rtol=0, atol=1e-6)
    h = hidden.clone().requires_grad_()
    linear_token_logprobs(h, weight, tokens, chunk_size=4).sum().backward()
    h_ref = hidden.clone().requires_grad_()
    unfused(h_ref, weight, tokens, 1.0)[0].sum().backward()
    assert_near(h.grad, h_ref.grad)


@pytest.mark.parametrize("batch_invariant", [False, True])
def test_trainer_response_logprobs(batch_invariant):
    """The trainer fuses the head unless batch-invariant, where it keeps the engine's unfused path bitwise."""
    from league.rl.trainer import response_logprobs
    from tests.models.test_forms import tiny_model
    from tests.rl.test_trainer import make_samples, trainer_for

    model = tiny_model().float()
    trainer = trainer_for(model)
    trainer.numerics = BATCH_INVARIANT if batch_invariant else FAST
    mb = trainer._micro_batches(make_samples(4, model.args.vocab_size), 4096)[0]
    logp, hidden = response_logprobs(model, mb, temperature=0.8)
    logits = model.logits(hidden[mb.packed.logit_index_R], trainer.numerics)
    if batch_invariant:
        assert torch.equal(logp, token_logprobs(logits / 0.8, mb.packed.response_tokens_R))
        return
    ref = token_logprobs(logits.float() / 0.8, mb.packed.response_tokens_R)
    torch.testing.assert_close(logp, ref, rtol=0, atol=1e-6)
    weight = model.output_weight()
    (grad,) = torch.autograd.grad(logp.sum(), weight)
    (grad_ref,) = torch.autograd.grad(ref.sum(), weight)
    assert_near(grad, grad_ref)


@pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs triton under TRITON_INTERPRET=1 (the GPU tests run the kernels on CUDA)",
)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_triton_chunk_kernels_equal_the_torch_path(monkeypatch, temperature, with_entropy):
    """bf16 weights: the Triton log-sum-exp and logits-gradient kernels against the torch path, same chunks."""
    hidden, weight, tokens = make_inputs(19, 16, 5000, torch.bfloat16, seed=3)  # V over one 4096-column block
    fn = linear_token_logprobs_entropy if with_entropy else lambda *a, **k: (linear_token_logprobs(*a, **k),)
    run = lambda h, w, t, temp: fn(h, w, t, temp, chunk_size=8)
    ref, gh_ref, gw_ref = grads_of(run, hidden, weight, tokens, temperature)
    monkeypatch.setattr(logprob_module, "_fused_kernels_apply", lambda weight: True)
    out, gh, gw = grads_of(run, hidden, weight, tokens, temperature)
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, rtol=0, atol=2e-5)
    for g, g_ref in ((gh, gh_ref), (gw, gw_ref)):  # see below: the interpreter rounds bf16 toward zero
        assert g.dtype == torch.bfloat16
        assert ((g.float() - g_ref.float()).norm() / g_ref.float().norm()).item() < 1e-2


@pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs triton under TRITON_INTERPRET=1 (the GPU tests run the kernels on CUDA)",
)
@pytest.mark.parametrize("with_entropy", [False, True])
def test_triton_logits_gradient_is_the_torch_one_within_a_bf16_ulp(with_entropy):
    """Each bf16 logit gradient is the torch path's fp32 value rounded: within one bf16 ulp of the torch path's
    (Triton's interpreter truncates where CUDA rounds to nearest, so exact equality is for the GPU tests)."""
    from league.ops.logprob.triton import chunk_grad_logits

    hidden, weight, tokens = make_inputs(8, 16, 5000, torch.bfloat16, seed=3)
    lse, logp = torch.empty(8), torch.empty(8)
    ent = torch.empty(8) if with_entropy else torch.empty(0)
    logprob_module._chunk_forward(hidden, weight, tokens, 0.7, lse, logp, ent)
    gen = torch.Generator().manual_seed(4)
    grad_logp, grad_ent = torch.randn(8, generator=gen), torch.randn(8, generator=gen) if with_entropy else None
    ent_arg = ent if with_entropy else None
    ref = logprob_module._grad_chunk_logits(hidden, weight, tokens, 0.7, lse, grad_logp, ent_arg, grad_ent).float()
    got = chunk_grad_logits(F.linear(hidden, weight), tokens, 0.7, lse, grad_logp, ent_arg, grad_ent).float()
    ulp = torch.exp2(torch.floor(torch.log2(ref.abs().clamp(min=1e-30))) - 7)
    assert ((got - ref).abs() <= ulp).all()


@pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs triton under TRITON_INTERPRET=1 (the GPU tests run the kernels on CUDA)",
)
def test_token_logprobs_kernel_path_equals_the_reference():
    """The CUDA path of ``token_logprobs`` (one kernel pass, gradient by the logits-gradient kernel) against the
    torch reference, on fp32 logits over more than one 4,096-column block, values and gradients."""
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(9, 5000, generator=gen) * 3
    tokens = torch.randint(0, 5000, (9,), generator=gen)
    grad_out = torch.randn(9, generator=gen)
    results = []
    for fn in (logprob_module._TokenLogprobs.apply, logprob_module.token_logprobs_reference):
        z = logits.clone().requires_grad_()
        logp = fn(z, tokens)
        logp.backward(grad_out)
        results.append((logp.detach(), z.grad))
    (logp, grad), (logp_ref, grad_ref) = results
    assert logp.dtype == torch.float32 and grad.dtype == torch.float32
    torch.testing.assert_close(logp, logp_ref, rtol=0, atol=2e-6)
    torch.testing.assert_close(grad, grad_ref, rtol=0, atol=1e-6)
    # by hand: softmax - one-hot at the token, scaled by the row's cotangent
    expected = -(logits.softmax(-1) * grad_out[:, None])
    expected[torch.arange(9), tokens] += grad_out
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-6)
