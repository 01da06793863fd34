"""The Triton slot conv (``ops.conv.triton``) at the real model's sizes (C = 8192, W = 4) against its torch reference,
on the GPU: decode of a batch of 256, verify of 4 tokens, a ragged prefill, and replay in a CUDA graph."""

import importlib.util

import pytest
import torch

from league.ops.conv import causal_conv1d_slots_reference

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton"),
]

C, W, SLOTS = 8192, 4, 300


def setup(num_seqs, num_tokens, seed=0, lens=None):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(num_seqs, num_tokens, C, generator=gen, device="cuda").bfloat16()
    if lens is not None:
        for row, n in enumerate(lens):
            x[row, n:] = 0
    weight = (torch.randn(C, W, generator=gen, device="cuda") * 0.5).bfloat16()
    cache = torch.randn(SLOTS, C, W - 1, generator=gen, device="cuda").bfloat16()
    slots = torch.randperm(SLOTS, device="cuda")[:num_seqs]
    slots[-1] = -1  # a padding row
    fresh = torch.zeros(num_seqs, dtype=torch.bool, device="cuda")
    fresh[::7] = True
    return x, weight, cache, slots, fresh


@pytest.mark.parametrize(("num_seqs", "num_tokens", "record"), [(256, 1, False), (64, 4, True), (64, 4, False)])
def test_slot_conv_matches_reference(num_seqs, num_tokens, record):
    from league.ops.conv.triton import causal_conv1d_slots_triton

    x, weight, cache, slots, fresh = setup(num_seqs, num_tokens)
    lens = torch.randint(1, num_tokens + 1, (num_seqs,), device="cuda")
    cache_ref = cache.clone()
    steps = torch.zeros(num_seqs, num_tokens, C, W - 1, dtype=torch.bfloat16, device="cuda") if record else None
    steps_ref = steps.clone() if record else None
    y = causal_conv1d_slots_triton(x, weight, cache, slots, fresh, lens, steps)
    y_ref = causal_conv1d_slots_reference(x, weight, cache_ref, slots, fresh, lens, steps_ref)
    torch.testing.assert_close(y, y_ref, rtol=1.6e-2, atol=1e-2)
    assert torch.equal(cache, cache_ref)
    if record:
        assert torch.equal(steps, steps_ref)


def test_slot_conv_replays_in_a_cuda_graph():
    from league.ops.conv.triton import causal_conv1d_slots_triton

    x, weight, cache, slots, fresh = setup(128, 1)
    causal_conv1d_slots_triton(x, weight, cache.clone(), slots, fresh)  # compile outside the capture
    start = cache.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = causal_conv1d_slots_triton(x, weight, cache, slots, fresh)
    cache.copy_(start)
    x.copy_(torch.randn_like(x, dtype=torch.float32).bfloat16())
    graph.replay()
    cache_ref = start.clone()
    y_ref = causal_conv1d_slots_reference(x, weight, cache_ref, slots, fresh)
    torch.testing.assert_close(y, y_ref, rtol=1.6e-2, atol=1e-2)
    assert torch.equal(cache, cache_ref)
