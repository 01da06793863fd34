"""The fast paths of the gated delta rule (``triton_recurrent.py``, ``fast.py``) against the torch references, on
CPU under ``TRITON_INTERPRET=1`` (or on CUDA), and the references they are checked against (no Triton needed).

fla's kernels run under Triton 3.6's interpreter only with three test-local patches (``fla_interpreter``):
autotuning would benchmark on a driver the interpreter lacks, the interpreter turns runtime scalars into Python
ints with a conversion NumPy >= 2.4 rejects, and it makes ``range`` loop variables plain ints, which fla's
kernels call ``.to`` on.
"""

import importlib.util
import os
import sys

import pytest
import torch

from league.ops import gdn
from league.ops.gdn.chunk import chunk_gated_delta_rule_varlen
from league.ops.gdn.naive import naive_gated_delta_rule
from league.ops.gdn.recurrent import recurrent_gated_delta_rule, recurrent_gated_delta_rule_slots

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_FLA = HAS_TRITON and importlib.util.find_spec("fla") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CAN_RUN_TRITON = HAS_TRITON and (torch.cuda.is_available() or INTERPRET)
DEVICE = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"
needs_triton = pytest.mark.skipif(not CAN_RUN_TRITON, reason="needs triton and CUDA or TRITON_INTERPRET=1")
needs_fla = pytest.mark.skipif(not (CAN_RUN_TRITON and HAS_FLA), reason="needs fla, triton and CUDA or interpreter")


def step_inputs(num_reqs, num_tokens, num_k_heads, num_v_heads, k_dim, v_dim, seed, dtype=torch.float32):
    """Recurrent-form inputs; q, k, v are strided views of one projection, as the model passes them."""
    gen = torch.Generator().manual_seed(seed)
    width = 2 * num_k_heads * k_dim + num_v_heads * v_dim
    mixed = torch.randn(num_reqs, num_tokens, width, generator=gen)
    q, k, v = mixed.split([num_k_heads * k_dim, num_k_heads * k_dim, num_v_heads * v_dim], dim=-1)
    q = q.unflatten(-1, (num_k_heads, k_dim))
    k = k.unflatten(-1, (num_k_heads, k_dim))
    v = v.unflatten(-1, (num_v_heads, v_dim))
    g = -torch.rand(num_reqs, num_tokens, num_v_heads, generator=gen) * 2
    beta = torch.rand(num_reqs, num_tokens, num_v_heads, generator=gen)
    state = torch.randn(num_reqs, num_v_heads, k_dim, v_dim, generator=gen)
    q, k, v, beta = (x.to(DEVICE, dtype) for x in (q, k, v, beta))
    return q, k, v, g.to(DEVICE), beta, state.to(DEVICE)


def packed_inputs(lens, num_k_heads, num_v_heads, k_dim, v_dim, seed):
    gen = torch.Generator().manual_seed(seed)
    num_tokens = sum(lens)
    q = torch.randn(num_tokens, num_k_heads, k_dim, generator=gen)
    k = torch.randn(num_tokens, num_k_heads, k_dim, generator=gen)
    v = torch.randn(num_tokens, num_v_heads, v_dim, generator=gen)
    g = torch.nn.functional.logsigmoid(torch.randn(num_tokens, num_v_heads, generator=gen))
    beta = torch.rand(num_tokens, num_v_heads, generator=gen)
    state = torch.randn(len(lens), num_v_heads, k_dim, v_dim, generator=gen)
    cu_seqlens = torch.tensor([0, *lens]).cumsum(0)
    return [x.to(DEVICE) for x in (q, k, v, g, beta, state, cu_seqlens)]


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference, relative to the reference's largest magnitude when that exceeds 1."""
    if b.numel() == 0:
        return 0.0
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1)).item()


def test_varlen_reference_equals_naive_per_sequence():
    lens = [37, 130, 1, 64, 0, 20]
    *inputs, cu_seqlens = (x.cpu() for x in packed_inputs(lens, 2, 4, 12, 8, seed=1))
    q, k, v, g, beta, state = (x.double() for x in inputs)
    o, final = chunk_gated_delta_rule_varlen(q, k, v, g, beta, cu_seqlens, state)
    for i, (start, end) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
        o_ref, s_ref = naive_gated_delta_rule(*(x[start:end] for x in (q, k, v, g, beta)), state[i])
        assert max_err(o[start:end], o_ref) < 1e-10 and max_err(final[i], s_ref) < 1e-10


