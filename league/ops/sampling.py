"""Sampling from logits: temperature, top-k, top-p, min-p, per-request generators.

The filtered distribution is computed by one function (:func:`filtered_probs`) that both plain
sampling and speculative acceptance use, so speculation samples from exactly the same distribution.
Not responsible for log-probs (``ops.logprob``) nor for stop conditions.

Legend: V vocabulary.
"""

import torch


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


def sample_rows(probs_BV: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row, each row drawn with its own generator, by the exponential race (``argmax p / E`` with
    ``E ~ Exp(1)`` per token): ``[B]`` token ids, on the device, not synchronised. A row's token depends only on
    its probabilities and its generator, not on the other rows."""
    noise = torch.empty_like(probs_BV)
    for row, generator in zip(noise, generators):
        row.exponential_(generator=generator)
    return (probs_BV / noise).argmax(-1)
