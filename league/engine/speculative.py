"""Speculative decoding with the model's MTP head: the draft chain, and acceptance of a verified chain.

topk = 1: the MTP head proposes a chain of ``num_steps`` tokens (its top-1 at each step); one target
forward verifies the bonus token plus the chain. Greedy acceptance keeps drafts while they equal the
target's argmax; sampling acceptance is exact speculative sampling with a deterministic draft (accept
d with probability p(d), else resample from the residual ``max(p - onehot(d), 0)``), so the emitted
tokens are distributed exactly as the target's. Not responsible for caches or scheduling.

Legend: B requests, N draft steps, D model dim, V vocabulary.
"""

import torch

from league.engine.request import SamplingParams, rows_by_settings
from league.models.qwen3_5_moe import ForwardBatch, ModelCache, Transformer
from league.ops.sampling import filtered_probs, sample_rows


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
    hidden, tokens = hidden_BD, torch.tensor(first_tokens, device=hidden_BD.device)
    chain = [tokens]
    for step in range(1, num_steps):
        starts = [p + step for p in positions]
        batch = ForwardBatch.packed(
            [1] * len(slots), device=hidden.device, cache_lens=starts, slots=slots, batch_invariant=batch_invariant
        )
        hidden = model.mtp_forward(hidden, tokens, batch, cache)
        tokens = model.mtp_logits(hidden, batch_invariant=batch_invariant).argmax(-1)
        chain.append(tokens)
    return torch.stack(chain, dim=1).tolist()


def accept(
    logits_NV: torch.Tensor, drafts: list[int], params: SamplingParams, generator: torch.Generator
) -> tuple[int, int]:
    """Decide how many drafts to keep and the bonus token (one request; see :func:`accept_batch`).

    Args:
        logits_NV (torch.Tensor): ``[N + 1, V]`` target logits; row t predicts the token after verify input t
            (input 0 is the pending token, input t > 0 is draft t).
        drafts (list[int]): the N draft tokens.
        params (SamplingParams): temperature 0 selects greedy acceptance.
        generator (torch.Generator): the request's generator (coins and the bonus draw).

    Returns:
        ``(num_accepted, bonus_token)``.
    """
    return accept_batch(logits_NV[None], [drafts], [params], [generator])[0]


def accept_batch(
    logits_BNV: torch.Tensor,
    drafts: list[list[int]],
    params: list[SamplingParams],
    generators: list[torch.Generator],
) -> list[tuple[int, int]]:
    """:func:`accept` for B requests verified together, with a fixed number of host synchronisations.

    Greedy requests keep drafts while they equal the target's argmax. Sampling requests that share settings are
    decided together: draft t is kept with probability p_t(d_t) (coin t of the request's N coins, drawn at once
    from its generator), and the first rejected position t draws from the residual ``max(p_t - onehot(d_t), 0)``
    (or, all kept, from ``p_N``), with the request's generator. Each request's result depends only on its own
    logits and generator, never on the batch.

    Returns:
        ``[(num_accepted, bonus_token)]`` per request.
    """
    num_drafts = logits_BNV.shape[1] - 1
    device = logits_BNV.device
    results: list[tuple[int, int] | None] = [None] * len(drafts)
    for key, rows in rows_by_settings(params).items():
        index = torch.tensor(rows, device=device)
        drafts_BN = torch.tensor([drafts[i] for i in rows], device=device, dtype=torch.long).view(len(rows), num_drafts)
        if key is None:  # greedy
            best_BN1 = logits_BNV[index].argmax(-1)
            keep_BN = drafts_BN == best_BN1[:, :num_drafts]
            for i, keep, best in zip(rows, keep_BN.tolist(), best_BN1.tolist()):
                accepted = _leading_true(keep)
                results[i] = (accepted, best[accepted])
            continue
        probs_BNV = filtered_probs(logits_BNV[index], *key)
        p_draft_BN = probs_BNV[:, :num_drafts].gather(-1, drafts_BN[..., None])[..., 0]
        coins_BN = torch.stack([torch.rand(num_drafts, generator=generators[i], device=device) for i in rows])
        accepted = [_leading_true(keep) for keep in (coins_BN < p_draft_BN).tolist()]
        at = torch.tensor(accepted, device=device)
        final_BV = probs_BNV[torch.arange(len(rows), device=device), at]
        rejected = at < num_drafts
        rejected_draft = drafts_BN.gather(1, at.clamp(max=num_drafts - 1)[:, None])[:, 0]
        final_BV = torch.where(rejected[:, None], final_BV.scatter(1, rejected_draft[:, None], 0.0), final_BV)
        final_BV = final_BV / final_BV.sum(-1, keepdim=True)
        bonus = sample_rows(final_BV, [generators[i] for i in rows]).tolist()
        for i, a, b in zip(rows, accepted, bonus):
            results[i] = (a, b)
    return results


def _leading_true(flags: list[bool]) -> int:
    """How many of ``flags`` are true before the first false."""
    count = 0
    while count < len(flags) and flags[count]:
        count += 1
    return count