def test_slots_reference_commits_only_its_slots():
    q, k, v, g, beta, _ = (x.cpu() for x in step_inputs(3, 2, 1, 2, 8, 8, seed=2))
    cache = torch.randn(5, 2, 8, 8)
    slots, fresh = torch.tensor([3, -1, 0]), torch.tensor([False, False, True])
    updated = cache.clone()
    o = recurrent_gated_delta_rule_slots(q, k, v, g, beta, updated, slots, fresh_B=fresh)
    start = torch.stack([cache[3], torch.zeros(2, 8, 8), torch.zeros(2, 8, 8)])
    o_ref, s_ref = recurrent_gated_delta_rule(q, k, v, g, beta, start)
    assert torch.equal(o, o_ref)
    assert torch.equal(updated[3], s_ref[0]) and torch.equal(updated[0], s_ref[2])
    assert all(torch.equal(updated[i], cache[i]) for i in (1, 2, 4))


def test_cpu_tensors_take_the_references():
    q, k, v, g, beta, state = (x.cpu() for x in step_inputs(2, 3, 1, 2, 8, 8, seed=3))
    got = gdn.recurrent_gated_delta_rule(q, k, v, g, beta, state, return_all_states=True)
    ref = recurrent_gated_delta_rule(q, k, v, g, beta, state, return_all_states=True)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    lens = [30, 5]
    q, k, v, g, beta, state, cu_seqlens = (x.cpu() for x in packed_inputs(lens, 1, 2, 8, 8, seed=4))
    got = gdn.chunk_gated_delta_rule_varlen(q, k, v, g, beta, cu_seqlens, state)
    ref = chunk_gated_delta_rule_varlen(q, k, v, g, beta, cu_seqlens, state)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))


@needs_triton
@pytest.mark.parametrize("return_all_states", [False, True])
@pytest.mark.parametrize("num_tokens", [1, 4])
@pytest.mark.parametrize("shape", [(3, 2, 4, 16, 16), (2, 1, 1, 12, 20)])
def test_recurrent_kernel_matches_reference_fp32(shape, num_tokens, return_all_states):
    from league.ops.gdn.triton_recurrent import recurrent_gated_delta_rule_fwd

    num_reqs, num_k_heads, num_v_heads, k_dim, v_dim = shape
    inputs = step_inputs(num_reqs, num_tokens, num_k_heads, num_v_heads, k_dim, v_dim, seed=sum(shape))
    state_before = inputs[-1].clone()
    o, states = recurrent_gated_delta_rule_fwd(*inputs, return_all_states=return_all_states)
    o_ref, states_ref = recurrent_gated_delta_rule(*inputs, return_all_states=return_all_states)
    assert states.shape == states_ref.shape and states.dtype == torch.float32
    assert max_err(o, o_ref) < 1e-5 and max_err(states, states_ref) < 1e-5
    assert torch.equal(inputs[-1], state_before)


@needs_triton
def test_recurrent_kernel_bf16_inputs():
    from league.ops.gdn.triton_recurrent import recurrent_gated_delta_rule_fwd

    inputs = step_inputs(2, 3, 2, 4, 16, 16, seed=5, dtype=torch.bfloat16)
    o, states = recurrent_gated_delta_rule_fwd(*inputs)
    o_ref, states_ref = recurrent_gated_delta_rule(*inputs)
    assert o.dtype == torch.bfloat16 and states.dtype == torch.float32
    assert max_err(o, o_ref) < 1e-2 and max_err(states, states_ref) < 1e-5


@needs_triton
def test_recurrent_kernel_is_invariant_to_token_splits_batch_and_form():
    """A request's numbers do not depend on how its tokens are split across calls, on the other requests of the
    batch, or on whether its state lives in a slot (what batch-invariant trainer/engine parity needs)."""
    from league.ops.gdn.triton_recurrent import recurrent_gated_delta_rule_fwd, recurrent_gated_delta_rule_slots_fwd

    q, k, v, g, beta, state = step_inputs(3, 4, 2, 4, 16, 16, seed=6)
    o_all, s_all = recurrent_gated_delta_rule_fwd(q, k, v, g, beta, state)
    s = state[1:2]
    for t in range(4):
        o_t, s = recurrent_gated_delta_rule_fwd(*(x[1:2, t : t + 1] for x in (q, k, v, g, beta)), s)
        assert torch.equal(o_t[0, 0], o_all[1, t])
    assert torch.equal(s[0], s_all[1])
    cache = torch.zeros(5, 4, 16, 16, device=DEVICE)
    cache[[4, 0, 2]] = state
    o_slots = recurrent_gated_delta_rule_slots_fwd(q, k, v, g, beta, cache, torch.tensor([4, 0, 2], device=DEVICE))
    assert torch.equal(o_slots, o_all) and torch.equal(cache[[4, 0, 2]], s_all)


