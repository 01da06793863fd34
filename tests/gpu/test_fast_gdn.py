"""The CUDA fast paths of the gated delta rule at the real model sizes (Hk=16, Hv=32, K=V=128), against the torch
references run in fp32 on the same GPU (skipped without CUDA; the fla tests also without fla).

Errors are ``||got - ref|| / ||ref||`` over a whole tensor, except where a test asserts bitwise equality.
Run on the GPU machine with ``python -m pytest tests/gpu/test_fast_gdn.py -q -s`` (``-s`` prints the errors).
"""

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from league.ops import gdn
from league.ops.gdn.chunk import chunk_gated_delta_rule, chunk_gated_delta_rule_varlen
from league.ops.gdn.recurrent import recurrent_gated_delta_rule, recurrent_gated_delta_rule_slots

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_FLA = HAS_TRITON and importlib.util.find_spec("fla") is not None
pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not HAS_TRITON, reason="needs triton"),
]
needs_fla = pytest.mark.skipif(not HAS_FLA, reason="needs fla")

HK, HV, K, V = 16, 32, 128, 128
LENS = [700, 64, 1, 517, 766]  # 2048 tokens: a sequence of one token, one of exactly one chunk, ragged ends


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double(), ref.double()
    return ((got - ref).norm() / ref.norm().clamp(min=1e-30)).item()


def step_inputs(num_reqs, num_tokens, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device="cuda")

    mixed = randn(num_reqs, num_tokens, 2 * HK * K + HV * V).to(dtype)
    q, k, v = mixed.split([HK * K, HK * K, HV * V], dim=-1)
    q, k, v = q.unflatten(-1, (HK, K)), k.unflatten(-1, (HK, K)), v.unflatten(-1, (HV, V))
    g = F.logsigmoid(randn(num_reqs, num_tokens, HV))
    beta = torch.sigmoid(randn(num_reqs, num_tokens, HV)).to(dtype)
    state = randn(num_reqs, HV, K, V) * 0.1
    return q, k, v, g, beta, state


def fp32(inputs):
    return [x.float() for x in inputs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [1, 4, 8])
@pytest.mark.parametrize("return_all_states", [False, True])
def test_recurrent_kernel_matches_reference(dtype, num_tokens, return_all_states):
    inputs = step_inputs(8, num_tokens, dtype)
    o, states = gdn.recurrent_gated_delta_rule(*inputs, return_all_states=return_all_states)
    o_ref, states_ref = recurrent_gated_delta_rule(*fp32(inputs), return_all_states=return_all_states)
    errs = rel_err(o, o_ref), rel_err(states, states_ref)
    print(f"recurrent {dtype} T={num_tokens} all={return_all_states}: o {errs[0]:.2e} states {errs[1]:.2e}")
    assert o.dtype == dtype and states.dtype == torch.float32 and states.shape == states_ref.shape
    assert errs[0] < (1e-5 if dtype == torch.float32 else 1e-2) and errs[1] < 1e-5


def test_recurrent_kernel_is_invariant_to_batch_and_form():
    """Bitwise: a request alone == in a batch; slot form == state form (the same compiled kernel)."""
    from league.ops.gdn.triton_recurrent import recurrent_gated_delta_rule_fwd, recurrent_gated_delta_rule_slots_fwd

    q, k, v, g, beta, state = step_inputs(6, 8, torch.bfloat16, seed=1)
    o_all, s_all = recurrent_gated_delta_rule_fwd(q, k, v, g, beta, state)
    o_one, s_one = recurrent_gated_delta_rule_fwd(*(x[2:3] for x in (q, k, v, g, beta, state)))
    assert torch.equal(o_one[0], o_all[2]) and torch.equal(s_one[0], s_all[2])
    slots = torch.tensor([7, 0, 3, 9, 1, 4], device="cuda")
    cache = torch.zeros(10, HV, K, V, device="cuda")
    cache[slots] = state
    o_slots = recurrent_gated_delta_rule_slots_fwd(q, k, v, g, beta, cache, slots)
    assert torch.equal(o_slots, o_all) and torch.equal(cache[slots], s_all)


