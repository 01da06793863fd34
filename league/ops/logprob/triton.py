"""Triton kernels of the fused output head's per-chunk log-softmax work, on logits kept in the parameters' dtype.

Computes what ``logprob._chunk_forward`` and ``logprob._grad_chunk_logits`` define on a chunk's ``[C, V]`` logits
(made by ``F.linear`` in bf16/fp16, as the engine makes them): each logit is read once, converted to fp32 and
divided by the temperature inside the kernel, so no ``[C, V]`` fp32 copy exists. The forward is one program per row
with an online log-sum-exp (and the entropy's ``sum p z``); the backward writes the logits' gradient over the logits
themselves. It does not choose when to run (``logprob`` does).

Imported only when Triton is installed. Runs on CUDA, or on CPU tensors under ``TRITON_INTERPRET=1``.

Legend: C rows of a chunk, V vocabulary; inside the kernels BV columns per block.
"""

import torch
import triton
import triton.language as tl

_BLOCK_V = 4096
_NEG_INF = tl.constexpr(float("-inf"))  # a global a kernel can read must be a constexpr


@triton.jit(do_not_specialize=["V"])
def _logsumexp_kernel(
    z_ptr,
    tokens_ptr,
    lse_ptr,
    logp_ptr,
    ent_ptr,
    V,
    stride_z,
    temperature,
    WITH_ENTROPY: tl.constexpr,
    BV: tl.constexpr,
):
    row = tl.program_id(0)
    base = z_ptr + row.to(tl.int64) * stride_z
    m = tl.full([BV], _NEG_INF, tl.float32)  # running max, sum exp(z - m) and sum exp(z - m) z of each lane
    s = tl.zeros([BV], tl.float32)
    sz = tl.zeros([BV], tl.float32)
    # a while loop, not range(V): the interpreter cannot turn a runtime scalar into a Python int
    start = 0
    while start < V:
        cols = start + tl.arange(0, BV)
        inside = cols < V
        z = tl.load(base + cols, mask=inside, other=0.0).to(tl.float32) / temperature
        z = tl.where(inside, z, _NEG_INF)
        new_m = tl.maximum(m, z)
        empty = new_m == _NEG_INF
        alpha = tl.where(empty, 0.0, tl.exp(m - new_m))
        p = tl.where(empty, 0.0, tl.exp(z - new_m))
        s = s * alpha + p
        if WITH_ENTROPY:
            sz = sz * alpha + p * tl.where(inside, z, 0.0)
        m = new_m
        start += BV
    top = tl.max(m, 0)
    lane_scale = tl.where(m == _NEG_INF, 0.0, tl.exp(m - top))
    total = tl.sum(s * lane_scale, 0)
    lse = top + tl.log(total)
    tl.store(lse_ptr + row, lse)
    token = tl.load(tokens_ptr + row)
    picked = tl.load(base + token).to(tl.float32) / temperature
    tl.store(logp_ptr + row, picked - lse)
    if WITH_ENTROPY:
        tl.store(ent_ptr + row, lse - tl.sum(sz * lane_scale, 0) / total)


@triton.jit(do_not_specialize=["V"])
def _grad_logits_kernel(
    z_ptr,
    out_ptr,
    tokens_ptr,
    lse_ptr,
    grad_logp_ptr,
    ent_ptr,
    grad_ent_ptr,
    V,
    stride_z,
    stride_out,
    temperature,
    HAS_LOGP: tl.constexpr,
    HAS_ENTROPY: tl.constexpr,
    BV: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BV + tl.arange(0, BV)
    inside = cols < V
    z = tl.load(z_ptr + row.to(tl.int64) * stride_z + cols, mask=inside, other=0.0).to(tl.float32) / temperature
    lse = tl.load(lse_ptr + row)
    p = tl.exp(z - lse)
    if HAS_ENTROPY:
        coef = (z - (lse - tl.load(ent_ptr + row))) * tl.load(grad_ent_ptr + row)
        if HAS_LOGP:
            coef = coef + tl.load(grad_logp_ptr + row)
    else:
        coef = tl.load(grad_logp_ptr + row) + tl.zeros_like(z)
    grad = -(p * coef)
    if HAS_LOGP:
        token = tl.load(tokens_ptr + row)
        grad = tl.where(cols == token, grad + tl.load(grad_logp_ptr + row), grad)
    grad = grad / temperature
    tl.store(
        out_ptr + row.to(tl.int64) * stride_out + cols,
        grad.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"),
        mask=inside,
    )


def chunk_logsumexp(
    z_CV: torch.Tensor,
    tokens_C: torch.Tensor,
    temperature: float,
    lse_C: torch.Tensor,
    logp_C: torch.Tensor,
    ent_C: torch.Tensor,
) -> None:
    """Writes ``lse``, ``logp`` and (unless ``ent_C`` is empty) the entropy of each row of ``z / temperature``."""
    num_rows, vocab = z_CV.shape
    if num_rows == 0:
        return
    assert z_CV.stride(-1) == 1 and lse_C.is_contiguous() and logp_C.is_contiguous()
    with_entropy = ent_C.numel() > 0
    _logsumexp_kernel[(num_rows,)](
        z_CV,
        tokens_C,
        lse_C,
        logp_C,
        ent_C if with_entropy else lse_C,
        vocab,
        z_CV.stride(0),
        float(temperature),
        WITH_ENTROPY=with_entropy,
        BV=min(_BLOCK_V, triton.next_power_of_2(vocab)),
    )


def chunk_grad_logits(
    z_CV: torch.Tensor,
    tokens_C: torch.Tensor,
    temperature: float,
    lse_C: torch.Tensor,
    grad_logp_C: torch.Tensor | None,
    ent_C: torch.Tensor | None,
    grad_ent_C: torch.Tensor | None,
) -> torch.Tensor:
    """The gradient of the loss in a block of logits, written over ``z_CV`` (returned), in its dtype. The block is
    any rows (``lse_C`` etc. are theirs) by any columns of the vocabulary: ``tokens_C`` gives each row's token as a
    column of the block, and a row whose token lies outside it gets no one-hot term."""
    num_rows, vocab = z_CV.shape
    if num_rows == 0:
        return z_CV
    assert z_CV.stride(-1) == 1
    block_v = min(_BLOCK_V, triton.next_power_of_2(vocab))
    grid = (num_rows, triton.cdiv(vocab, block_v))
    has_entropy = grad_ent_C is not None
    _grad_logits_kernel[grid](
        z_CV,
        z_CV,
        tokens_C,
        lse_C,
        grad_logp_C if grad_logp_C is not None else lse_C,
        ent_C if has_entropy else lse_C,
        grad_ent_C if has_entropy else lse_C,
        vocab,
        z_CV.stride(0),
        z_CV.stride(0),
        float(temperature),
        HAS_LOGP=grad_logp_C is not None,
        HAS_ENTROPY=has_entropy,
        BV=block_v,
    )
    return z_CV
