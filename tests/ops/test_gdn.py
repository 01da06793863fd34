"""The three forms of the gated delta rule agree, forward and backward, and match transformers' torch
reference (``torch_chunk_gated_delta_rule`` / ``torch_recurrent_gated_delta_rule``)."""

import pytest
import torch
from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as hf

from league.ops.gdn import chunk_gated_delta_rule, naive_gated_delta_rule, recurrent_gated_delta_rule


def inputs(num_tokens, num_k_heads, num_v_heads, k_dim, v_dim, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(num_tokens, num_k_heads, k_dim, generator=gen, dtype=dtype)
    k = torch.randn(num_tokens, num_k_heads, k_dim, generator=gen, dtype=dtype)
    v = torch.randn(num_tokens, num_v_heads, v_dim, generator=gen, dtype=dtype)
    g = -torch.rand(num_tokens, num_v_heads, generator=gen, dtype=dtype) * 2
    beta = torch.rand(num_tokens, num_v_heads, generator=gen, dtype=dtype)
    state = torch.randn(num_v_heads, k_dim, v_dim, generator=gen, dtype=dtype)
    return q, k, v, g, beta, state


# fewer tokens than a chunk (1, 5, 27) run as one chunk of the next power of two
SHAPES = [
    (1, 1, 1, 8, 8),
    (5, 2, 2, 8, 8),
    (27, 2, 4, 16, 8),
    (63, 2, 4, 16, 8),
    (64, 2, 2, 12, 20),
    (150, 3, 6, 16, 16),
    (200, 1, 3, 7, 5),
]


@pytest.mark.parametrize("shape", SHAPES)
def test_chunk_and_recurrent_equal_naive_forward(shape):
    q, k, v, g, beta, state = inputs(*shape, seed=sum(shape))
    o_ref, s_ref = naive_gated_delta_rule(q, k, v, g, beta, state)
    o_chunk, s_chunk = chunk_gated_delta_rule(q, k, v, g, beta, state)
    o_rec, s_rec = recurrent_gated_delta_rule(q[None], k[None], v[None], g[None], beta[None], state[None])
    assert (o_chunk - o_ref).abs().max() < 1e-10 and (s_chunk - s_ref).abs().max() < 1e-10
    assert torch.equal(o_rec[0], o_ref) and torch.equal(s_rec[0], s_ref)


@pytest.mark.parametrize("num_tokens, chunk_size", [(100, 16), (100, 64), (27, 64)])
def test_chunk_backward_equals_naive_backward(num_tokens, chunk_size):
    tensors = [t.requires_grad_() for t in inputs(num_tokens, 2, 4, 16, 8, seed=3)]
    grads = []
    for fn in (naive_gated_delta_rule, lambda *a: chunk_gated_delta_rule(*a, chunk_size=chunk_size)):
        for t in tensors:
            t.grad = None
        o, s = fn(*tensors)
        weights = torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)
        ((o * weights).sum() + s.pow(2).sum()).backward()
        grads.append([t.grad.clone() for t in tensors])
    for ref, got in zip(*grads):
        assert (ref - got).abs().max() < 1e-9


def test_recurrent_returns_every_intermediate_state():
    q, k, v, g, beta, state = inputs(5, 2, 4, 8, 8, seed=4)
    _, all_states = recurrent_gated_delta_rule(
        q[None], k[None], v[None], g[None], beta[None], state[None], return_all_states=True
    )
    for t in range(5):
        _, s = naive_gated_delta_rule(q[: t + 1], k[: t + 1], v[: t + 1], g[: t + 1], beta[: t + 1], state)
        assert torch.equal(all_states[0, t], s)


def test_matches_transformers_reference_fp32():
    q, k, v, g, beta, state = (t.float() for t in inputs(150, 2, 4, 16, 8, seed=5))
    o_ref, s_ref = hf.torch_recurrent_gated_delta_rule(
        q[None],
        k[None],
        v[None],
        g[None],
        beta[None],
        initial_state=state[None],
        output_final_state=True,
        use_qk_l2norm_in_kernel=True,
    )
    o_chunk_ref, _ = hf.torch_chunk_gated_delta_rule(
        q[None],
        k[None],
        v[None],
        g[None],
        beta[None],
        initial_state=state[None],
        output_final_state=True,
        use_qk_l2norm_in_kernel=True,
    )
    o, s = naive_gated_delta_rule(q, k, v, g, beta, state)
    o_chunk, _ = chunk_gated_delta_rule(q, k, v, g, beta, state)
    assert (o - o_ref[0]).abs().max() < 1e-5 and (s - s_ref[0]).abs().max() < 1e-5
    assert (o_chunk - o_chunk_ref[0]).abs().max() < 1e-5
