"""The CUDA paths of the MoE experts (grouped GEMM; Triton kernels at decode, with their sort of the pairs), the
output-head log-prob (fused, chunked) and the (1 + w) RMSNorm (Triton) against their references, at the real
model's sizes (skipped without CUDA).

bf16 results are held to the distance of the bf16 reference from the fp32 truth; fp32 results to the reference.
Run on the GPU machine with ``python -m pytest tests/gpu/test_fast_moe_norm_logprob.py -q``.
"""

import pytest
import torch
import torch.nn.functional as F

from league.ops.logprob import linear_token_logprobs, token_logprobs
from league.ops.moe import (
    TRITON_MAX_ROWS_PER_EXPERT,
    grouped_mm_fits,
    grouped_swiglu_experts,
    route_topk,
    sort_pairs,
    swiglu_experts,
    swiglu_experts_reference,
)
from league.ops.norm import rms_norm, rms_norm_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# Qwen3.6-35B-A3B: hidden 2048, 256 experts of intermediate 512, top-8, vocabulary 248,320, head dim 128
DIM, NUM_EXPERTS, INTER, TOP_K, VOCAB = 2048, 256, 512, 8, 248_320


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.float() - ref.float()).norm() / ref.float().norm()).item()


def randn(*shape, seed, scale=1.0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, generator=gen, device="cuda") * scale


def moe_inputs(num_tokens: int) -> list[torch.Tensor]:
    """fp32 inputs; experts 17 and 200..255 are never chosen, so they receive no tokens."""
    logits = randn(num_tokens, NUM_EXPERTS, seed=3)
    logits[:, 200:] = float("-inf")
    logits[:, 17] = float("-inf")
    weights, experts = route_topk(logits, TOP_K)
    return [
        randn(num_tokens, DIM, seed=0),
        randn(NUM_EXPERTS, 2 * INTER, DIM, seed=1, scale=DIM**-0.5),
        randn(NUM_EXPERTS, DIM, INTER, seed=2, scale=INTER**-0.5),
        weights,
        experts,
    ]


def moe_run(fn, inputs, dtype, grad_out):
    x, w_gate_up, w_down, weights = (t.to(dtype).requires_grad_() for t in inputs[:4])
    out = fn(x, w_gate_up, w_down, weights, inputs[4])
    out.backward(grad_out.to(dtype))
    return [out.detach(), x.grad, w_gate_up.grad, w_down.grad, weights.grad]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_grouped_moe_matches_reference(dtype):
    inputs = moe_inputs(512)
    grad_out = randn(512, DIM, seed=4)
    assert grouped_mm_fits(inputs[0].to(dtype), inputs[1].to(dtype), inputs[2].to(dtype))
    fast = moe_run(swiglu_experts, inputs, dtype, grad_out)  # dispatches to the grouped form on CUDA
    ref = moe_run(swiglu_experts_reference, inputs, dtype, grad_out)
    names = ["out", "x", "w_gate_up", "w_down", "weights"]
    assert all(f.dtype == dtype for f in fast)
    assert torch.count_nonzero(fast[2][200:]) == 0 and torch.count_nonzero(fast[2][17]) == 0
    if dtype == torch.float32:
        for name, f, r in zip(names, fast, ref):
            assert rel_err(f, r) < 1e-5, name
        return
    truth = moe_run(
        swiglu_experts_reference, [t.to(dtype).float() for t in inputs[:4]] + inputs[4:], torch.float32, grad_out
    )
    for name, f, r, t in zip(names, fast, ref, truth):
        assert rel_err(f, t) <= 1.5 * rel_err(r, t) + 1e-3, name


@pytest.mark.parametrize("form", ["grouped_gemm", "triton"])
@torch.no_grad()
def test_grouped_moe_is_deterministic_and_captured_by_a_cuda_graph(form):
    from league.ops.moe.triton import grouped_swiglu_experts_triton

    experts_fn = grouped_swiglu_experts if form == "grouped_gemm" else grouped_swiglu_experts_triton
    x, w_gate_up, w_down, weights, experts = bf16_moe_inputs(256)
    args = (x, w_gate_up, w_down, weights, experts)
    eager = experts_fn(*args)
    assert torch.equal(eager, experts_fn(*args))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        experts_fn(*args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = experts_fn(*args)
    new_experts = experts.roll(1, dims=0)  # other routing, same buffers: the graph must not have baked it in
    experts.copy_(new_experts)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, experts_fn(x, w_gate_up, w_down, weights, new_experts))