@needs_triton
@pytest.mark.parametrize("verify", [False, True])
def test_slots_kernel_matches_reference_and_leaves_the_rest(verify):
    from league.ops.gdn.triton_recurrent import recurrent_gated_delta_rule_slots_fwd

    num_tokens = 4 if verify else 1
    q, k, v, g, beta, _ = step_inputs(4, num_tokens, 2, 4, 16, 12, seed=7)
    gen = torch.Generator().manual_seed(8)
    cache = torch.randn(6, 4, 16, 12, generator=gen).to(DEVICE)
    slots = torch.tensor([5, -1, 1, 2], device=DEVICE)
    fresh = torch.tensor([False, False, False, True], device=DEVICE)
    caches = [cache.clone(), cache.clone()]
    o = recurrent_gated_delta_rule_slots_fwd(q, k, v, g, beta, caches[0], slots, None, fresh, not verify)
    o_ref = recurrent_gated_delta_rule_slots(q, k, v, g, beta, caches[1], slots, None, fresh, not verify)
    assert max_err(o, o_ref) < 1e-5
    assert max_err(caches[0], caches[1]) < 1e-5
    untouched = [0, 3, 4] + ([1, 2, 5] if verify else [])  # a verify writes no state
    assert all(torch.equal(caches[0][i], cache[i]) for i in untouched)


@needs_triton
def test_recurrent_gradients_come_from_the_reference():
    from league.ops.gdn import recurrent_gated_delta_rule_kernel

    inputs = step_inputs(2, 3, 1, 2, 8, 8, seed=9)
    grads = []
    for fn in (recurrent_gated_delta_rule_kernel, recurrent_gated_delta_rule):
        leaves = [x.clone().requires_grad_() for x in inputs]
        o, states = fn(*leaves, return_all_states=True)
        weights = torch.linspace(-1, 1, o.numel(), device=DEVICE).view_as(o)
        ((o * weights).sum() + states.pow(2).sum()).backward()
        grads.append([x.grad for x in leaves])
    assert all(max_err(a, b) < 1e-5 for a, b in zip(*grads))


