"""Triton kernel of ``sampling.sample_logits``: the Gumbel-max draw and the log-sum-exp of ``logits / T`` in one
pass over logits kept in the model's dtype.

Each program takes one row's slice of ``_SPLIT`` columns and writes its best score (``z - log E``, the excluded
column left out), that score's column, and its max and ``sum exp(z - max)``; torch then combines the slices of
each row. The first slice's program also writes the row's coin. Keys and noise are the hashes of
``sampling.row_keys`` / ``sampling.uniforms`` computed in uint32 arithmetic inside the kernel, bit for bit the
same uniforms as the torch reference, so a draw costs one launch whatever the batch. It does not choose when to
run (``sampling`` does).

Imported only when Triton is installed. Runs on CUDA, or on CPU tensors under ``TRITON_INTERPRET=1``.

Legend: B rows, V vocabulary, S slices of a row; inside the kernel BV columns per block.
"""

import torch
import triton
import triton.language as tl

_SPLIT = 16384
_BLOCK_V = 4096
_NEG_INF = tl.constexpr(float("-inf"))  # a global a kernel can read must be a constexpr
_M1 = tl.constexpr(0x7FEB352D)
_M2 = tl.constexpr(0x846CA68B)
_GOLDEN = tl.constexpr(0x9E3779B9)


@triton.jit
def _mix32(x):
    x = x ^ (x >> 16)
    x = x * _M1
    x = x ^ (x >> 15)
    x = x * _M2
    return x ^ (x >> 16)


@triton.jit
def _row_key(seed, position, stream):
    """``sampling.row_keys`` of one row: ``seed`` and ``position`` int64 scalars."""
    lo = (seed & 0xFFFFFFFF).to(tl.uint32)
    hi = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    key = _mix32(_mix32(_mix32(lo ^ _GOLDEN) ^ hi) ^ (position & 0xFFFFFFFF).to(tl.uint32))
    return _mix32(key ^ stream)


@triton.jit
def _uniform(bits):
    return ((bits >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08  # 2**-24


@triton.jit(do_not_specialize=["V"])
def _race_kernel(
    z_ptr,
    seeds_ptr,
    positions_ptr,
    exclude_ptr,
    best_ptr,
    index_ptr,
    max_ptr,
    sum_ptr,
    coin_ptr,
    V,
    stride_z,
    temperature,
    SAMPLE_STREAM: tl.constexpr,
    COIN_STREAM: tl.constexpr,
    SPLIT: tl.constexpr,
    BV: tl.constexpr,
):
    row, part = tl.program_id(0), tl.program_id(1)
    num_parts = tl.num_programs(1)
    base = z_ptr + row.to(tl.int64) * stride_z
    seed, position = tl.load(seeds_ptr + row), tl.load(positions_ptr + row)
    key = _row_key(seed, position, SAMPLE_STREAM)
    if part == 0:  # column 0 of the coin stream
        coin_key = _row_key(seed, position, COIN_STREAM)
        tl.store(coin_ptr + row, _uniform(_mix32(_mix32(coin_key) ^ coin_key)))
    exclude = tl.load(exclude_ptr + row)
    best = float("-inf")
    best_col = 0
    m = float("-inf")
    s = 0.0
    # a while loop, not range(): the interpreter cannot turn a runtime scalar into a Python int
    start = part * SPLIT
    end = tl.minimum(start + SPLIT, V)
    while start < end:
        cols = start + tl.arange(0, BV)
        inside = cols < end
        z = tl.load(base + cols, mask=inside, other=0.0).to(tl.float32) / temperature
        z = tl.where(inside, z, _NEG_INF)
        bits = _mix32(_mix32(cols.to(tl.uint32) * _GOLDEN + key) ^ key)
        score = tl.where(cols == exclude, _NEG_INF, z - tl.log(-tl.log(_uniform(bits))))
        block_best = tl.max(score, 0)
        block_col = tl.argmax(score, 0) + start
        best_col = tl.where(block_best > best, block_col, best_col)
        best = tl.maximum(best, block_best)
        new_m = tl.maximum(m, tl.max(z, 0))
        s = s * tl.exp(m - new_m) + tl.sum(tl.exp(z - new_m), 0)
        m = new_m
        start += BV
    out = row * num_parts + part
    tl.store(best_ptr + out, best)
    tl.store(index_ptr + out, best_col.to(tl.int64))
    tl.store(max_ptr + out, m)
    tl.store(sum_ptr + out, s)


def sample_logits_fwd(
    logits_BV: torch.Tensor,
    temperature: float,
    seeds_B: torch.Tensor,
    positions_B: torch.Tensor,
    exclude_B: torch.Tensor | None,
    streams: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``sampling.sample_logits`` by the kernel: ``([B] int64 tokens, [B] fp32 log-sum-exp, [B] fp32 coins)``;
    ``streams`` are the ids of the sampling and coin streams (``sampling.SAMPLE``, ``sampling.COIN``)."""
    num_rows, vocab = logits_BV.shape
    if logits_BV.stride(-1) != 1:
        logits_BV = logits_BV.contiguous()
    device = logits_BV.device
    exclude = torch.full((num_rows,), -1, dtype=torch.long, device=device) if exclude_B is None else exclude_B
    parts = triton.cdiv(vocab, _SPLIT)
    best = torch.empty(num_rows, parts, dtype=torch.float32, device=device)
    index = torch.empty(num_rows, parts, dtype=torch.long, device=device)
    maxes, sums = torch.empty_like(best), torch.empty_like(best)
    coins = torch.empty(num_rows, dtype=torch.float32, device=device)
    if num_rows:
        _race_kernel[(num_rows, parts)](
            logits_BV,
            seeds_B.to(device),
            positions_B.to(device),
            exclude.to(device),
            best,
            index,
            maxes,
            sums,
            coins,
            vocab,
            logits_BV.stride(0),
            float(temperature),
            SAMPLE_STREAM=streams[0],
            COIN_STREAM=streams[1],
            SPLIT=_SPLIT,
            BV=_BLOCK_V,
        )
    tokens = index.gather(1, best.argmax(-1, keepdim=True))[:, 0]
    return tokens, (maxes + sums.log()).logsumexp(-1), coins