def test_recurrent_kernel_token_splits_and_recorded_states_agree():
    """T tokens at once vs one at a time, and the recorded states (verify) vs the final one (decode): to fp32
    rounding. Not bitwise: these are distinct compilations of the kernel (a constexpr flag, T = 1), and the
    compiler may fuse multiply-adds differently in each."""
    from league.ops.gdn.triton_recurrent import recurrent_gated_delta_rule_fwd

    q, k, v, g, beta, state = step_inputs(6, 8, torch.bfloat16, seed=1)
    o_all, s_all = recurrent_gated_delta_rule_fwd(q, k, v, g, beta, state)
    _, steps_all = recurrent_gated_delta_rule_fwd(q, k, v, g, beta, state, return_all_states=True)
    assert rel_err(steps_all[:, -1], s_all) < 1e-6
    s = state[2:3]
    for t in range(8):
        o_t, s = recurrent_gated_delta_rule_fwd(*(x[2:3, t : t + 1] for x in (q, k, v, g, beta)), s)
        assert rel_err(o_t[0, 0], o_all[2, t]) < 1e-2 and rel_err(s[0], steps_all[2, t]) < 1e-6


@pytest.mark.parametrize("verify", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_slots_kernel_matches_reference_and_leaves_the_rest(verify, dtype):
    num_tokens = 4 if verify else 1
    q, k, v, g, beta, _ = step_inputs(6, num_tokens, dtype, seed=2)
    cache = torch.randn(10, HV, K, V, device="cuda")
    slots = torch.tensor([7, -1, 3, 9, 1, -1], device="cuda")
    fresh = torch.tensor([False, False, True, False, False, False], device="cuda")
    caches = [cache.clone(), cache.clone()]
    commit = not verify
    o = gdn.recurrent_gated_delta_rule_slots(q, k, v, g, beta, caches[0], slots, None, fresh, commit)
    o_ref = recurrent_gated_delta_rule_slots(*fp32((q, k, v, g, beta)), caches[1], slots, None, fresh, commit)
    rows = [0, 2, 3, 4]  # not padding: the outputs of padding rows are meaningless
    assert rel_err(o[rows], o_ref[rows]) < (1e-5 if dtype == torch.float32 else 1e-2)
    assert rel_err(caches[0], caches[1]) < 1e-5
    untouched = [0, 2, 4, 5, 6, 8] + ([1, 3, 7, 9] if verify else [])  # a verify writes no state
    assert all(torch.equal(caches[0][i], cache[i]) for i in untouched)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_committing_a_verified_prefix_equals_decoding_it_bitwise(state_dtype):
    """A verify reads the states only; its accepted prefix is committed by stepping it again from the same states
    with -inf gate projections past it (the model's commit). The committed state must be, bit for bit, the one that
    running just the accepted tokens through the kernel from those states gives (as a decode step would)."""
    num_reqs, width = 8, 4
    q, k, v, _, _, _ = step_inputs(num_reqs, width, torch.bfloat16, seed=11)
    gen = torch.Generator(device="cuda").manual_seed(12)
    a, b = (torch.randn(num_reqs, width, HV, generator=gen, device="cuda").mul(2).to(torch.bfloat16) for _ in "ab")
    params = tuple(torch.randn(HV, generator=gen, device="cuda").to(torch.bfloat16) for _ in "pd")
    cache = (torch.randn(num_reqs + 2, HV, K, V, generator=gen, device="cuda") * 0.1).to(state_dtype)
    slots = torch.tensor([9, 0, 3, 2, 8, 1, 5, 4], device="cuda")
    accepted = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0], device="cuda")
    expected = cache.clone()
    for n in range(width):
        rows = (accepted == n).nonzero()[:, 0]
        kept = (x[rows, : n + 1] for x in (q, k, v, a, b))
        gdn.recurrent_gated_delta_rule_slots(*kept, expected, slots[rows], gate_params=params)
    before = cache.clone()
    gdn.recurrent_gated_delta_rule_slots(q, k, v, a, b, cache, slots, None, None, False, params)
    assert torch.equal(cache, before)
    dropped = (torch.arange(width, device="cuda") > accepted[:, None])[..., None]
    a_kept, b_kept = (x.masked_fill(dropped, float("-inf")) for x in (a, b))
    gdn.recurrent_gated_delta_rule_slots(q, k, v, a_kept, b_kept, cache, slots, gate_params=params)
    assert torch.equal(cache, expected)


