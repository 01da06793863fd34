"""The CUDA attention paths against the loop-of-``causal_attention`` references, at the real model's head sizes
(16 query heads, 2 KV heads, head dim 256; skipped without CUDA).

Run on the GPU machine with ``python -m pytest tests/gpu/test_fast_attention.py -q``.
"""

import pytest
import torch

from league.ops.attention import (
    _torch_varlen_attn,
    cached_attention,
    cached_attention_reference,
    varlen_causal_attention,
    varlen_causal_attention_reference,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 16, 2, 256
SCALE = HEAD_DIM**-0.5


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.float() - ref.float()).norm() / ref.float().norm()).item()


def randn(*shape, seed, dtype):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float32).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_varlen_forward_and_backward_match_reference(dtype):
    if dtype == torch.bfloat16:
        assert _torch_varlen_attn()[0] is not None, "this torch has no torch.nn.attention.varlen.varlen_attn"
    seq_lens = [2048, 1000, 3000]
    total = sum(seq_lens)
    cu = torch.tensor([0, *seq_lens], device="cuda").cumsum(0)
    inputs = [
        randn(total, NUM_HEADS, HEAD_DIM, seed=0, dtype=dtype),
        randn(total, NUM_KV_HEADS, HEAD_DIM, seed=1, dtype=dtype),
        randn(total, NUM_KV_HEADS, HEAD_DIM, seed=2, dtype=dtype),
    ]
    grad = randn(total, NUM_HEADS, HEAD_DIM, seed=3, dtype=dtype)
    results = []
    for fn in (varlen_causal_attention, varlen_causal_attention_reference):
        q, k, v = (x.clone().requires_grad_(True) for x in inputs)
        out = fn(q, k, v, cu, max(seq_lens), SCALE)
        out.backward(grad)
        results.append((out.detach(), q.grad, k.grad, v.grad))
    out_tol, grad_tol = (1e-2, 3e-2) if dtype == torch.bfloat16 else (1e-5, 1e-4)
    (out, *grads), (ref, *ref_grads) = results
    assert out.dtype == dtype and rel_err(out, ref) < out_tol
    for name, g, g_ref in zip("qkv", grads, ref_grads):
        assert g.dtype == dtype and rel_err(g, g_ref) < grad_tol, name


def cache_batch(q_lens, kv_lens, dtype, num_slots=80, max_len=1280, seed=0):
    """Random caches (junk past each length), slots in shuffled order, queries for the last q_len positions."""
    k_cache = randn(num_slots, max_len, NUM_KV_HEADS, HEAD_DIM, seed=seed, dtype=dtype)
    v_cache = randn(num_slots, max_len, NUM_KV_HEADS, HEAD_DIM, seed=seed + 1, dtype=dtype)
    q = randn(sum(q_lens), NUM_HEADS, HEAD_DIM, seed=seed + 2, dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    slots = torch.randperm(num_slots, generator=gen)[: len(q_lens)].cuda()
    cu = torch.tensor([0, *q_lens], device="cuda").cumsum(0)
    return q, k_cache, v_cache, cu, slots, torch.tensor(kv_lens, device="cuda")


def decode_lens(batch, seed, longest=1200):
    gen = torch.Generator().manual_seed(seed)
    kv = torch.randint(1, longest + 1, (batch,), generator=gen)
    kv[0] = longest
    return kv.tolist()


CASES = {
    "decode_bs64": ([1] * 64, decode_lens(64, 0)),
    "verify_q4_bs16": ([4] * 16, [max(4, n) for n in decode_lens(16, 1)]),
    "mixed": ([1, 4, 512, 1, 37, 4], [1200, 9, 600, 1, 87, 4]),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", sorted(CASES))
def test_cached_attention_matches_reference(case, dtype):
    pytest.importorskip("triton")
    q_lens, kv_lens = CASES[case]
    q, k_cache, v_cache, cu, slots, kv = cache_batch(q_lens, kv_lens, dtype)
    args = (q, k_cache, v_cache, cu, slots, kv, SCALE, max(q_lens), max(kv_lens))
    out, ref = cached_attention(*args), cached_attention_reference(*args)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert out.dtype == dtype and rel_err(out, ref) < tol
    assert (out.float() - ref.float()).abs().max().item() < (2e-2 if dtype == torch.bfloat16 else 1e-5)


def test_cached_attention_rows_do_not_depend_on_the_batch():
    pytest.importorskip("triton")
    q_lens, kv_lens = CASES["mixed"]
    q, k_cache, v_cache, cu, slots, kv = cache_batch(q_lens, kv_lens, torch.bfloat16)
    batched = cached_attention(q, k_cache, v_cache, cu, slots, kv, SCALE, max(q_lens), max(kv_lens))
    bounds = cu.tolist()
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        cu_one = torch.tensor([0, end - start], device="cuda")
        alone = cached_attention(
            q[start:end], k_cache, v_cache, cu_one, slots[i : i + 1], kv[i : i + 1], SCALE, end - start, kv_lens[i]
        )
        assert torch.equal(alone, batched[start:end]), i


def test_cached_attention_decode_replays_in_a_cuda_graph():
    """Captured once, replayed after the slots and lengths change in place: no host read of device values."""
    pytest.importorskip("triton")
    q_lens, kv_lens = CASES["decode_bs64"]
    q, k_cache, v_cache, cu, slots, kv = cache_batch(q_lens, kv_lens, torch.bfloat16)
    args = (q, k_cache, v_cache, cu, slots, kv, SCALE, 1, 1280)
    cached_attention(*args)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cached_attention(*args)
    new_lens = decode_lens(64, 7, longest=1280)
    kv.copy_(torch.tensor(new_lens, device="cuda"))
    slots.copy_(slots.flip(0))
    q.copy_(randn(*q.shape, seed=9, dtype=q.dtype))
    graph.replay()
    ref = cached_attention_reference(*args)
    assert rel_err(out, ref) < 1e-2
