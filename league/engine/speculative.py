"""Speculative decoding with the model's MTP head: the draft chain, and acceptance of a verified chain.

topk = 1: the MTP head proposes a chain of ``num_steps`` tokens (its top-1 at each step); one target
forward verifies the bonus token plus the chain. Greedy acceptance keeps drafts while they equal the
target's argmax; sampling acceptance is exact speculative sampling with a deterministic draft (accept
d with probability p(d), else resample from the residual ``max(p - onehot(d), 0)``), so the emitted
tokens are distributed exactly as the target's. Not responsible for caches or scheduling.

Legend: B requests, N draft steps, D model dim, V vocabulary.
"""

import torch

from league.engine.request import SamplingParams
from league.models.qwen3_5_moe import ForwardBatch, ModelCache, Transformer
from league.ops.sampling import filtered_probs, sample_from, uniform


def draft_chain(
    batch_invariant: bool,
    model: Transformer,
    cache: ModelCache,
    hidden_BD: torch.Tensor,
    first_tokens: list[int],
    positions: list[int],
    slots: list[int],
    num_steps: int,
) -> list[list[int]]:
    """Propose ``num_steps`` tokens per request.

    Args:
        batch_invariant (bool): row-independent numerics (see ``ForwardBatch``).
        hidden_BD (torch.Tensor): each request's MTP output at its last committed position ``L - 1``.
        first_tokens (list[int]): each request's first draft ``d_1`` (from that output).
        positions (list[int]): ``L - 1`` per request; draft step s runs at position ``L - 1 + s``.
        slots (list[int]): cache slots; the MTP KV rows written here are temporary (overwritten after verify).

    Returns:
        ``[B][num_steps]`` draft tokens.
    """
    drafts = [[t] for t in first_tokens]
    hidden, tokens = hidden_BD, torch.tensor(first_tokens, device=hidden_BD.device)
    for step in range(1, num_steps):
        starts = [p + step for p in positions]
        batch = ForwardBatch.packed(
            [1] * len(slots), device=hidden.device, cache_lens=starts, slots=slots, batch_invariant=batch_invariant
        )
        hidden = model.mtp_forward(hidden, tokens, batch, cache)
        tokens = model.mtp_logits(hidden, batch_invariant=batch_invariant).argmax(-1)
        for chain, token in zip(drafts, tokens.tolist()):
            chain.append(token)
    return drafts


def accept(
    logits_NV: torch.Tensor, drafts: list[int], params: SamplingParams, generator: torch.Generator
) -> tuple[int, int]:
    """Decide how many drafts to keep and the bonus token.

    Args:
        logits_NV (torch.Tensor): ``[N + 1, V]`` target logits; row t predicts the token after verify input t
            (input 0 is the pending token, input t > 0 is draft t).
        drafts (list[int]): the N draft tokens.
        params (SamplingParams): temperature 0 selects greedy acceptance.
        generator (torch.Generator): the request's generator (coins and the bonus draw).

    Returns:
        ``(num_accepted, bonus_token)``.
    """
    if params.greedy:
        best = logits_NV.argmax(-1).tolist()
        accepted = 0
        while accepted < len(drafts) and drafts[accepted] == best[accepted]:
            accepted += 1
        return accepted, best[accepted]
    for t, draft in enumerate(drafts):
        probs = filtered_probs(logits_NV[t], params.temperature, params.top_k, params.top_p, params.min_p)
        if uniform(generator, probs.device) < float(probs[draft]):
            continue
        residual = probs.clone()
        residual[draft] = 0.0
        return t, sample_from(residual / residual.sum(), generator)
    last = filtered_probs(logits_NV[len(drafts)], params.temperature, params.top_k, params.top_p, params.min_p)
    return len(drafts), sample_from(last, generator)