@pytest.mark.parametrize("verify", [False, True])
def test_slots_kernel_makes_the_gates_like_gdn_gates(verify):
    """bf16 projections a and b in, the gates made in the kernel: g within fp32 rounding of ``gdn_gates`` (so
    outputs and states within 1e-5), beta rounded to bf16 as torch's sigmoid rounds it."""
    from league.ops.gdn.gates import gdn_gates

    num_tokens = 4 if verify else 1
    q, k, v, _, _, _ = step_inputs(64, num_tokens, torch.bfloat16, seed=5)
    gen = torch.Generator(device="cuda").manual_seed(6)
    a, b = (torch.randn(64, num_tokens, HV, generator=gen, device="cuda").mul(4).to(torch.bfloat16) for _ in range(2))
    a_log = torch.randn(HV, generator=gen, device="cuda").to(torch.bfloat16)
    dt_bias = torch.randn(HV, generator=gen, device="cuda").to(torch.bfloat16)
    cache = torch.randn(64, HV, K, V, device="cuda") * 0.1
    slots = torch.randperm(64, device="cuda")
    caches = [cache.clone(), cache.clone()]
    g, beta = gdn_gates(a, b, a_log, dt_bias)
    o_raw = gdn.recurrent_gated_delta_rule_slots(
        q, k, v, a, b, caches[0], slots, None, None, not verify, (a_log, dt_bias)
    )
    o = gdn.recurrent_gated_delta_rule_slots(q, k, v, g, beta, caches[1], slots, None, None, not verify)
    print(f"raw gates vs torch gates: out {rel_err(o_raw, o):.2e}, states {rel_err(caches[0], caches[1]):.2e}")
    assert rel_err(o_raw, o) < 1e-3 and rel_err(caches[0], caches[1]) < 1e-5


