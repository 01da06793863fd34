"""Sampling from logits: temperature, top-k, top-p, min-p, with counter-based per-request randomness.

The filtered distribution is computed by one function (:func:`filtered_probs`) that both plain
sampling and speculative acceptance use, so speculation samples from exactly the same distribution.
Not responsible for log-probs (``ops.logprob``) nor for stop conditions.

Legend: V vocabulary.
"""

import torch

from league.ops.backends import use_kernel


def unfiltered(temperature: float, top_k: int = -1, top_p: float = 1.0, min_p: float = 0.0) -> bool:
    """Whether the settings (``filtered_probs``' arguments) keep the whole distribution ``softmax(logits / T)``."""
    return not 0 < top_k and top_p >= 1.0 and min_p <= 0.0


def filtered_probs(
    logits_V: torch.Tensor, temperature: float, top_k: int = -1, top_p: float = 1.0, min_p: float = 0.0
) -> torch.Tensor:
    """The sampling distribution of each row, fp32: ``softmax(logits / T)``, then top-k, top-p and min-p
    filtering with renormalisation.

    Args:
        logits_V (torch.Tensor): ``[..., V]`` raw logits (one row, or a batch of rows sharing the settings).
        temperature (float): > 0.
        top_k (int): keep the k most likely tokens; ``-1`` or ``0`` keeps all. Default: ``-1``.
        top_p (float): keep the smallest set of most likely tokens whose mass reaches ``top_p``. Default: ``1.0``.
        min_p (float): drop tokens with probability below ``min_p`` times the largest. Default: ``0.0``.
    """
    probs = (logits_V.float() / temperature).softmax(-1)
    if 0 < top_k < probs.shape[-1]:
        kth = probs.topk(top_k).values[..., -1:]
        probs = probs.masked_fill(probs < kth, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass strictly before each token
        drop_sorted = before >= top_p
        probs = probs.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    if min_p > 0.0:
        probs = probs.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


# Randomness is a pure function of (request seed, output position, stream, column): a request's draws never depend
# on the batch, on the device or on how many draws other requests made, and a whole batch draws in one launch.
SAMPLE, COIN = 0, 1  # streams: the token race, and the coins of speculative acceptance
_MASK32 = 0xFFFFFFFF
_M1, _M2 = 0x7FEB352D, 0x846CA68B  # multipliers of the lowbias32 integer hash
_GOLDEN = 0x9E3779B9


def mix32(x: torch.Tensor) -> torch.Tensor:
    """The lowbias32 integer hash of 32-bit values held in int64 (each product is wrapped back to 32 bits)."""
    x = x ^ (x >> 16)
    x = (x * _M1) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _M2) & _MASK32
    return x ^ (x >> 16)


def row_keys(seeds_B: torch.Tensor, positions_B: torch.Tensor, stream: int) -> torch.Tensor:
    """``[B]`` 32-bit keys of (seed, output position, stream); seeds are 64-bit, positions and streams small."""
    lo, hi = seeds_B & _MASK32, (seeds_B >> 32) & _MASK32
    key = mix32(mix32(mix32(lo ^ _GOLDEN) ^ hi) ^ (positions_B & _MASK32))
    return mix32(key ^ stream)


def uniforms(keys_B: torch.Tensor, num: int) -> torch.Tensor:
    """``[B, num]`` fp32 uniforms in (0, 1) on a 2**-24 grid, column j of row b a hash of (key b, j)."""
    cols = torch.arange(num, device=keys_B.device)
    bits = mix32(mix32((cols[None] * _GOLDEN + keys_B[:, None]) & _MASK32) ^ keys_B[:, None])
    return ((bits >> 8).float() + 0.5) * 2.0**-24


def race(scores_BV: torch.Tensor, seeds_B: torch.Tensor, positions_B: torch.Tensor) -> torch.Tensor:
    """``[B]`` tokens: argmax of ``scores - log E``, ``E ~ Exp(1)`` per column (the Gumbel-max trick, i.e. the
    exponential race ``argmax p / E``). With scores ``log p + c`` (any row constant c), the token is distributed
    as p; a column at -inf never wins."""
    noise = -torch.log(uniforms(row_keys(seeds_B, positions_B, SAMPLE), scores_BV.shape[-1]))
    return (scores_BV.float() - noise.log()).argmax(-1)


def sample_rows(probs_BV: torch.Tensor, seeds_B: torch.Tensor, positions_B: torch.Tensor) -> torch.Tensor:
    """One token per row of ``probs`` (fp32, zeros never drawn) with the randomness of each row's request seed at
    its output position: ``[B]`` ids on the device, not synchronised, each depending on its row alone."""
    return race(probs_BV.log(), seeds_B, positions_B)


def sample_logits(
    logits_BV: torch.Tensor,
    temperature: float,
    seeds_B: torch.Tensor,
    positions_B: torch.Tensor,
    exclude_B: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens drawn from ``softmax(logits / temperature)`` without filtering (the same draw as
    :func:`sample_rows` on those probabilities), each row's column ``exclude`` (if >= 0) left out; each row's fp32
    ``logsumexp(logits / temperature)`` over all columns; and each row's coin (the uniform of its seed and position
    on the coin stream, for speculative acceptance). One pass over the logits, in one launch, on CUDA
    (``ops.sampling.triton``); torch elsewhere.

    Args:
        logits_BV (torch.Tensor): ``[B, V]`` in any float dtype.
        temperature (float): > 0.
        seeds_B, positions_B (torch.Tensor): ``[B]`` int64 request seeds and output positions.
        exclude_B (torch.Tensor, Optional): ``[B]`` int64 column to leave out per row, -1 for none.

    Returns:
        ``([B] int64 tokens, [B] fp32 log-sum-exp, [B] fp32 coins)``.
    """
    if use_kernel(logits_BV, None, None, op="sample_logits"):
        from league.ops.sampling.triton import sample_logits_fwd

        return sample_logits_fwd(logits_BV, temperature, seeds_B, positions_B, exclude_B, (SAMPLE, COIN))
    return sample_logits_reference(logits_BV, temperature, seeds_B, positions_B, exclude_B)


def sample_logits_reference(
    logits_BV: torch.Tensor,
    temperature: float,
    seeds_B: torch.Tensor,
    positions_B: torch.Tensor,
    exclude_B: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`sample_logits` in torch."""
    scores = logits_BV.float() / temperature
    lse = scores.logsumexp(-1)
    if exclude_B is not None:
        rows = (exclude_B >= 0).nonzero()[:, 0]
        scores[rows, exclude_B[rows]] = float("-inf")
    return race(scores, seeds_B, positions_B), lse, coins(seeds_B, positions_B)


def coins(seeds_B: torch.Tensor, positions_B: torch.Tensor) -> torch.Tensor:
    """``[B]`` fp32 uniforms of the coin stream: each row's coin at its seed and output position."""
    return uniforms(row_keys(seeds_B, positions_B, COIN), 1)[:, 0]
