"""Dynamic batching: samples packed into micro-batches under a token budget, micro-batches shared out among
data-parallel ranks, and the packed tensors of one micro-batch.

Not responsible for truncating samples to fit the budget (the rollout does), for running the model, or for the
loss: it decides which samples go together and lays their tokens end to end.

Legend: T packed tokens of a micro-batch, R response tokens of a micro-batch, N samples of a micro-batch.
"""

import heapq
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from league.rl.sample import Sample


@dataclass(kw_only=True, slots=True)
class MicroBatch:
    """Which samples one forward/backward packs together.

    Args:
        indices (list[int]): positions of the samples in the list the micro-batch was cut from, ascending.
        num_tokens (int): their total token count (prompt + response).
    """

    indices: list[int]
    num_tokens: int


def pack_by_token_budget(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """First-fit decreasing: micro-batches of at most ``max_tokens`` tokens, as few as FFD finds.

    Samples are taken longest first (ties: lower index first) and each goes into the first micro-batch with
    room for it. Deterministic.

    Args:
        lengths (Sequence[int]): tokens of each sample (prompt + response).
        max_tokens (int): token budget of one micro-batch (``max_tokens_per_gpu * cp``).

    Returns:
        Indices of the samples of each micro-batch (ascending within a micro-batch); micro-batches in the order
        they were opened, so the first holds the longest sample.
    """
    if max_tokens < 1:
        raise ValueError(f"`max_tokens` must be >= 1, got {max_tokens}")
    for i, n in enumerate(lengths):
        if n > max_tokens:
            raise ValueError(
                f"sample {i} has {n} tokens, more than the micro-batch budget of {max_tokens}; "
                "raise `max_tokens_per_gpu` or lower the prompt/response length limits"
            )
    bins: list[list[int]] = []
    sums: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for b, total in enumerate(sums):
            if total + lengths[i] <= max_tokens:
                bins[b].append(i)
                sums[b] += lengths[i]
                break
        else:
            bins.append([i])
            sums.append(lengths[i])
    return [sorted(b) for b in bins]


def _split_in_two(indices: list[int], lengths: Sequence[int]) -> tuple[list[int], list[int]]:
    """Longest first into the lighter half; each half holds at most its parent's tokens, so stays in budget."""
    halves: tuple[list[int], list[int]] = ([], [])
    sums = [0, 0]
    for i in sorted(indices, key=lambda i: -lengths[i]):
        h = 0 if sums[0] <= sums[1] else 1
        halves[h].append(i)
        sums[h] += lengths[i]
    return sorted(halves[0]), sorted(halves[1])


def _equal_count_partition(values: list[int], k: int) -> list[list[int]]:
    """Karmarkar-Karp largest differencing into ``k`` parts of equal count (``len(values) % k == 0``).

    Items are taken ``k`` at a time in ascending order, one per part; the two states of largest spread are
    merged, pairing the heaviest part of one with the lightest of the other, until one state is left.
    """
    order = sorted(range(len(values)), key=lambda i: (values[i], i))
    heap: list[tuple[int, int, int, list[tuple[int, list[int]]]]] = []
    arrival = itertools.count()

    def push(parts: list[tuple[int, list[int]]]) -> None:
        parts.sort(key=lambda p: (-p[0], p[1]))
        # largest spread first, then heaviest part, then first pushed
        heapq.heappush(heap, (parts[-1][0] - parts[0][0], -parts[0][0], next(arrival), parts))

    for start in range(0, len(order), k):
        push([(values[i], [i]) for i in order[start : start + k]])
    while len(heap) > 1:
        a, b = heapq.heappop(heap)[3], heapq.heappop(heap)[3]
        push([(sa + sb, ia + ib) for (sa, ia), (sb, ib) in zip(a, reversed(b))])
    return [sorted(items) for _, items in heap[0][3]] if heap else [[] for _ in range(k)]


def balance_across_ranks(
    micro_batches: Sequence[Sequence[int]], lengths: Sequence[int], num_ranks: int
) -> list[list[MicroBatch]]:
    """Share micro-batches out among data-parallel ranks: the same count on each, token sums balanced.

    The micro-batch count is first raised to a multiple of ``num_ranks`` (and to at least ``num_ranks``) by
    splitting the micro-batch with the most tokens among those holding two samples or more, in two halves of
    about equal tokens. Then Karmarkar-Karp largest differencing with equal part sizes assigns the micro-batches
    to ranks by their token sums. Deterministic.

    Args:
        micro_batches (Sequence[Sequence[int]]): sample indices of each micro-batch (from
            :func:`pack_by_token_budget`).
        lengths (Sequence[int]): tokens of each sample.
        num_ranks (int): data-parallel ranks.

    Returns:
        For each rank, its micro-batches (ascending by first sample index), each as a :class:`MicroBatch`.
    """
    if num_ranks < 1:
        raise ValueError(f"`num_ranks` must be >= 1, got {num_ranks}")
    bins = [sorted(b) for b in micro_batches]
    target = max(-(-len(bins) // num_ranks), 1) * num_ranks
    while len(bins) < target:
        splittable = [(sum(lengths[i] for i in b), -j) for j, b in enumerate(bins) if len(b) > 1]
        if not splittable:
            raise ValueError(
                f"{sum(len(b) for b in bins)} samples cannot fill {target} micro-batches for {num_ranks} ranks "
                "with the same count on each; use more samples per step or fewer data-parallel ranks"
            )
        j = -max(splittable)[1]
        bins[j], extra = _split_in_two(bins[j], lengths)
        bins.append(extra)
    sums = [sum(lengths[i] for i in b) for b in bins]
    parts = _equal_count_partition(sums, num_ranks)
    return [
        sorted((MicroBatch(indices=bins[j], num_tokens=sums[j]) for j in part), key=lambda m: m.indices)
        for part in parts
    ]


@dataclass(kw_only=True, slots=True)
class PackedBatch:
    """The tensors of N samples laid end to end (``prompt + response`` each).

    Log-prob alignment: response token ``r`` sits at packed position ``response_index_R[r]`` and is predicted by
    the logits at ``logit_index_R[r] = response_index_R[r] - 1`` (the logits at ``p`` predict the token at
    ``p + 1``). All ``_R`` tensors follow the samples' order and each response's token order.

    Args:
        tokens_T (torch.Tensor): ``[T]`` long token ids.
        cu_seqlens (torch.Tensor): ``[N + 1]`` long sequence offsets.
        seq_lens (list[int]): tokens of each sample.
        loss_mask_T (torch.Tensor): ``[T]`` fp32, 1 at position ``p`` iff token ``p`` is a trained response
            token (what :func:`league.rl.algorithms.mtp_labels_and_mask` takes).
        response_index_R (torch.Tensor): ``[R]`` long packed position of each response token.
        logit_index_R (torch.Tensor): ``[R]`` long packed position of the logits that predict it.
        response_tokens_R (torch.Tensor): ``[R]`` long response token ids.
        loss_mask_R (torch.Tensor): ``[R]`` fp32 loss mask of the response tokens.
        advantages_R (torch.Tensor): ``[R]`` fp32 sample advantage broadcast to its response tokens.
        rollout_logprobs_R (torch.Tensor): ``[R]`` fp32 engine log-probs of the response tokens.
        sample_of_R (torch.Tensor): ``[R]`` long index (0..N-1, in this batch) of each token's sample.
        response_lengths (list[int]): response tokens of each sample.
        routed_experts (torch.Tensor, Optional): ``[T, layers, top_k]`` long, the rollout's experts of each position
            (-1 at each sample's last token, which the rollout never ran), when every sample has them. Default: None.
    """

    tokens_T: torch.Tensor
    cu_seqlens: torch.Tensor
    seq_lens: list[int]
    loss_mask_T: torch.Tensor
    response_index_R: torch.Tensor
    logit_index_R: torch.Tensor
    response_tokens_R: torch.Tensor
    loss_mask_R: torch.Tensor
    advantages_R: torch.Tensor
    rollout_logprobs_R: torch.Tensor
    sample_of_R: torch.Tensor
    response_lengths: list[int]
    routed_experts: torch.Tensor | None = None


def pack_samples(samples: Sequence[Sample], device: torch.device | str = "cpu") -> PackedBatch:
    """Lay ``samples`` end to end and build the tensors of one micro-batch.

    Args:
        samples (Sequence[Sample]): the micro-batch's samples, in packing order.
        device (torch.device | str): where the tensors go. Default: ``"cpu"``.
    """
    tokens: list[int] = []
    loss_mask_T: list[float] = []
    response_index: list[int] = []
    loss_mask_R: list[float] = []
    advantages: list[float] = []
    rollout: list[float] = []
    for s in samples:
        start = len(tokens) + len(s.prompt_ids)
        mask = [float(m) for m in s.response_loss_mask]
        tokens += s.prompt_ids + s.response_ids
        loss_mask_T += [0.0] * len(s.prompt_ids) + mask
        response_index += range(start, start + len(s.response_ids))
        loss_mask_R += mask
        advantages += [float(s.advantage)] * len(s.response_ids)
        rollout += s.rollout_logprobs
    seq_lens = [s.num_tokens for s in samples]
    response_lengths = [len(s.response_ids) for s in samples]

    def long(x: list[int]) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.long, device=device)

    def fp32(x: list[float]) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.float32, device=device)

    response_index_R = long(response_index)
    routes = None
    if samples and all(s.routed_experts is not None for s in samples):
        parts = [
            torch.cat([s.routed_experts.long(), torch.full_like(s.routed_experts[:1].long(), -1)]) for s in samples
        ]
        routes = torch.cat(parts).to(device)
    return PackedBatch(
        tokens_T=long(tokens),
        cu_seqlens=long([0, *seq_lens]).cumsum(0),
        seq_lens=seq_lens,
        loss_mask_T=fp32(loss_mask_T),
        response_index_R=response_index_R,
        logit_index_R=response_index_R - 1,
        response_tokens_R=long([t for s in samples for t in s.response_ids]),
        loss_mask_R=fp32(loss_mask_R),
        advantages_R=fp32(advantages),
        rollout_logprobs_R=fp32(rollout),
        sample_of_R=torch.repeat_interleave(long(list(range(len(samples)))), long(response_lengths)),
        response_lengths=response_lengths,
        routed_experts=routes,
    )
