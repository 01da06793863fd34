"""The engine's draws from logits: each request's penalties applied to its rows, one token per row by each request's
settings and seed, and the most likely tokens kept where a request asks for them.

Pure functions of requests and tensors; nothing here runs the model or changes a request. Not responsible for
speculative acceptance (``speculative.accept_on_device``, which takes the logits :func:`penalized_verify` makes).

Legend: R rows, B requests, N draft steps, V vocabulary, K extra tokens of a row.
"""

import torch

from league.engine.request import Request, rows_by_settings
from league.ops.logprob import top_logprobs
from league.ops.penalties import penalize, token_counts
from league.ops.sampling import filtered_probs, sample_logits, sample_rows, unfiltered

TopLogprobs = list[tuple[float, int]]


def penalized(
    reqs: list[Request], logits_RV: torch.Tensor, eos_ids: set[int], extra_RK: torch.Tensor | None = None
) -> torch.Tensor:
    """``logits_RV`` with the sampling penalties of the requests that ask for them applied to their rows (fp32;
    unchanged when none does). Row i belongs to ``reqs[i]``, whose output so far is its ``output_ids`` followed by the
    tokens of ``extra_RK[i]`` that are >= 0 (still on the device, or drafts before a verify position); ``eos_ids``
    are banned with the stop tokens before ``min_new_tokens``."""
    rows = [i for i, r in enumerate(reqs) if r.params.penalized]
    if not rows:
        return logits_RV
    device, vocab = logits_RV.device, logits_RV.shape[-1]

    def padded(lists: list[list[int]]) -> torch.Tensor:
        width = max(1, max(len(x) for x in lists))
        return torch.tensor([x + [-1] * (width - len(x)) for x in lists], dtype=torch.long).to(device)

    chosen = [reqs[i] for i in rows]
    index = torch.tensor(rows, device=device)
    outputs = padded([r.output_ids for r in chosen])
    if extra_RK is not None:
        outputs = torch.cat([outputs, extra_RK[index]], dim=1)
    counts = token_counts(outputs, vocab)
    seen = (counts > 0) | (token_counts(padded([r.prompt_ids for r in chosen]), vocab) > 0)
    stops = padded([r.params.stop_token_ids + ([] if r.params.ignore_eos else sorted(eos_ids)) for r in chosen])
    num_out = (outputs >= 0).sum(1)
    early = num_out < torch.tensor([r.params.min_new_tokens for r in chosen], device=device)
    banned = (token_counts(stops, vocab) > 0) & early[:, None]
    values = torch.tensor(
        [[r.params.frequency_penalty, r.params.presence_penalty, r.params.repetition_penalty] for r in chosen],
        dtype=torch.float32,
    ).to(device)
    bias = None
    if any(r.params.logit_bias for r in chosen):
        bias = torch.zeros(len(chosen), vocab, dtype=torch.float32)
        for i, r in enumerate(chosen):
            bias[i, list(r.params.logit_bias)] = torch.tensor(list(r.params.logit_bias.values()), dtype=torch.float32)
        bias = bias.to(device)
    logits = logits_RV.float()  # a copy in fp32: the raw logits stay for the log-probs
    logits[index] = penalize(logits[index], counts, seen, banned, *values.unbind(1), bias)
    return logits


def penalized_verify(
    reqs: list[Request], logits_BNV: torch.Tensor, drafts_BN: torch.Tensor, eos_ids: set[int]
) -> torch.Tensor:
    """:func:`penalized` for a verify's ``[B, N + 1, V]`` logits: row t of a request counts its drafts before t as
    output."""
    if not any(r.params.penalized for r in reqs):
        return logits_BNV
    batch, width = logits_BNV.shape[:2]
    steps = torch.arange(width, device=drafts_BN.device)
    before_NN = steps[None, : width - 1] < steps[:, None]
    extra = torch.where(before_NN[None], drafts_BN[:, None, :], -1).flatten(0, 1)
    rows = [r for r in reqs for _ in range(width)]
    return penalized(rows, logits_BNV.flatten(0, 1), eos_ids, extra).view(batch, width, -1)


def sample_batch(reqs: list[Request], logits_BV: torch.Tensor, out_positions: list[int]) -> torch.Tensor:
    """One token per row, ``[B]`` on the device: argmax for greedy requests; rows sharing sampling settings are drawn
    together, each with its request's seed at its output position ``out_positions[i]`` (so a row's token does not
    depend on the batch)."""
    groups = rows_by_settings([r.params for r in reqs])
    if None in groups:
        tokens = logits_BV.argmax(-1)
    else:  # no greedy row: skip a pass over the logits
        tokens = torch.empty(logits_BV.shape[0], dtype=torch.long, device=logits_BV.device)
    for settings, rows in groups.items():
        if settings is None:  # greedy rows keep the argmax
            continue
        index = slice(None) if len(rows) == len(reqs) else torch.tensor(rows, device=logits_BV.device)
        host = torch.tensor([[reqs[i].seed for i in rows], [out_positions[i] for i in rows]])
        seeds, positions = host.to(logits_BV.device, non_blocking=True).unbind(0)
        if unfiltered(*settings):
            tokens[index] = sample_logits(logits_BV[index], settings[0], seeds, positions)[0]
        else:
            tokens[index] = sample_rows(filtered_probs(logits_BV[index], *settings), seeds, positions)
    return tokens


def top_tensors(reqs: list[Request], logits_RV: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The largest ``top_logprobs_num`` of the rows' requests: ``([R, k] log-probs, [R, k] token ids)`` on the device,
    or ``()`` when no request asks."""
    k = max((r.top_logprobs_num for r in reqs), default=0)
    return top_logprobs(logits_RV, k) if k else ()


def top_pairs(reqs: list[Request], tops: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> list[TopLogprobs]:
    """Row i's ``reqs[i].top_logprobs_num`` most likely ``(log-prob, token id)`` from :func:`top_tensors`' result (on
    the host or read back now); empty lists when it is empty."""
    if not tops:
        return [[] for _ in reqs]
    values, ids = (t.tolist() for t in tops)
    return [list(zip(v[: r.top_logprobs_num], t[: r.top_logprobs_num])) for v, t, r in zip(values, ids, reqs)]