@pytest.mark.parametrize("verify", [False, True])
def test_slots_kernel_replays_in_a_cuda_graph(verify):
    q, k, v, g, beta, _ = step_inputs(4, 3 if verify else 1, torch.bfloat16, seed=3)
    static = [x.clone() for x in (q, k, v, g, beta)]
    cache = torch.randn(6, HV, K, V, device="cuda")
    slots = torch.tensor([5, 0, 2, -1], device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up compiles the kernel outside the capture
        gdn.recurrent_gated_delta_rule_slots(*static, cache.clone(), slots, commit=not verify)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gdn.recurrent_gated_delta_rule_slots(*static, cache, slots, commit=not verify)
    for buffer, value in zip(static, step_inputs(4, q.shape[1], torch.bfloat16, seed=4)[:5]):
        buffer.copy_(value)
    slots.copy_(torch.tensor([1, 3, -1, 4], device="cuda"))
    expected_cache = cache.clone()
    graph.replay()
    expected = gdn.recurrent_gated_delta_rule_slots(*static, expected_cache, slots, commit=not verify)
    rows = [0, 1, 3]  # row 2 is padding
    assert torch.equal(out[rows], expected[rows]) and torch.equal(cache, expected_cache)


def packed_inputs(lens, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device="cuda")

    num_tokens = sum(lens)
    q, k = randn(num_tokens, HK, K).to(dtype), randn(num_tokens, HK, K).to(dtype)
    v = randn(num_tokens, HV, V).to(dtype)
    g = F.logsigmoid(randn(num_tokens, HV))
    beta = torch.sigmoid(randn(num_tokens, HV)).to(dtype)
    state = randn(len(lens), HV, K, V) * 0.1
    cu_seqlens = torch.tensor([0, *lens], device="cuda").cumsum(0)
    return [q, k, v, g, beta, state], cu_seqlens


def forward_backward(fn, inputs, grad_o, grad_final):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    o, final = fn(*leaves)
    torch.autograd.backward((o, final), (grad_o.to(o.dtype), grad_final))
    return [o.detach(), final.detach(), *(x.grad for x in leaves)]


@needs_fla
@pytest.mark.parametrize("dtype", [torch.bfloat16])  # fp32 keeps the torch reference (fla computes it in tf32)
@pytest.mark.parametrize("backward", ["torch", "fla"])
def test_fla_chunk_forward_and_backward_match_reference(dtype, backward):
    from league.ops.gdn.fast import chunk_gated_delta_rule_fla

    inputs, cu_seqlens = packed_inputs(LENS, dtype)
    gen = torch.Generator(device="cuda").manual_seed(5)
    grad_o = torch.randn(sum(LENS), HV, V, generator=gen, device="cuda")
    grad_final = torch.randn(len(LENS), HV, K, V, generator=gen, device="cuda")

    def fast(q, k, v, g, beta, state):
        o, final = chunk_gated_delta_rule_fla(
            *(x[None] for x in (q, k, v, g, beta)), state, cu_seqlens=cu_seqlens, backward=backward
        )
        return o[0], final

    def reference(q, k, v, g, beta, state):
        return chunk_gated_delta_rule_varlen(q, k, v, g, beta, cu_seqlens, state)

    got = forward_backward(fast, inputs, grad_o, grad_final)
    ref = forward_backward(reference, fp32(inputs), grad_o, grad_final)
    # fla's matmuls run in tf32 for fp32 inputs; in bf16 the inputs of its matmuls (and its chunk states) are bf16
    fwd_tol, bwd_tol = (5e-3, 1e-2) if dtype == torch.float32 else (2e-2, 3e-2)
    names = ["o", "final", "dq", "dk", "dv", "dg", "dbeta", "dstate"]
    errs = {name: rel_err(a, b) for name, a, b in zip(names, got, ref)}
    print(f"fla chunk {dtype} backward={backward}: " + " ".join(f"{n} {e:.2e}" for n, e in errs.items()))
    for name, err in errs.items():
        assert err < (fwd_tol if name in ("o", "final") else bwd_tol), (name, err)


@needs_fla
def test_package_chunk_call_takes_fla_and_matches_reference():
    """``gdn.chunk_gated_delta_rule`` as the model calls it: sequences folded into the head dim of one sequence."""
    inputs, _ = packed_inputs([300, 300], torch.bfloat16, seed=6)

    def fold(x):  # [2 * 300, H, ...] -> [300, 2 * H, ...]
        return x.view(2, 300, *x.shape[1:]).transpose(0, 1).reshape(300, 2 * x.shape[1], *x.shape[2:])

    folded = [fold(x) for x in inputs[:5]] + [inputs[5].flatten(0, 1)]
    o, final = gdn.chunk_gated_delta_rule(*folded)
    o_ref, final_ref = chunk_gated_delta_rule(*fp32(folded))
    assert rel_err(o, o_ref) < 2e-2 and rel_err(final, final_ref) < 2e-2


def test_gated_rms_norm_kernel_matches_reference():
    """The GDN output norm at the model's shape (Hv = 32 heads of V = 128), bf16: rare elements differ from the
    reference (fp32 summation order and SiLU's exp; measured on an H200: 2e-6 of them), by at most three bf16 ulps
    (an ulp of an intermediate rounding can carry through), gradients by the reference."""
    from league.ops.norm import gated_rms_norm, gated_rms_norm_reference

    gen = torch.Generator(device="cuda").manual_seed(7)
    x, z, grad = (torch.randn(512, HV, V, generator=gen, device="cuda").to(torch.bfloat16) for _ in range(3))
    w = (1 + 0.2 * torch.randn(V, generator=gen, device="cuda")).to(torch.bfloat16)
    results = []
    for fn in (gated_rms_norm, gated_rms_norm_reference):  # gated_rms_norm runs the kernel on CUDA
        leaves = [t.clone().requires_grad_() for t in (x, z, w)]
        out = fn(*leaves, 1e-6)
        out.backward(grad)
        results.append((out.detach(), *(t.grad for t in leaves)))
    (out, *grads), (ref, *ref_grads) = results
    differ = (out != ref).float().mean().item()
    ulp = ref.float().abs().clamp(min=1e-30) * 2**-7
    print(f"gated norm: {differ:.2e} of elements differ")
    assert differ < 1e-3 and bool(((out.float() - ref.float()).abs() <= 3 * ulp).all())
    for got, expected in zip(grads, ref_grads):
        assert rel_err(got, expected) < 1e-2
