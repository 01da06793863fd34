"""Packing under a token budget, balancing across ranks, and the packed tensors of a micro-batch."""

import random

import pytest
import torch

from league.rl import algorithms as algo
from league.rl.batching import MicroBatch, balance_across_ranks, pack_by_token_budget, pack_samples
from league.rl.sample import Sample


def test_first_fit_decreasing_by_hand():
    # longest first: 7 opens bin 0; 6 opens bin 1; 5 opens bin 2; 3 -> bin 0 (10); 2 -> bin 1 (8); 2 -> bin 1 (10)
    lengths = [2, 7, 3, 5, 6, 2]
    assert pack_by_token_budget(lengths, 10) == [[1, 2], [0, 4, 5], [3]]
    assert pack_by_token_budget([], 10) == []
    assert pack_by_token_budget([10, 10], 10) == [[0], [1]]


@pytest.mark.parametrize("seed", range(40))
def test_packing_respects_budget_and_places_each_sample_once(seed):
    rng = random.Random(seed)
    budget = rng.choice([16, 100, 8192])
    lengths = [rng.randint(1, budget) for _ in range(rng.randint(1, 64))]
    bins = pack_by_token_budget(lengths, budget)
    assert all(sum(lengths[i] for i in b) <= budget for b in bins)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(b == sorted(b) for b in bins)
    # first fit: a sample sits in a later bin only because it did not fit in any earlier one
    sums = [sum(lengths[i] for i in b) for b in bins]
    for j, b in enumerate(bins):
        assert all(sums[k] + lengths[i] > budget for k in range(j) for i in b)
    assert pack_by_token_budget(list(lengths), budget) == bins


def test_over_long_sample_raises():
    with pytest.raises(ValueError, match=r"sample 2 has 11 tokens.*budget of 10"):
        pack_by_token_budget([3, 4, 11, 2], 10)
    with pytest.raises(ValueError, match="max_tokens"):
        pack_by_token_budget([1], 0)


def test_balance_by_hand():
    # 4 micro-batches of 8, 7, 6, 5 tokens on 2 ranks: KK pairs 8 with 5 and 7 with 6
    lengths = [8, 7, 6, 5]
    ranks = balance_across_ranks([[0], [1], [2], [3]], lengths, 2)
    assert ranks == [
        [MicroBatch(indices=[0], num_tokens=8), MicroBatch(indices=[3], num_tokens=5)],
        [MicroBatch(indices=[1], num_tokens=7), MicroBatch(indices=[2], num_tokens=6)],
    ]


def test_balance_pads_by_splitting_the_largest_bin():
    # 3 bins for 2 ranks -> 4: the largest multi-sample bin [0, 1, 2] (12 tokens) splits into 6 | 6 by LPT
    lengths = [6, 3, 3, 9, 2]
    bins = [[0, 1, 2], [3], [4]]
    ranks = balance_across_ranks(bins, lengths, 2)
    flat = sorted(tuple(m.indices) for r in ranks for m in r)
    assert flat == [(0,), (1, 2), (3,), (4,)]
    assert [len(r) for r in ranks] == [2, 2]
    # sums 6, 6, 9, 2 -> {9, 2} and {6, 6}
    assert sorted(sum(m.num_tokens for m in r) for r in ranks) == [11, 12]
    # one bin and four ranks: split until there are four
    ranks = balance_across_ranks([[0, 1, 2, 3, 4]], lengths, 4)
    assert [len(r) for r in ranks] == [1, 1, 1, 1]
    assert sorted(i for r in ranks for m in r for i in m.indices) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="3 samples cannot fill 4 micro-batches"):
        balance_across_ranks([[0], [1, 2]], lengths, 4)


@pytest.mark.parametrize("seed", range(30))
def test_balance_equal_counts_and_near_equal_tokens(seed):
    rng = random.Random(seed)
    budget = 1000
    lengths = [rng.randint(20, budget) for _ in range(rng.randint(16, 96))]
    num_ranks = rng.choice([1, 2, 3, 4, 8])
    bins = pack_by_token_budget(lengths, budget)
    ranks = balance_across_ranks(bins, lengths, num_ranks)
    counts = {len(r) for r in ranks}
    assert len(ranks) == num_ranks and len(counts) == 1
    assert sorted(i for r in ranks for m in r for i in m.indices) == list(range(len(lengths)))
    assert all(m.num_tokens == sum(lengths[i] for i in m.indices) <= budget for r in ranks for m in r)
    totals = [sum(m.num_tokens for m in r) for r in ranks]
    assert max(totals) - min(totals) <= budget
    assert balance_across_ranks(bins, lengths, num_ranks) == ranks


def make_samples() -> list[Sample]:
    return [
        Sample(prompt_ids=[11, 12, 13], response_ids=[14, 15], rollout_logprobs=[-0.1, -0.2], advantage=1.5),
        Sample(
            prompt_ids=[21],
            response_ids=[22, 23, 24],
            rollout_logprobs=[-1.0, -2.0, -3.0],
            advantage=-0.5,
            loss_mask=[1, 0, 1],
            status="truncated",
            index=1,
        ),
    ]


def test_pack_samples_tensors_by_hand():
    packed = pack_samples(make_samples())
    assert packed.tokens_T.tolist() == [11, 12, 13, 14, 15, 21, 22, 23, 24]
    assert packed.cu_seqlens.tolist() == [0, 5, 9] and packed.seq_lens == [5, 4]
    assert packed.loss_mask_T.tolist() == [0, 0, 0, 1, 1, 0, 1, 0, 1]
    assert packed.response_index_R.tolist() == [3, 4, 6, 7, 8]
    # response token j of a sample is predicted at packed position prompt_start + prompt_len + j - 1
    assert packed.logit_index_R.tolist() == [2, 3, 5, 6, 7]
    assert packed.response_tokens_R.tolist() == [14, 15, 22, 23, 24]
    assert packed.loss_mask_R.tolist() == [1, 1, 1, 0, 1]
    assert packed.advantages_R.tolist() == [1.5, 1.5, -0.5, -0.5, -0.5]
    assert torch.allclose(packed.rollout_logprobs_R, torch.tensor([-0.1, -0.2, -1.0, -2.0, -3.0]))
    assert packed.sample_of_R.tolist() == [0, 0, 1, 1, 1] and packed.response_lengths == [2, 3]
    assert torch.equal(packed.tokens_T[packed.response_index_R], packed.response_tokens_R)
    # the token-aligned mask feeds the MTP labels directly
    _, labels, mask = algo.mtp_labels_and_mask(packed.tokens_T, packed.loss_mask_T, packed.cu_seqlens)
    assert labels.tolist() == [13, 14, 15, 0, 0, 23, 24, 0, 0]
    assert mask.tolist() == [0, 1, 1, 0, 0, 0, 1, 0, 0]


def test_sample_validation():
    with pytest.raises(ValueError, match="rollout_logprobs"):
        Sample(prompt_ids=[1], response_ids=[2, 3], rollout_logprobs=[-1.0])
    with pytest.raises(ValueError, match="loss_mask"):
        Sample(prompt_ids=[1], response_ids=[2], rollout_logprobs=[-1.0], loss_mask=[1, 1])
    with pytest.raises(ValueError, match="status"):
        Sample(prompt_ids=[1], response_ids=[], rollout_logprobs=[], status="done")
    with pytest.raises(ValueError, match="prompt_ids"):
        Sample(prompt_ids=[], response_ids=[2], rollout_logprobs=[-1.0])
    assert make_samples()[0].response_loss_mask == [1, 1] and make_samples()[1].num_tokens == 4
