"""Norms, RoPE, conv, attention, MoE and log-probs against transformers' modules or hand formulas."""

import torch
import torch.nn.functional as F
from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as hf

from league.ops.attention import causal_attention
from league.ops.conv import causal_conv1d, causal_conv1d_windows
from league.ops.logprob import entropy, token_logprobs
from league.ops.moe import route_topk, swiglu_experts
from league.ops.norm import gated_rms_norm, rms_norm
from league.ops.rope import apply_rope, rope_cos_sin, rope_inv_freq
from tests.conftest import hf_text_config

GEN = torch.Generator().manual_seed(0)


def randn(*shape):
    return torch.randn(*shape, generator=GEN)


def test_rms_norms_match_transformers():
    x, w = randn(7, 24), randn(24)
    norm = hf.Qwen3_5MoeRMSNorm(24, eps=1e-6)
    norm.weight.data.copy_(w)
    assert torch.equal(rms_norm(x, w, 1e-6), norm(x))
    z = randn(7, 24)
    gated = hf.Qwen3_5MoeRMSNormGated(24, eps=1e-6)
    gated.weight.data.copy_(w)
    assert torch.equal(gated_rms_norm(x, z, w, 1e-6), gated(x, z))


def test_partial_rope_matches_transformers():
    config = hf_text_config("gqa2_interval2")
    rotary = hf.Qwen3_5MoeTextRotaryEmbedding(config)
    positions = torch.tensor([0, 1, 5, 17, 300])
    cos_ref, sin_ref = rotary(torch.zeros(1, dtype=torch.float32), positions[None])
    cos, sin = rope_cos_sin(positions, rope_inv_freq(8, 10000.0))
    assert torch.allclose(cos, cos_ref[0], atol=1e-6) and torch.allclose(sin, sin_ref[0], atol=1e-6)
    q, k = randn(5, 4, 32), randn(5, 2, 32)
    q_ref, k_ref = hf.apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos_ref, sin_ref)
    assert torch.allclose(apply_rope(q, cos, sin), q_ref[0].transpose(0, 1), atol=1e-6)
    assert torch.allclose(apply_rope(k, cos, sin), k_ref[0].transpose(0, 1), atol=1e-6)
    assert torch.equal(apply_rope(q, cos, sin)[..., 8:], q[..., 8:])


def test_causal_conv_matches_transformers_and_continues_from_window():
    x, w = randn(20, 6), randn(6, 4)
    ref = hf.causal_conv1d_fn(x.t()[None], w, None, activation="silu")[0].t()
    y, window = causal_conv1d(x, w)
    assert torch.allclose(y, ref, atol=1e-6)
    y1, win1 = causal_conv1d(x[:13], w)
    y2, win2 = causal_conv1d(x[13:], w, win1)
    assert torch.allclose(torch.cat([y1, y2]), ref, atol=1e-6) and torch.equal(win2, window)
    steps = causal_conv1d_windows(x[13:], win1)
    assert torch.equal(steps[-1], window) and torch.equal(steps[0][:, -1], x[13])


def test_attention_with_cached_prefix_equals_full():
    q, k, v = randn(9, 4, 8), randn(9, 2, 8), randn(9, 2, 8)
    full = causal_attention(q, k, v, 8**-0.5)
    tail = causal_attention(q[6:], k, v, 8**-0.5)
    assert torch.allclose(tail, full[6:], atol=1e-6)
    ref = F.scaled_dot_product_attention(
        q.transpose(0, 1),
        k.repeat_interleave(2, 1).transpose(0, 1),
        v.repeat_interleave(2, 1).transpose(0, 1),
        is_causal=True,
    )
    assert torch.allclose(full, ref.transpose(0, 1), atol=1e-6)


def test_moe_matches_transformers_block():
    config = hf_text_config("gqa4_interval4")
    block = hf.Qwen3_5MoeSparseMoeBlock(config)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=GEN) * 0.1)
    x = randn(1, 11, config.hidden_size)
    weights, experts = route_topk(F.linear(x[0], block.gate.weight), config.num_experts_per_tok)
    routed = swiglu_experts(x[0], block.experts.gate_up_proj, block.experts.down_proj, weights, experts)
    shared = torch.sigmoid(block.shared_expert_gate(x[0])) * block.shared_expert(x[0])
    assert torch.allclose(routed + shared, block(x)[0], atol=1e-6)
    assert torch.allclose(weights.sum(-1), torch.ones(11))


def test_logprobs_and_entropy_by_hand():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]])
    lp = token_logprobs(logits, torch.tensor([2, 3]), chunk_size=1)
    expected_second = 4.0 - torch.log(torch.exp(torch.tensor([1.0, 2.0, 3.0, 4.0])).sum())
    assert torch.allclose(lp, torch.stack([torch.log(torch.tensor(0.25)), expected_second]))
    ent = entropy(logits)
    assert torch.allclose(ent[0], torch.log(torch.tensor(4.0)))
    p = logits[1].softmax(-1)
    assert torch.allclose(ent[1], -(p * p.log()).sum())
    assert token_logprobs(logits.bfloat16(), torch.tensor([2, 3])).dtype == torch.float32


def test_by_kernel_takes_values_from_the_kernel_and_gradients_from_the_reference():
    """The one "kernel forward, reference backward" helper: values are the kernel's (here the reference plus a
    constant, so they differ), gradients the reference's exactly; several outputs, a non-float one among them."""
    from league.ops.backends import by_kernel

    def reference(x, w):
        y = x * w.sigmoid()
        return y, y.sum(-1), y.argmax(-1)

    def kernel(x, w):
        y, s, i = reference(x, w)
        return y + 1.0, s + 1.0, i

    gen = torch.Generator().manual_seed(0)
    x, w, c = torch.randn(4, 5, generator=gen), torch.randn(5, generator=gen), torch.randn(4, 5, generator=gen)
    grads = []
    for fn in (lambda *a: by_kernel(kernel, reference, *a), reference):
        leaves = [x.clone().requires_grad_(), w.clone().requires_grad_()]
        y, s, i = fn(*leaves)
        assert not i.requires_grad
        ((y * c).sum() + 3 * s.sum()).backward()  # the same output gradients for both
        grads.append([t.grad for t in leaves])
        if fn is not reference:
            assert torch.equal(y, reference(x, w)[0] + 1.0)
    for got, want in zip(*grads):
        assert torch.equal(got, want)
    y, _, _ = by_kernel(kernel, reference, x, w)
    assert not y.requires_grad
