"""The Triton experts (``ops.moe.triton``) against the reference loop and against the rounding points they reproduce,
and their sort of the pairs against ``moe.sort_pairs`` (bitwise).

Runs on CUDA, or on CPU under ``TRITON_INTERPRET=1`` (``PYTHONPATH`` holding a Triton install); skipped otherwise.
On CPU in fp16 only: the interpreter's dot does not take bf16 (and it truncates fp32 to bf16 where CUDA rounds to
nearest); the kernels are the same for both 16-bit types.
"""

import importlib.util
import os

import pytest
import torch

from league.ops.moe import route_topk, sort_pairs, swiglu_experts_reference

HAS_TRITON = importlib.util.find_spec("triton") is not None
CAN_RUN_TRITON = HAS_TRITON and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float16, torch.bfloat16] if DEVICE == "cuda" else [torch.float16]
ULP = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}  # spacing of the values in [1, 2)

pytestmark = pytest.mark.skipif(not CAN_RUN_TRITON, reason="needs triton and CUDA or TRITON_INTERPRET=1")


def make_inputs(num_tokens, dim, num_experts, inter, top_k, dtype, seed=0, favourite=None, used_experts=None):
    """Inputs in ``dtype``; ``favourite`` gets every token, experts from ``used_experts`` on get none."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, dim, generator=gen)
    w_gate_up = torch.randn(num_experts, 2 * inter, dim, generator=gen) * dim**-0.5
    w_down = torch.randn(num_experts, dim, inter, generator=gen) * inter**-0.5
    logits = torch.randn(num_tokens, num_experts, generator=gen)
    if used_experts is not None:
        logits[:, used_experts:] = float("-inf")
    if favourite is not None:
        logits[:, favourite] = logits.amax(-1) + 0.5
    weights, experts = route_topk(logits.to(dtype), top_k)
    return [t.to(dtype).to(DEVICE) for t in (x, w_gate_up, w_down)] + [weights.to(DEVICE), experts.to(DEVICE)]


def rounded(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.float().to(dtype).float()


def emulated_h(x, w_gate_up, experts):
    """``h_NI`` of each pair ``t * A + a`` (token-major) in fp32: exact sums, rounded to x's dtype where the
    grouped GEMM path rounds (the GEMM's outputs, the SiLU, the product)."""
    dtype, flat, inter = x.dtype, experts.reshape(-1), w_gate_up.shape[1] // 2
    gate_up = torch.einsum("nd,nkd->nk", x.double().repeat_interleave(experts.shape[1], 0), w_gate_up.double()[flat])
    gate, up = rounded(gate_up[:, :inter], dtype), rounded(gate_up[:, inter:], dtype)
    return rounded(rounded(gate / (1.0 + torch.exp(-gate)), dtype) * up, dtype)


def emulated_y(h, w_down, weights, experts):
    """``y_ND`` of each pair from ``h`` (pair order, h's dtype): the GEMM's rounded output times the weight, rounded."""
    y = rounded(torch.einsum("nk,ndk->nd", h.double(), w_down.double()[experts.reshape(-1)]), h.dtype)
    return rounded(y * weights.reshape(-1, 1).float(), h.dtype)


CASES = {
    "small": dict(num_tokens=5, dim=64, num_experts=8, inter=32, top_k=2),
    # expert 3 takes all 40 tokens (more than a row tile), experts 5..7 none; D and I not multiples of the tiles
    "crowded_and_empty": dict(num_tokens=40, dim=96, num_experts=8, inter=40, top_k=2, favourite=3, used_experts=5),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_reference_loop(case, dtype):
    from league.ops.moe.triton import grouped_swiglu_experts_triton

    inputs = make_inputs(**CASES[case], dtype=dtype)
    with torch.no_grad():
        out = grouped_swiglu_experts_triton(*inputs)
    truth = swiglu_experts_reference(*(t.float() for t in inputs[:4]), inputs[4])
    assert out.dtype == dtype and out.shape == inputs[0].shape
    # the roundings of gate, up, silu, h, y and the output, each within half an ulp
    atol = 4 * ULP[dtype] * truth.abs().amax().item()
    torch.testing.assert_close(out.float(), truth, rtol=4 * ULP[dtype], atol=atol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("block_m,block_n,block_k", [(16, 32, 128), (32, 16, 32)])
def test_kernels_round_where_the_reference_rounds(case, block_m, block_n, block_k, dtype):
    from league.ops.moe.triton import TileConfig, down_fwd, gate_up_swiglu_fwd

    x, w_gate_up, w_down, weights, experts = make_inputs(**CASES[case], dtype=dtype)
    config = TileConfig(block_m, block_n, block_k, 4, 2)
    order, offs = sort_pairs(experts, w_gate_up.shape[0])
    h_sorted = gate_up_swiglu_fwd(x, order, offs, w_gate_up, experts.shape[1], config)
    y = down_fwd(h_sorted, order, offs, w_down, weights.reshape(-1), config)
    h = torch.empty_like(h_sorted)
    h[order] = h_sorted
    # each kernel against its emulation from the same input: only a different fp32 summation order separates
    # them, where a rare value lands across a rounding boundary (by an ulp of the sum's terms, which is many ulps
    # of a result that cancelled: so the bound is an ulp of the largest magnitude)
    h_ref, y_ref = emulated_h(x, w_gate_up, experts), emulated_y(h, w_down, weights, experts)
    for name, got, ref in (("h", h.float(), h_ref), ("y", y.float(), y_ref)):
        assert (got != ref).float().mean().item() < 0.01, name
        assert (got - ref).abs().max().item() <= ULP[dtype] * ref.abs().max().item(), name


@pytest.mark.parametrize("row_splits", [2, 3])
def test_row_splits_give_the_same_bits(row_splits):
    """An expert's row tiles shared by several programs: each tile is computed as by one program, bitwise."""
    from league.ops.moe.triton import TileConfig, down_fwd, gate_up_swiglu_fwd

    x, w_gate_up, w_down, weights, experts = make_inputs(**CASES["crowded_and_empty"], dtype=torch.float16)
    order, offs = sort_pairs(experts, w_gate_up.shape[0])
    outs = []
    for splits in (1, row_splits):
        config = TileConfig(16, 32, 32, 4, 2, row_splits=splits)
        h = gate_up_swiglu_fwd(x, order, offs, w_gate_up, experts.shape[1], config)
        outs.append((h, down_fwd(h, order, offs, w_down, weights.reshape(-1), config)))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_no_tokens_and_no_gradients():
    from league.ops.moe.triton import grouped_swiglu_experts_triton

    x, w_gate_up, w_down, weights, experts = make_inputs(0, 64, 8, 32, 2, DTYPES[0])
    with torch.no_grad():
        out = grouped_swiglu_experts_triton(x, w_gate_up, w_down, weights, experts)
    assert out.shape == (0, 64)
    with pytest.raises(ValueError, match="no backward"):
        grouped_swiglu_experts_triton(x.requires_grad_(), w_gate_up, w_down, weights, experts)


def inverse_of(order_N: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(order_N).scatter_(0, order_N, torch.arange(order_N.numel(), device=order_N.device))


@pytest.mark.parametrize(
    "case", ["random", "one_token", "unused_experts", "one_expert_takes_all", "multi_block", "empty", "int32"]
)
def test_sort_pairs_matches_torch(case, monkeypatch):
    import league.ops.moe.triton as triton_moe

    num_tokens, top_k, num_experts = {"one_token": (1, 8, 256), "multi_block": (20, 4, 16), "empty": (0, 8, 8)}.get(
        case, (64, 8, 256)
    )
    gen = torch.Generator().manual_seed(0)
    experts = torch.rand(num_tokens, num_experts, generator=gen).topk(top_k).indices
    if case == "unused_experts":  # experts 0, 17 and 200..255 receive no pair
        experts = torch.rand(num_tokens, 199, generator=gen).topk(top_k).indices + 1
        experts[experts == 17] = 199
    if case == "one_expert_takes_all":
        experts = torch.full((num_tokens, top_k), 3)
    if case == "multi_block":  # each program loops over 5 blocks of pairs
        monkeypatch.setattr(triton_moe, "_SORT_BLOCK", 16)
    if case == "int32":
        experts = experts.int()
    experts = experts.to(DEVICE)
    order, offs, inverse = triton_moe.sort_pairs_triton(experts, num_experts, with_inverse=True)
    ref_order, ref_offs = sort_pairs(experts, num_experts)
    assert order.dtype == torch.int64 and offs.dtype == torch.int32 and inverse.dtype == torch.int64
    assert torch.equal(order, ref_order)
    assert torch.equal(offs, ref_offs)
    assert torch.equal(inverse, inverse_of(ref_order))
    order_only, offs_only, no_inverse = triton_moe.sort_pairs_triton(experts, num_experts)
    assert no_inverse is None and torch.equal(order_only, ref_order) and torch.equal(offs_only, ref_offs)


def test_torch_sort_past_the_sort_bound_gives_the_same_result(monkeypatch):
    """The torch sort's pairs (what the dispatcher passes past ``SORT_MAX_PAIRS``) give the Triton sort's result."""
    import league.ops.moe.triton as triton_moe
    from league.ops.moe import sort_pairs

    def not_this_sort(*args, **kwargs):
        raise AssertionError("the other sort should run")

    inputs = make_inputs(**CASES["crowded_and_empty"], dtype=DTYPES[0])
    with torch.no_grad():
        out = triton_moe.grouped_swiglu_experts_triton(*inputs)
    with torch.no_grad(), monkeypatch.context() as patch:
        patch.setattr(triton_moe, "sort_pairs_triton", not_this_sort)
        given = sort_pairs(inputs[4], inputs[1].shape[0])
        assert torch.equal(triton_moe.grouped_swiglu_experts_triton(*inputs, given), out)