@pytest.fixture
def fla_interpreter(monkeypatch):
    """Make fla 0.6.0's kernels runnable under Triton 3.6's interpreter (see the module docstring). On CUDA these
    toy-shape cases are skipped: ``tests/gpu/test_fast_gdn.py`` tests fla's chunked rule at the model's sizes there,
    while here fla's autotuning of its fp32 backward ran past two minutes on an H200."""
    if DEVICE == "cuda":
        pytest.skip(
            "toy shapes for the CPU interpreter; on CUDA fla's chunked rule is tested at the model's sizes by "
            "tests/gpu/test_fast_gdn.py::test_fla_chunk_forward_and_backward_match_reference"
        )
    if not INTERPRET:
        return
    import fla.ops.gated_delta_rule.chunk  # noqa: F401  (loads every kernel module the chunked rule uses)
    import triton.language as tl
    from triton.runtime import autotuner, interpreter

    monkeypatch.setattr(autotuner.Autotuner, "_bench", lambda self, *args, config, **meta: [0.0, 0.0, 0.0])
    patch_tensor = interpreter._patch_lang_tensor

    def patch_tensor_index(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    monkeypatch.setattr(interpreter, "_patch_lang_tensor", patch_tensor_index)

    class LoopIndex(int):
        def to(self, dtype, **kwargs):
            return tl.full((), int(self), dtype)

    def loop_range(*args):
        return (LoopIndex(i) for i in range(*(int(a) for a in args)))

    for name, module in list(sys.modules.items()):
        if name.startswith(("fla.ops", "fla.modules")) and module is not None:
            monkeypatch.setattr(module, "range", loop_range, raising=False)


@needs_fla
@pytest.mark.parametrize(
    "layout,backward,dtype",
    [
        ("varlen", "torch", torch.float32),
        ("varlen", "fla", torch.float32),
        ("batch", "fla", torch.float32),
        ("varlen", "fla", torch.float16),
    ],
    ids=str,
)
def test_fla_chunk_forward_and_backward_match_reference(fla_interpreter, layout, backward, dtype):
    """fp16 stands in for bf16 here: the interpreter's bf16 arithmetic overflows in fla's own kernels."""
    from league.ops.gdn.fast import chunk_gated_delta_rule_fla

    lens = [37, 70, 1, 20] if layout == "varlen" else [70, 70]
    inputs = packed_inputs(lens, 2, 4, 16, 8, seed=10)
    cu_seqlens = inputs.pop()
    for i in (0, 1, 2, 4):  # q, k, v, beta
        inputs[i] = inputs[i].to(dtype)

    def fast(q, k, v, g, beta, state):
        if layout == "varlen":
            o, final = chunk_gated_delta_rule_fla(
                *(x[None] for x in (q, k, v, g, beta)), state, cu_seqlens=cu_seqlens, backward=backward
            )
            return o[0], final
        batched = (x.unflatten(0, (2, 70)) for x in (q, k, v, g, beta))
        o, final = chunk_gated_delta_rule_fla(*batched, state, backward=backward)
        return o.flatten(0, 1), final

    def reference(q, k, v, g, beta, state):
        return chunk_gated_delta_rule_varlen(q, k, v, g, beta, cu_seqlens, state)

    results = []
    for fn, cast in ((fast, dtype), (reference, torch.float32)):
        leaves = [x.to(cast if x.dtype == dtype else x.dtype, copy=True).requires_grad_() for x in inputs]
        o, final = fn(*leaves)
        weights = torch.linspace(-1, 1, o.numel(), device=DEVICE).view_as(o)
        ((o * weights).sum() + (final * final.detach().sin()).sum()).backward()
        results.append([o.detach(), final.detach(), *(x.grad for x in leaves)])
    names = ["o", "final", "dq", "dk", "dv", "dg", "dbeta", "dstate"]
    tol = 1e-5 if dtype == torch.float32 else 5e-3
    for name, got, ref in zip(names, *results):
        assert got.shape == ref.shape and max_err(got, ref) < tol, (name, max_err(got, ref))
    assert [grad.dtype for grad in results[0][2:]] == [x.dtype for x in inputs]


@needs_triton
@pytest.mark.parametrize("verify", [False, True])
def test_slots_kernel_makes_the_gates_of_the_projections(verify):
    """With ``gate_params`` the kernel turns the raw projections a and b into g and beta (``gates.gdn_gates``)."""
    from league.ops.gdn.gates import gdn_gates
    from league.ops.gdn.triton_recurrent import recurrent_gated_delta_rule_slots_fwd

    num_tokens = 3 if verify else 1
    q, k, v, _, _, _ = step_inputs(3, num_tokens, 2, 4, 16, 12, seed=9)
    gen = torch.Generator().manual_seed(10)
    a, b = (torch.randn(3, num_tokens, 4, generator=gen).to(DEVICE) * 3 for _ in range(2))
    a[0, 0, 0] = 25.0  # past softplus' threshold
    a_log, dt_bias = torch.randn(4, generator=gen).to(DEVICE), torch.randn(4, generator=gen).to(DEVICE)
    g, beta = gdn_gates(a, b, a_log, dt_bias)
    cache = torch.randn(4, 4, 16, 12, generator=gen).to(DEVICE)
    slots = torch.tensor([2, 0, 3], device=DEVICE)
    caches = [cache.clone() for _ in range(3)]
    commit = not verify
    o_raw = recurrent_gated_delta_rule_slots_fwd(q, k, v, a, b, caches[0], slots, None, None, commit, (a_log, dt_bias))
    o_gates = recurrent_gated_delta_rule_slots_fwd(q, k, v, g, beta, caches[1], slots, None, None, commit)
    o_ref = recurrent_gated_delta_rule_slots(q, k, v, a, b, caches[2], slots, None, None, commit, (a_log, dt_bias))
    assert max_err(o_raw, o_gates) < 1e-5 and max_err(o_raw, o_ref) < 1e-5
    assert max_err(caches[0], caches[1]) < 1e-5 and max_err(caches[0], caches[2]) < 1e-5
    assert torch.equal(caches[0], cache) == verify


@needs_triton
def test_minus_inf_gate_projections_make_padding_steps_that_keep_the_state():
    """The model pads ragged sequences with -inf gate projections (and zero q/k/v): g = 0 and beta = 0 there, so
    the committed state is the one after the sequence's own last token, in the kernel and in the reference."""
    from league.ops.gdn.triton_recurrent import recurrent_gated_delta_rule_slots_fwd

    q, k, v, _, _, _ = step_inputs(2, 3, 2, 4, 16, 12, seed=11)
    gen = torch.Generator().manual_seed(12)
    a, b = (torch.randn(2, 3, 4, generator=gen).to(DEVICE) for _ in range(2))
    params = (torch.randn(4, generator=gen).to(DEVICE), torch.randn(4, generator=gen).to(DEVICE))
    padded = [x.clone() for x in (q, k, v, a, b)]
    for x, fill in zip(padded, (0.0, 0.0, 0.0, float("-inf"), float("-inf"))):
        x[0, 2:] = fill  # request 0 has two tokens and one padding step
    cache = torch.randn(2, 4, 16, 12, generator=gen).to(DEVICE)
    slots = torch.tensor([0, 1], device=DEVICE)
    for step in (recurrent_gated_delta_rule_slots_fwd, recurrent_gated_delta_rule_slots):
        two_tokens, with_padding = cache.clone(), cache.clone()
        step(*(x[:1, :2] for x in (q, k, v, a, b)), two_tokens[:1], slots[:1], gate_params=params)
        step(*padded, with_padding, slots, gate_params=params)
        assert max_err(with_padding[0], two_tokens[0]) < 1e-6 and torch.isfinite(with_padding).all()


@pytest.mark.parametrize("kernel", [False, pytest.param(True, marks=needs_triton)], ids=["reference", "kernel"])
def test_commit_replays_the_accepted_prefix_to_its_state(kernel):
    """The model's verify-then-commit: a verify (``commit=False``) reads the states and writes none; stepping each
    row's accepted prefix again from the same states, with -inf gate projections past it, commits exactly the
    state after the last accepted token, in the reference and in the kernel."""
    if kernel:
        from league.ops.gdn.triton_recurrent import recurrent_gated_delta_rule_slots_fwd as slots_step
    else:
        slots_step = recurrent_gated_delta_rule_slots
    q, k, v, _, _, _ = step_inputs(4, 3, 2, 4, 16, 12, seed=13)
    gen = torch.Generator().manual_seed(14)
    a, b = (torch.randn(4, 3, 4, generator=gen).to(DEVICE) * 2 for _ in range(2))
    params = (torch.randn(4, generator=gen).to(DEVICE), torch.randn(4, generator=gen).to(DEVICE))
    cache = torch.randn(6, 4, 16, 12, generator=gen).to(DEVICE)
    slots, accepted = torch.tensor([4, 0, 5, 2], device=DEVICE), torch.tensor([0, 2, 1, 2], device=DEVICE)
    expected = cache.clone()
    if kernel:  # the kernel's arithmetic does not depend on the batch: decode each row's accepted tokens alone
        for n in range(3):
            rows = (accepted == n).nonzero()[:, 0]
            slots_step(*(x[rows, : n + 1] for x in (q, k, v, a, b)), expected, slots[rows], gate_params=params)
    else:  # torch's reductions may round differently at other shapes: the state after each step, at this shape
        from league.ops.gdn.gates import gdn_gates

        _, steps = recurrent_gated_delta_rule(q, k, v, *gdn_gates(a, b, *params), cache[slots], None, True)
        expected[slots] = steps[torch.arange(4, device=DEVICE), accepted]
    before = cache.clone()
    slots_step(q, k, v, a, b, cache, slots, None, None, False, params)
    assert torch.equal(cache, before)
    dropped = (torch.arange(3, device=DEVICE) > accepted[:, None])[..., None]
    a_kept, b_kept = (x.masked_fill(dropped, float("-inf")) for x in (a, b))
    slots_step(q, k, v, a_kept, b_kept, cache, slots, gate_params=params)
    assert torch.equal(cache, expected) and not torch.equal(cache, before)
