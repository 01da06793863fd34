"""The slot form of the causal conv (``conv.causal_conv1d_slots``): its torch reference against one sequence at a
time through ``causal_conv1d``, and the Triton kernel against the reference (on CPU under ``TRITON_INTERPRET=1``,
or on CUDA)."""

import importlib.util
import os

import pytest
import torch

from league.ops.conv import causal_conv1d, causal_conv1d_slots_reference

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
needs_triton = pytest.mark.skipif(
    not (HAS_TRITON and (INTERPRET or torch.cuda.is_available())), reason="needs triton and CUDA or TRITON_INTERPRET=1"
)

C, W, SLOTS = 40, 4, 6
LENS = [3, 1, 2, 3]
SLOT_OF = [4, 0, -1, 2]  # row 2 is a padding row
FRESH = [False, True, False, False]  # row 1 is a new request


def inputs(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(len(LENS), max(LENS), C, generator=gen)
    for row, n in enumerate(LENS):
        x[row, n:] = 0.0  # padded on the right with zeros, as the model pads
    weight = torch.randn(C, W, generator=gen) * 0.5
    cache = torch.randn(SLOTS, C, W - 1, generator=gen)
    return (
        x.to(DEVICE, dtype),
        weight.to(DEVICE, dtype),
        cache.to(DEVICE, dtype),
        torch.tensor(SLOT_OF, device=DEVICE),
        torch.tensor(FRESH, device=DEVICE),
        torch.tensor(LENS, device=DEVICE),
    )


def test_reference_equals_one_sequence_at_a_time():
    x, weight, cache, slots, fresh, lens = inputs()
    before = cache.clone()
    y = causal_conv1d_slots_reference(x, weight, cache, slots, fresh, lens)
    for row, (n, slot) in enumerate(zip(LENS, SLOT_OF)):
        window = None if FRESH[row] or slot < 0 else before[slot]
        y_one, new_window = causal_conv1d(x[row, :n], weight, window)
        torch.testing.assert_close(y[row, :n], y_one, rtol=1e-6, atol=1e-7)  # vector vs scalar SiLU tails
        if slot >= 0:
            torch.testing.assert_close(cache[slot], new_window, rtol=0, atol=0)
    untouched = [s for s in range(SLOTS) if s not in SLOT_OF]
    assert torch.equal(cache[untouched], before[untouched])


def test_reference_verify_records_windows_and_leaves_the_cache():
    x, weight, cache, slots, fresh, _ = inputs()
    before = cache.clone()
    steps = torch.full((6, 5, C, W - 1), 7.0)
    causal_conv1d_slots_reference(x, weight, cache, slots, fresh, window_steps=steps)
    assert torch.equal(cache, before)
    for row, slot in enumerate(SLOT_OF):
        window = None if FRESH[row] or slot < 0 else before[slot]
        for t in range(x.shape[1]):
            _, after = causal_conv1d(x[row, : t + 1], weight, window)
            assert torch.equal(steps[row, t], after)
    assert (steps[len(LENS) :] == 7.0).all() and (steps[:, x.shape[1] :] == 7.0).all()


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("record", [False, True])
@pytest.mark.parametrize("with_lens", [False, True])
def test_triton_kernel_matches_reference(dtype, record, with_lens):
    from league.ops.conv.triton import causal_conv1d_slots_triton

    x, weight, cache, slots, fresh, lens = inputs(dtype, seed=1)
    lens = lens if with_lens else None
    cache_ref = cache.clone()
    steps = torch.full((6, 5, C, W - 1), 7.0, dtype=dtype, device=DEVICE) if record else None
    steps_ref = steps.clone() if record else None
    y = causal_conv1d_slots_triton(x, weight, cache, slots, fresh, lens, steps)
    y_ref = causal_conv1d_slots_reference(x, weight, cache_ref, slots, fresh, lens, steps_ref)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1.6e-2, "atol": 1e-2}
    torch.testing.assert_close(y, y_ref, **tol)
    assert torch.equal(cache, cache_ref)  # windows are copies of inputs: exact
    if record:
        assert torch.equal(steps, steps_ref)
