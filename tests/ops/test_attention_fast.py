"""The batched attention ops against per-sequence ``causal_attention``, and the Triton cached-attention kernel
against the reference (on CPU under ``TRITON_INTERPRET=1``, or on CUDA)."""

import importlib.util
import os

import pytest
import torch

from league.ops.attention import (
    cached_attention,
    cached_attention_reference,
    causal_attention,
    varlen_causal_attention,
    varlen_causal_attention_reference,
)
from league.ops.numerics import BATCH_INVARIANT, FAST

HAS_TRITON = importlib.util.find_spec("triton") is not None
CAN_RUN_TRITON = HAS_TRITON and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def packed(seq_lens, num_heads, num_kv_heads, head_dim, seed=0, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    total = sum(seq_lens)
    q = torch.randn(total, num_heads, head_dim, generator=gen, dtype=dtype)
    k = torch.randn(total, num_kv_heads, head_dim, generator=gen, dtype=dtype)
    v = torch.randn(total, num_kv_heads, head_dim, generator=gen, dtype=dtype)
    cu = torch.tensor([0, *seq_lens]).cumsum(0)
    return q.to(device), k.to(device), v.to(device), cu.to(device)


def cache_batch(q_lens, kv_lens, slots, num_heads, num_kv_heads, head_dim, num_slots=8, max_len=96, seed=0):
    """Random caches with junk past each sequence's length, and the queries of the last q_len positions."""
    gen = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(num_slots, max_len, num_kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(num_slots, max_len, num_kv_heads, head_dim, generator=gen)
    q = torch.randn(sum(q_lens), num_heads, head_dim, generator=gen)
    cu = torch.tensor([0, *q_lens]).cumsum(0)
    return q, k_cache, v_cache, cu, torch.tensor(slots), torch.tensor(kv_lens)


@pytest.mark.parametrize("numerics", [FAST, BATCH_INVARIANT], ids=["fast", "batch_invariant"])
def test_varlen_reference_equals_per_sequence_calls(numerics):
    seq_lens = [5, 1, 17, 9]
    q, k, v, cu = packed(seq_lens, 4, 2, 16)
    for x in (q, k, v):
        x.requires_grad_(True)
    out = varlen_causal_attention(q, k, v, cu, max(seq_lens), 0.25, numerics)
    assert torch.equal(out, varlen_causal_attention_reference(q, k, v, cu, max(seq_lens), 0.25, numerics))
    bounds = cu.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        ref = causal_attention(q[start:end], k[start:end], v[start:end], 0.25, numerics)
        assert torch.equal(out[start:end], ref)
    # gradients flow to each sequence's own tokens only, as with separate calls
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    for start, end in zip(bounds[:-1], bounds[1:]):
        ref = causal_attention(q[start:end], k[start:end], v[start:end], 0.25, numerics)
        ref_grads = torch.autograd.grad(ref, (q, k, v), grad[start:end])
        for g, g_ref in zip((dq, dk, dv), ref_grads):
            assert torch.allclose(g[start:end], g_ref[start:end], atol=1e-6)


@pytest.mark.parametrize("numerics", [FAST, BATCH_INVARIANT], ids=["fast", "batch_invariant"])
def test_cached_reference_equals_per_sequence_calls(numerics):
    q_lens, kv_lens, slots = [1, 4, 37, 0], [70, 33, 87, 0], [5, 0, 3, 7]
    q, k_cache, v_cache, cu, slots_N, kv_lens_N = cache_batch(q_lens, kv_lens, slots, 4, 2, 32)
    out = cached_attention_reference(q, k_cache, v_cache, cu, slots_N, kv_lens_N, 32**-0.5, 37, 87, numerics)
    if numerics.row_by_row:  # the dispatcher runs the reference
        assert torch.equal(
            out, cached_attention(q, k_cache, v_cache, cu, slots_N, kv_lens_N, 32**-0.5, 37, 87, numerics)
        )
    bounds = cu.tolist()
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        keys, values = k_cache[slots[i], : kv_lens[i]], v_cache[slots[i], : kv_lens[i]]
        assert torch.equal(out[start:end], causal_attention(q[start:end], keys, values, 32**-0.5, numerics))


@pytest.mark.parametrize("page", [None, 1, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padded_attention_equals_the_reference(page, dtype):
    """The CPU's batched form (every sequence's keys gathered and padded, one masked softmax) against the per-sequence
    reference: decode, verify, chunked prefill and an empty padding sequence in one batch, through a block table."""
    from league.models.qwen3_5_moe import Pages
    from league.ops.attention import cached_attention_padded, padded_fits

    q_lens, kv_lens, slots = [1, 4, 37, 0, 1], [70, 33, 87, 0, 1], [5, 0, 3, 7, 2]
    q, k_cache, v_cache, cu, slots_N, kv_lens_N = cache_batch(q_lens, kv_lens, slots, 8, 2, 32)
    q, k_cache, v_cache = q.to(dtype), k_cache.to(dtype), v_cache.to(dtype)
    pages = None
    if page is not None:
        k_cache, v_cache, table = paged_copy(k_cache, v_cache, page)
        pages = Pages(table=table, size=page)
    table_args = (pages.table, page) if pages else ()
    ref = cached_attention_reference(q, k_cache, v_cache, cu, slots_N, kv_lens_N, 32**-0.5, 37, 87, FAST, *table_args)
    out = cached_attention_padded(q, k_cache, v_cache, cu, slots_N, kv_lens_N, 32**-0.5, 37, 87, *table_args)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    assert padded_fits(q, FAST) and not padded_fits(q, BATCH_INVARIANT)
    # the dispatcher reads the batch's true bounds (a continuing batch passes placeholders)
    dispatched = cached_attention(q, k_cache, v_cache, cu, slots_N, kv_lens_N, 32**-0.5, 1, 2, FAST, pages)
    assert torch.equal(dispatched, out)


def test_fresh_cache_equals_varlen():
    """A prefill from an empty cache (kv_len == q_len) is the varlen attention of the same tokens."""
    seq_lens, slots = [6, 13, 2], [2, 0, 1]
    q, k, v, cu = packed(seq_lens, 8, 2, 24)
    k_cache, v_cache = torch.zeros(3, 16, 2, 24), torch.zeros(3, 16, 2, 24)
    bounds = cu.tolist()
    for slot, start, end in zip(slots, bounds[:-1], bounds[1:]):
        k_cache[slot, : end - start], v_cache[slot, : end - start] = k[start:end], v[start:end]
    out = cached_attention(q, k_cache, v_cache, cu, torch.tensor(slots), torch.tensor(seq_lens), 0.2, 13, 13)
    assert torch.allclose(out, varlen_causal_attention(q, k, v, cu, 13, 0.2), atol=1e-6)


needs_triton = pytest.mark.skipif(not CAN_RUN_TRITON, reason="needs triton and CUDA or TRITON_INTERPRET=1")


def kernel(*args):
    from league.ops.attention.triton import cached_attention_fwd

    return cached_attention_fwd(*args)


@pytest.fixture(autouse=True, scope="module")
def interpreter_scalar_index():
    """Triton 3.6's interpreter turns a loop bound loaded at run time (a one-element array) into an int with
    ``int(array)``, which numpy >= 2.4 refuses (triton-lang/triton#9171, fixed after 3.6); convert the element."""
    if not (HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"):
        yield
        return
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patch(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patch
    yield
    interpreter._patch_lang_tensor = original


def to_device(*tensors):
    return [t.to(DEVICE) for t in tensors]


@needs_triton
@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_dim",
    [(4, 2, 32), (16, 2, 32), (4, 2, 256), (16, 2, 256), (6, 2, 24), (3, 3, 16)],
)
def test_triton_cached_attention_matches_reference(num_heads, num_kv_heads, head_dim):
    # decode, verify (q 4), chunked prefill (37 new after 50 cached), fresh prefill, decode at position 0
    q_lens, kv_lens, slots = [1, 4, 37, 20, 1], [70, 33, 87, 20, 1], [5, 0, 3, 6, 2]
    q, k_cache, v_cache, cu, slots_N, kv_lens_N = to_device(
        *cache_batch(q_lens, kv_lens, slots, num_heads, num_kv_heads, head_dim)
    )
    scale = head_dim**-0.5
    ref = cached_attention_reference(q, k_cache, v_cache, cu, slots_N, kv_lens_N, scale, 37, 87)
    out = kernel(q, k_cache, v_cache, cu, slots_N, kv_lens_N, scale, 37)
    assert (out - ref).abs().max().item() < 1e-5


@needs_triton
def test_triton_cached_attention_rows_do_not_depend_on_the_batch():
    q_lens, kv_lens, slots = [1, 4, 37, 0], [70, 33, 87, 0], [5, 0, 3, 7]
    q, k_cache, v_cache, cu, slots_N, kv_lens_N = to_device(*cache_batch(q_lens, kv_lens, slots, 16, 2, 32))
    scale = 32**-0.5
    batched = kernel(q, k_cache, v_cache, cu, slots_N, kv_lens_N, scale, 37)
    bounds = cu.tolist()
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        if end == start:
            continue
        cu_one = torch.tensor([0, end - start], device=DEVICE)
        alone = kernel(q[start:end], k_cache, v_cache, cu_one, slots_N[i : i + 1], kv_lens_N[i : i + 1], scale, 37)
        assert torch.equal(alone, batched[start:end])


@needs_triton
def test_triton_cached_attention_skips_padding_sequences():
    """CUDA-graph padding: sequences with no queries (and no keys) leave the others as they are."""
    q, k_cache, v_cache, cu, slots_N, kv_lens_N = to_device(*cache_batch([1, 1], [9, 40], [4, 1], 4, 2, 16))
    out = kernel(q, k_cache, v_cache, cu, slots_N, kv_lens_N, 0.25, 1)
    cu_pad = torch.tensor([0, 1, 1, 2, 2], device=DEVICE)
    slots_pad, kv_pad = torch.tensor([4, 0, 1, 0], device=DEVICE), torch.tensor([9, 0, 40, 0], device=DEVICE)
    assert torch.equal(kernel(q, k_cache, v_cache, cu_pad, slots_pad, kv_pad, 0.25, 1), out)


@needs_triton
def test_triton_cached_attention_half_precision():
    """fp16 (bf16 needs a GPU: the interpreter's dot does not take bf16); probabilities are rounded to fp16
    before the product with V, as in flash attention."""
    q_lens, kv_lens, slots = [1, 4, 37], [70, 33, 87], [5, 0, 3]
    batch = to_device(*cache_batch(q_lens, kv_lens, slots, 16, 2, 256))
    q, k_cache, v_cache = (x.half() for x in batch[:3])
    cu, slots_N, kv_lens_N = (x.int() for x in batch[3:])
    ref = cached_attention_reference(q, k_cache, v_cache, cu, slots_N, kv_lens_N, 256**-0.5, 37, 87)
    out = kernel(q, k_cache, v_cache, cu, slots_N, kv_lens_N, 256**-0.5, 37)
    assert out.dtype == torch.float16 and (out.float() - ref.float()).abs().max().item() < 2e-3


def paged_copy(k_cache, v_cache, page, seed=0):
    """The slot-laid-out caches ``[slots, L, G, K]`` moved into blocks of ``page`` positions in a shuffled order
    (junk in the blocks no slot uses): ``(k_blocks, v_blocks, table)``."""
    num_slots, max_len = k_cache.shape[:2]
    per_slot = -(-max_len // page)
    order = torch.randperm(num_slots * per_slot + 3, generator=torch.Generator().manual_seed(seed))
    table = order[: num_slots * per_slot].view(num_slots, per_slot)
    k_blocks = torch.randn(len(order), page, *k_cache.shape[2:], generator=torch.Generator().manual_seed(seed + 1))
    v_blocks = torch.randn_like(k_blocks)
    for slot in range(num_slots):
        for i in range(per_slot):
            rows = slice(i * page, min((i + 1) * page, max_len))
            n = rows.stop - rows.start
            k_blocks[table[slot, i], :n], v_blocks[table[slot, i], :n] = k_cache[slot, rows], v_cache[slot, rows]
    return k_blocks, v_blocks, table


@pytest.mark.parametrize("page", [1, 5, 16, 96])
@pytest.mark.parametrize("numerics", [FAST, BATCH_INVARIANT], ids=["fast", "batch_invariant"])
def test_paged_reference_equals_the_slot_layout(page, numerics):
    """Keys read through a block table give bitwise the attention of the same keys laid out by slot."""
    from league.models.qwen3_5_moe import Pages

    q_lens, kv_lens, slots = [1, 4, 37, 0], [70, 33, 87, 0], [5, 0, 3, 7]
    q, k_cache, v_cache, cu, slots_N, kv_lens_N = cache_batch(q_lens, kv_lens, slots, 4, 2, 32)
    want = cached_attention(q, k_cache, v_cache, cu, slots_N, kv_lens_N, 32**-0.5, 37, 87, numerics)
    k_blocks, v_blocks, table = paged_copy(k_cache, v_cache, page)
    pages = Pages(table=table, size=page)
    got = cached_attention(q, k_blocks, v_blocks, cu, slots_N, kv_lens_N, 32**-0.5, 37, 87, numerics, pages)
    assert torch.equal(got, want)


@needs_triton
@pytest.mark.parametrize("page", [1, 16, 24, 128])
def test_triton_paged_attention_equals_the_slot_layout(page):
    """The kernel reading blocks through a table (tiles of keys spanning several blocks, or blocks longer than a
    tile) computes bitwise what it computes over the same keys laid out by slot."""
    q_lens, kv_lens, slots = [1, 4, 37, 20, 1], [70, 33, 87, 20, 1], [5, 0, 3, 6, 2]
    q, k_cache, v_cache, cu, slots_N, kv_lens_N = cache_batch(q_lens, kv_lens, slots, 8, 2, 32)
    k_blocks, v_blocks, table = paged_copy(k_cache, v_cache, page)
    want = kernel(*to_device(q, k_cache, v_cache, cu, slots_N, kv_lens_N), 32**-0.5, 37)
    got = kernel(*to_device(q, k_blocks, v_blocks, cu, slots_N, kv_lens_N), 32**-0.5, 37, table.to(DEVICE), page)
    assert torch.equal(got, want)
