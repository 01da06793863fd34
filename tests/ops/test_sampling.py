"""Counter-based sampling: the hash by hand, uniform noise, draws that follow the target distribution (with a
column left out), one draw whether the probabilities are filtered or not, and the Triton kernel against torch."""

import importlib.util
import os

import pytest
import torch

from league.ops.sampling import (
    COIN,
    SAMPLE,
    filtered_probs,
    mix32,
    row_keys,
    sample_logits_reference,
    sample_rows,
    uniforms,
)
from tests.engine.test_speculative import ALPHA, chi_square_p_value, shifted


def lowbias32(x: int) -> int:
    """The hash in plain Python integers (the published lowbias32 constants)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_hash_and_uniforms_by_hand():
    values = [0, 1, 12345, 0xDEADBEEF, 0xFFFFFFFF]
    assert mix32(torch.tensor(values)).tolist() == [lowbias32(v) for v in values]
    seed, position = (7 << 32) + 99, 41
    key = lowbias32(lowbias32(lowbias32(lowbias32(99 ^ 0x9E3779B9) ^ 7) ^ position) ^ SAMPLE)
    assert row_keys(torch.tensor([seed]), torch.tensor([position]), SAMPLE).item() == key
    bits = lowbias32(lowbias32((3 * 0x9E3779B9 + key) & 0xFFFFFFFF) ^ key)
    assert uniforms(torch.tensor([key]), 4)[0, 3] == torch.tensor(((bits >> 8) + 0.5) / 2**24, dtype=torch.float32)


def test_uniforms_are_uniform_and_streams_independent():
    seeds = torch.tensor([1, 1, 1, 2])
    positions = torch.tensor([0, 1, 2, 0])
    keys = torch.cat([row_keys(seeds, positions, SAMPLE), row_keys(seeds[:1], positions[:1], COIN)])
    u = uniforms(keys, 50_000)
    assert 0 < u.min().item() and u.max().item() < 1
    for row in u:
        counts = (row * 20).long().bincount(minlength=20)
        assert chi_square_p_value(counts, torch.full((20,), 0.05)) > ALPHA
    corr = torch.corrcoef(u)  # rows differing in position, seed or stream
    assert (corr - torch.eye(len(u))).abs().max().item() < 0.03


@pytest.mark.parametrize("exclude", [-1, 2])
def test_draws_follow_softmax_and_leave_out_the_excluded_column(exclude):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(10, generator=gen) * 1.5
    draws = 6000
    seeds = torch.arange(draws) * 7919 + 5
    tokens, lse, _ = sample_logits_reference(
        logits.expand(draws, -1), 0.8, seeds, torch.full((draws,), 3), torch.full((draws,), exclude)
    )
    target = (logits / 0.8).softmax(-1)
    torch.testing.assert_close(lse, (logits / 0.8).logsumexp(-1).expand(draws))
    if exclude >= 0:
        target[exclude] = 0
        target /= target.sum()
    counts = tokens.bincount(minlength=10)
    assert chi_square_p_value(counts, target) > ALPHA
    assert chi_square_p_value(counts, shifted(target)) < ALPHA  # power: a 0.05 shift is caught
    if exclude >= 0:
        assert counts[exclude] == 0


def test_filtered_and_unfiltered_draws_are_the_same_draw():
    """Without filtering, ``sample_rows`` on the probabilities picks what ``sample_logits`` picks on the logits."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(500, 64, generator=gen) * 2
    seeds, positions = torch.randint(0, 2**62, (500,), generator=gen), torch.randint(0, 4096, (500,), generator=gen)
    from_logits, _, _ = sample_logits_reference(logits, 1.3, seeds, positions)
    from_probs = sample_rows(filtered_probs(logits, 1.3), seeds, positions)
    assert (from_logits == from_probs).all()
    other = sample_rows(filtered_probs(logits, 1.3), seeds, positions + 1)
    assert (other != from_probs).float().mean().item() > 0.5  # the next position draws afresh


@pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs triton under TRITON_INTERPRET=1 (the GPU tests run the kernel on CUDA)",
)
@pytest.mark.parametrize("vocab,dtype", [(12, torch.float32), (40_000, torch.bfloat16)])
def test_triton_kernel_equals_torch(vocab, dtype):
    from league.ops.sampling.triton import sample_logits_fwd

    gen = torch.Generator().manual_seed(2)
    logits = (torch.randn(6, vocab, generator=gen) * 3).to(dtype)
    seeds, positions = torch.randint(0, 2**62, (6,), generator=gen), torch.randint(0, 1000, (6,), generator=gen)
    exclude = torch.tensor([-1, 3, -1, 0, 5, -1])
    ref_tokens, ref_lse, ref_coins = sample_logits_reference(logits, 0.7, seeds, positions, exclude)
    tokens, lse, coins = sample_logits_fwd(logits, 0.7, seeds, positions, exclude, (SAMPLE, COIN))
    assert tokens.tolist() == ref_tokens.tolist()
    assert torch.equal(coins, ref_coins)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=2e-6 * vocab**0.5)
