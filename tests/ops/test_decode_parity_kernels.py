"""The kernels behind decode parity against decoding one token at a time: the recurrent GDN kernel over whole
sequences (gates made in the kernel) and the decode attention kernel over packed keys give bitwise the outputs
of decode steps over a cache, and their gradients are those of the chunked/flash forms.

Runs on CUDA, or on CPU under ``TRITON_INTERPRET=1`` (fp32 there: the interpreter has no bf16 dots); skipped
otherwise.
"""

import importlib.util
import os

import pytest
import torch

from league.ops.attention import varlen_causal_attention_reference
from league.ops.gdn.gates import gdn_gates
from league.ops.gdn.recurrent import recurrent_gated_delta_rule
from tests.ops.test_attention_fast import interpreter_scalar_index  # noqa: F401 (autouse: the interpreter's loops)

HAS_TRITON = importlib.util.find_spec("triton") is not None
CAN_RUN_TRITON = HAS_TRITON and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not CAN_RUN_TRITON, reason="needs triton and CUDA or TRITON_INTERPRET=1")


def randn(gen, *shape, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(DEVICE)


def test_gdn_as_decode_equals_decode_steps_and_has_the_references_gradients():
    from league.ops.gdn.parity import as_decode_kernel
    from league.ops.gdn.triton_recurrent import recurrent_gated_delta_rule_slots_fwd

    gen = torch.Generator().manual_seed(0)
    num_seqs, num_tokens, hk, hv, dim = 2, 5, 2, 4, 16
    q, k = randn(gen, num_seqs, num_tokens, hk, dim), randn(gen, num_seqs, num_tokens, hk, dim)
    v = randn(gen, num_seqs, num_tokens, hv, dim)
    a, b = randn(gen, num_seqs, num_tokens, hv, scale=2), randn(gen, num_seqs, num_tokens, hv, scale=2)
    a_log, dt_bias = randn(gen, hv, scale=0.5), randn(gen, hv, scale=0.5)
    state = randn(gen, num_seqs, hv, dim, dim, scale=0.1)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, a, b, a_log, dt_bias, state)]
    out, final = as_decode_kernel(*leaves, None)
    # decode: one token a step, the state in a slot cache between steps
    cache, slots = state.clone(), torch.arange(num_seqs, device=DEVICE)
    steps = [
        recurrent_gated_delta_rule_slots_fwd(
            *(x[:, t : t + 1] for x in (q, k, v, a, b)), cache, slots, gate_params=(a_log, dt_bias)
        )
        for t in range(num_tokens)
    ]
    assert torch.equal(out.detach(), torch.cat(steps, dim=1)) and torch.equal(final.detach(), cache)
    grad_out, grad_final = randn(gen, *out.shape), randn(gen, *final.shape)
    torch.autograd.backward((out, final), (grad_out, grad_final))
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v, a, b, a_log, dt_bias, state)]
    g, beta = gdn_gates(*ref_leaves[3:7])
    ref_out, ref_final = recurrent_gated_delta_rule(*ref_leaves[:3], g, beta, ref_leaves[7])
    torch.autograd.backward((ref_out, ref_final), (grad_out, grad_final))
    for got, ref in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad, ref.grad, rtol=1e-3, atol=1e-4)


def test_attention_as_decode_equals_decode_steps_and_has_the_references_gradients():
    from league.ops.attention import attention_as_decode_kernel
    from league.ops.attention.triton import cached_attention_fwd

    gen = torch.Generator().manual_seed(1)
    lens, heads, groups, dim = [7, 70, 1], 4, 2, 32  # a sequence longer than one key block
    total = sum(lens)
    q, k, v = randn(gen, total, heads, dim), randn(gen, total, groups, dim), randn(gen, total, groups, dim)
    cu = torch.tensor([0, 7, 77, 78], device=DEVICE)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = attention_as_decode_kernel(*leaves, cu, max(lens), dim**-0.5)
    # decode: each token's query over the keys so far, read from its sequence's cache slot
    k_cache = torch.zeros(len(lens), max(lens), groups, dim, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    for i, (start, n) in enumerate(zip(cu.tolist(), lens)):
        k_cache[i, :n], v_cache[i, :n] = k[start : start + n], v[start : start + n]
    for i, (start, n) in enumerate(zip(cu.tolist(), lens)):
        for t in range(n):
            one = cached_attention_fwd(
                q[start + t : start + t + 1],
                k_cache,
                v_cache,
                torch.tensor([0, 1], device=DEVICE),
                torch.tensor([i], device=DEVICE),
                torch.tensor([t + 1], device=DEVICE),
                dim**-0.5,
                1,
            )
            assert torch.equal(out.detach()[start + t], one[0])
    grad = randn(gen, *out.shape)
    out.backward(grad)
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    varlen_causal_attention_reference(*ref_leaves, cu, max(lens), dim**-0.5).backward(grad)
    for got, ref in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad, ref.grad, rtol=1e-4, atol=1e-5)