def bf16_moe_inputs(num_tokens: int) -> list[torch.Tensor]:
    return [t.bfloat16() if t.is_floating_point() else t for t in moe_inputs(num_tokens)]


@pytest.mark.parametrize("num_tokens", [1, 16, 256, 1024])
def test_triton_moe_kernels_round_where_grouped_gemm_rounds(num_tokens):
    """Each kernel against the grouped-GEMM step it replaces, from the same input: a different fp32 summation
    order moves a rare value across a rounding boundary; nothing else differs. (An ulp of a sum that cancelled is
    many ulps of its small result, so differences are held to the largest magnitude: CPU runs of fp32 against fp64
    sums at these sizes differ in ~0.03% of the elements, by at most a third of this bound.)"""
    from league.ops.moe.triton import down_fwd, gate_up_swiglu_fwd, tile_configs

    x, w_gate_up, w_down, weights, experts = bf16_moe_inputs(num_tokens)
    order, offs = sort_pairs(experts, NUM_EXPERTS)
    gate_up_config, down_config = tile_configs(order.numel(), NUM_EXPERTS)
    with torch.no_grad():
        h = gate_up_swiglu_fwd(x, order, offs, w_gate_up, TOP_K, gate_up_config)
        gate, up = torch._grouped_mm(x[order // TOP_K], w_gate_up.transpose(-2, -1), offs=offs).chunk(2, dim=-1)
        h_ref = F.silu(gate) * up
        y = down_fwd(h_ref, order, offs, w_down, weights.reshape(-1), down_config)
        y_ref = torch.empty_like(y)
        y_ref[order] = (
            torch._grouped_mm(h_ref, w_down.transpose(-2, -1), offs=offs) * weights.reshape(-1)[order, None]
        ).to(y.dtype)
    for name, got, ref in (("h", h, h_ref), ("y", y, y_ref)):
        assert got.dtype == torch.bfloat16
        assert (got != ref).float().mean().item() < 0.01, name
        assert (got.float() - ref.float()).abs().max().item() <= 2.0**-7 * ref.float().abs().max().item(), name


@pytest.mark.parametrize("num_tokens", [1, 16, 256, 1024])
def test_triton_moe_matches_grouped_gemm(num_tokens):
    from league.ops.moe.triton import grouped_swiglu_experts_triton

    args = bf16_moe_inputs(num_tokens)
    with torch.no_grad():
        out = grouped_swiglu_experts_triton(*args)
        ref = grouped_swiglu_experts(*args)
        if num_tokens * TOP_K <= TRITON_MAX_ROWS_PER_EXPERT * NUM_EXPERTS:  # decode and verify batches
            assert torch.equal(swiglu_experts(*args), out)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    assert (out != ref).float().mean().item() < 0.01
    # a flipped rounding in h or y moves a token's sum by about an ulp of its row's largest terms, not of itself
    row_scale = ref.float().abs().amax(-1, keepdim=True)
    assert ((out.float() - ref.float()).abs() <= 2 * 2.0**-7 * row_scale).all()
    assert rel_err(out, ref) < 2e-3


@pytest.mark.parametrize("row_splits", [2, 4])
def test_triton_moe_row_splits_give_the_same_bits_with_a_hot_expert(row_splits):
    """256 decode tokens where expert 5 is every token's first choice (256 rows: 16 tiles): the kernels with an
    expert's row tiles shared by several programs give the one-program results bitwise."""
    from dataclasses import replace

    from league.ops.moe.triton import down_fwd, gate_up_swiglu_fwd, tile_configs

    x, w_gate_up, w_down, _, _ = bf16_moe_inputs(256)
    logits = randn(256, NUM_EXPERTS, seed=4)
    logits[:, 5] = logits.amax(-1) + 1.0
    weights, experts = route_topk(logits, TOP_K)
    weights = weights.to(torch.bfloat16)
    order, offs = sort_pairs(experts, NUM_EXPERTS)
    outs = []
    with torch.no_grad():
        for splits in (1, row_splits):
            gate_up_config, down_config = (
                replace(c, row_splits=splits) for c in tile_configs(order.numel(), NUM_EXPERTS)
            )
            h = gate_up_swiglu_fwd(x, order, offs, w_gate_up, TOP_K, gate_up_config)
            outs.append((h, down_fwd(h, order, offs, w_down, weights.reshape(-1), down_config)))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_triton_moe_serves_only_no_grad_calls():
    from league.ops.moe.triton import grouped_swiglu_experts_triton

    x, w_gate_up, w_down, weights, experts = bf16_moe_inputs(16)
    x.requires_grad_()
    with pytest.raises(ValueError, match="no backward"):
        grouped_swiglu_experts_triton(x, w_gate_up, w_down, weights, experts)
    out = swiglu_experts(x, w_gate_up, w_down, weights, experts)  # gradients wanted: the grouped GEMMs
    assert torch.equal(out, grouped_swiglu_experts(x, w_gate_up, w_down, weights, experts))


@pytest.mark.parametrize("num_tokens", [1, 64, 256, 1024, 2048])
@pytest.mark.parametrize("case", ["routed", "unused_experts", "one_expert_takes_all"])
def test_triton_sort_pairs_matches_torch(num_tokens, case):
    from league.ops.moe.triton import sort_pairs_triton

    experts = route_topk(randn(num_tokens, NUM_EXPERTS, seed=12), TOP_K)[1]
    if case == "unused_experts":  # experts 0..127 receive no pair
        experts = experts // 2 + 128
    if case == "one_expert_takes_all":
        experts = torch.full_like(experts, 5)
    order, offs, inverse = sort_pairs_triton(experts, NUM_EXPERTS, with_inverse=True)
    ref_order, ref_offs = sort_pairs(experts, NUM_EXPERTS)
    ref_inverse = torch.empty_like(ref_order).scatter_(0, ref_order, torch.arange(ref_order.numel(), device="cuda"))
    assert torch.equal(order, ref_order) and torch.equal(offs, ref_offs) and torch.equal(inverse, ref_inverse)


@torch.no_grad()
def test_triton_sort_pairs_replays_in_a_cuda_graph():
    from league.ops.moe.triton import sort_pairs_triton

    experts = route_topk(randn(256, NUM_EXPERTS, seed=13), TOP_K)[1]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        sort_pairs_triton(experts, NUM_EXPERTS, with_inverse=True)  # compiles the kernel outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = sort_pairs_triton(experts, NUM_EXPERTS, with_inverse=True)
    experts.copy_(route_topk(randn(256, NUM_EXPERTS, seed=14), TOP_K)[1])
    graph.replay()
    torch.cuda.synchronize()
    order, offs, inverse = captured  # other routing, same buffers: the graph must not have baked it in
    ref_order, ref_offs = sort_pairs(experts, NUM_EXPERTS)
    assert torch.equal(order, ref_order) and torch.equal(offs, ref_offs)
    assert torch.equal(inverse[order], torch.arange(experts.numel(), device="cuda"))


@pytest.mark.parametrize("chunk_size,temperature", [(1024, 1.0), (300, 0.7)])
def test_fused_head_logprobs_match_unfused(chunk_size, temperature):
    num_rows = 1024
    hidden = randn(num_rows, DIM, seed=5).bfloat16()
    weight = randn(VOCAB, DIM, seed=6, scale=4 * DIM**-0.5).bfloat16()
    tokens = torch.randint(0, VOCAB, (num_rows,), device="cuda", generator=torch.Generator("cuda").manual_seed(7))
    grad_out = randn(num_rows, seed=8)
    results = []
    for fused in (True, False):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        if fused:
            logp = linear_token_logprobs(h, w, tokens, temperature, chunk_size=chunk_size)
        else:
            logp = token_logprobs(F.linear(h, w).float() / temperature, tokens)
        logp.backward(grad_out)
        results.append((logp.detach(), h.grad, w.grad))
        del logp, h, w
    (logp, gh, gw), (logp_ref, gh_ref, gw_ref) = results
    assert logp.dtype == torch.float32 and gh.dtype == gw.dtype == torch.bfloat16
    if chunk_size >= num_rows:  # one chunk: the very same logits
        torch.testing.assert_close(logp, logp_ref, rtol=0, atol=1e-5)
    else:
        assert (logp - logp_ref).abs().max().item() < 0.1 and rel_err(logp, logp_ref) < 1e-3
    assert rel_err(gh, gh_ref) < 1e-2 and rel_err(gw, gw_ref) < 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_token_logprobs_kernel_matches_reference(dtype):
    """``token_logprobs`` on CUDA (the log-sum-exp kernel over the logits in their dtype, gradient by the
    logits-gradient kernel) against the torch reference; a row's value does not depend on the other rows."""
    from league.ops.logprob import token_logprobs_reference

    num_rows = 300
    logits = randn(num_rows, VOCAB, seed=9, scale=3.0).to(dtype)
    tokens = torch.randint(0, VOCAB, (num_rows,), device="cuda", generator=torch.Generator("cuda").manual_seed(10))
    grad_out = randn(num_rows, seed=11)
    results = []
    for fn in (token_logprobs, token_logprobs_reference):
        z = logits.clone().requires_grad_()
        logp = fn(z, tokens)
        logp.backward(grad_out)
        results.append((logp.detach(), z.grad))
    (logp, grad), (logp_ref, grad_ref) = results
    assert logp.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(logp, logp_ref, rtol=0, atol=2e-5)
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 1e-5  # one bf16 rounding; fp32 exp and log-sum-exp rounding
    assert ((grad.float() - grad_ref.float()).abs() <= ulp * grad_ref.float().abs() + 1e-12).all()
    with torch.no_grad():
        assert torch.equal(token_logprobs(logits[5:12], tokens[5:12]), logp[5:12])


def test_fused_head_memory_stays_within_chunks():
    """Forward and backward of 8,192 rows at V = 248,320 (fp32 logits alone would be 8 GB)."""
    num_rows, chunk_size = 8192, 1024
    hidden = randn(num_rows, DIM, seed=5).bfloat16().requires_grad_()
    weight = randn(VOCAB, DIM, seed=6, scale=4 * DIM**-0.5).bfloat16().requires_grad_()
    tokens = torch.randint(0, VOCAB, (num_rows,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    linear_token_logprobs(hidden, weight, tokens, chunk_size=chunk_size).sum().backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    chunk_logits_fp32 = chunk_size * VOCAB * 4
    weight_grad = VOCAB * DIM * 2  # the bf16 result, written block by block (no fp32 sum of the whole)
    assert peak < weight_grad + 4 * chunk_logits_fp32, f"peak {peak / 2**30:.1f} GiB"


@pytest.mark.parametrize("dim,num_rows", [(2048, 4096), (128, 8192 * 2)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_rms_norm_matches_reference(dim, num_rows, dtype):
    x = randn(num_rows, dim, seed=9, scale=3.0).to(dtype)
    w = randn(dim, seed=10, scale=0.2).to(dtype)
    grad_out = randn(num_rows, dim, seed=11).to(dtype)
    results = []
    for fn in (rms_norm, rms_norm_reference):  # rms_norm runs the Triton kernel on CUDA
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = fn(xr, wr, 1e-6)
        out.backward(grad_out)
        results.append((out.detach(), xr.grad, wr.grad))
    (out, dx, dw), (ref, dx_ref, dw_ref) = results
    assert out.dtype == dx.dtype == dw.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-5)
        assert rel_err(dw, dw_ref) < 1e-5
    else:
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(dx, dx_ref)
        torch.testing.assert_close(dw, dw_ref)
    # each row is reduced on its own: a row's output does not depend on the batch
    assert torch.equal(out[5:6], rms_norm(x[5:6], w, 1e-6)) and torch.equal(out[:100], rms_norm(x[:100], w, 1e-6))
