"""GRPO pieces against numbers worked out by hand: advantages, each policy-loss branch, both aggregations,
KL estimators and their clamps, TIS, ESS, and the MTP labels, mask and loss on a packed batch."""

import math

import pytest
import torch

from league.ops.logprob import token_logprobs
from league.rl import algorithms as algo

INF, NAN = float("inf"), float("nan")


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def close(actual: torch.Tensor, expected, atol: float = 1e-9) -> None:
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    assert torch.allclose(actual, expected, atol=atol, rtol=0), (actual, expected)


def test_grpo_advantages_by_hand():
    # group [1, 0, 0, 0]: mean 0.25, centred [0.75, -0.25, -0.25, -0.25],
    #   unbiased var (0.5625 + 3 * 0.0625) / 3 = 0.25, std 0.5 -> divide by 0.500001
    # group [1, 1, 1, 1]: std 0 -> centred values (zeros), no division
    # group [2, 0, 1, 1]: mean 1, centred [1, -1, 0, 0], var 2 / 3, std sqrt(2/3)
    rewards = t(1, 0, 0, 0, 1, 1, 1, 1, 2, 0, 1, 1)
    s = math.sqrt(2 / 3) + 1e-6
    expected = [0.75 / 0.500001, *[-0.25 / 0.500001] * 3, 0, 0, 0, 0, 1 / s, -1 / s, 0, 0]
    close(algo.grpo_advantages(rewards, 4), expected)
    # Dr. GRPO: only the mean is subtracted
    close(
        algo.grpo_advantages(rewards, 4, std_normalization=False), [0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0, 1, -1, 0, 0]
    )
    # one sample per prompt: r - r = 0 whatever the switch
    close(algo.grpo_advantages(t(3, -1), 1), [0, 0])


def test_grpo_advantages_by_group_ids_and_torch_std():
    rewards = torch.tensor([0.3, 1.0, -2.0, 0.5, 0.0, 4.0, 1.5], dtype=torch.float64)
    ids = torch.tensor([7, 3, 7, 3, 7, 9, 3])  # groups need not be consecutive; 9 is a group of one
    out = algo.grpo_advantages_by_group(rewards, ids, eps=0.0)
    for g in (7, 3):
        r = rewards[ids == g]
        close(out[ids == g], (r - r.mean()) / r.std())
    close(out[ids == 9], [0.0])
    with pytest.raises(ValueError, match="group_size"):
        algo.grpo_advantages(rewards, 2)


def test_policy_loss_each_branch_by_hand():
    # eps_clip 0.2, eps_clip_high 0.28: the ratio is clipped into [0.8, 1.28]
    ratio = t(1.5, 0.5, 1.1, 1.5, 0.5)
    adv = t(1, -1, 1, -1, 1)
    logp = ratio.log() - 1.0
    old = torch.full_like(logp, -1.0)
    loss, clipfrac, ppo_kl = algo.policy_loss(logp, old, adv, 0.2, 0.28)
    # A>0, r=1.5: pg1=-1.5, pg2=-1.28 -> max -1.28, clipped high
    # A<0, r=0.5: pg1=0.5,  pg2=0.8   -> max 0.8,   clipped low
    # A>0, r=1.1: pg1=pg2=-1.1        -> -1.1, not clipped
    # A<0, r=1.5: pg1=1.5,  pg2=1.28  -> 1.5 (unclipped side), not clipped
    # A>0, r=0.5: pg1=-0.5, pg2=-0.8  -> -0.5, not clipped
    close(loss, [-1.28, 0.8, -1.1, 1.5, -0.5], atol=1e-12)
    close(clipfrac, [1, 1, 0, 0, 0])
    close(ppo_kl, -ratio.log(), atol=1e-12)


def test_dual_clip_by_hand():
    ratio = t(5.0, 2.0, 5.0, 0.5)
    adv = t(-1, -1, 2, -1)
    logp, old = ratio.log(), torch.zeros(4, dtype=torch.float64)
    loss, clipfrac, _ = algo.policy_loss(logp, old, adv, 0.2, 0.28, eps_clip_c=3.0)
    # A=-1, r=5: max(5, 1.28)=5, bounded by -3*A = 3 -> 3 (dual clip)
    # A=-1, r=2: max(2, 1.28)=2 < 3 -> 2
    # A=2,  r=5: pg1=-10, pg2=-2.56 -> -2.56 (dual clip only for A<0)
    # A=-1, r=0.5: max(0.5, 0.8)=0.8 -> 0.8, clipped low
    close(loss, [3.0, 2.0, -2.56, 0.8], atol=1e-12)
    close(clipfrac, [0, 0, 1, 1])
    mask = algo.dual_clip_mask(logp, old, adv, 0.2, 0.28, 3.0)
    assert mask.tolist() == [True, False, False, False]
    with pytest.raises(ValueError, match="eps_clip_c"):
        algo.policy_loss(logp, old, adv, 0.2, 0.28, eps_clip_c=1.0)


def test_policy_loss_nan_and_inf_are_neutral():
    # non-finite log-ratios -> 0 (ratio 1), as the reference masks them; a finite 25 -> clamp 20
    logp, old = t(NAN, -INF, 0.0, 25.0, -1.0), t(0.0, 0.0, -INF, 0.0, -1.5)
    adv = t(1, -1, 1, -1, NAN)
    loss, clipfrac, ppo_kl = algo.policy_loss(logp, old, adv, 0.2, 0.28)
    close(ppo_kl, [0.0, 0.0, 0.0, -20.0, -0.5])
    # A=1, r=1 -> -1; A=-1, r=1 -> 1; A=1, r=1 -> -1; A=-1, r=e^20 -> e^20; A=NaN -> 0: loss 0
    close(loss, [-1.0, 1.0, -1.0, math.exp(20), 0.0], atol=1e-6)
    close(clipfrac, [0, 0, 0, 0, 0])
    assert algo.dual_clip_mask(logp, old, adv, 0.2, 0.28, 3.0).tolist() == [False, False, False, True, False]
    assert algo.count_nonfinite(t(1, 1, 0, 1, 1), logp, old).item() == 2  # the -inf old log-prob is masked out


def test_nonfinite_tokens_get_no_gradient():
    logp = t(-INF, NAN, -0.5, -1.0).requires_grad_()
    old, ref = t(-1.0, -1.0, -0.5, NAN), t(-1.0, -1.0, -1.0, -1.0)
    mask = t(1, 1, 1, 1)
    loss, _, _ = algo.policy_loss(logp, old, t(1, 1, 1, 1), 0.2, 0.28)
    for kind in ("k1", "k2", "k3", "low_var_kl"):
        loss = loss + algo.approx_kl(logp, ref, kind)
    algo.sample_mean_of_token_means(loss, mask, algo.sample_ids([4]), 1).backward()
    # token 2: d(-r)/dlogp = -1 at r = 1, plus the KLs at lr = 0.5: 1 + 0.5 + (1 - e^-0.5) + (1 - e^-0.5); / 4
    expected = (-1 + 1 + 0.5 + 2 * (1 - math.exp(-0.5))) / 4
    # token 3: the ratio is neutral (NaN old): only k1 at lr = 0 has a gradient, 1 / 4
    close(logp.grad, [0.0, 0.0, expected, 0.25], atol=1e-12)


def test_policy_loss_gradient_is_zero_where_clipped():
    logp = t(1.5, 1.1).log().requires_grad_()
    loss, _, _ = algo.policy_loss(logp, torch.zeros(2, dtype=torch.float64), t(1, 1), 0.2, 0.28)
    loss.sum().backward()
    # d(-A r)/dlogp = -A r: 0 for the clipped token, -1.1 for the other
    close(logp.grad, [0.0, -1.1], atol=1e-12)


def test_sample_mean_of_token_means_by_hand():
    # samples of 3, 2, 1, 2 tokens; the NaN is masked out and must not leak
    x = t(1, 2, 3, 4, 5, 6, 7, NAN)
    mask = t(1, 1, 0, 1, 0, 0, 1, 0)
    sample_of = algo.sample_ids([3, 2, 1, 2])
    assert sample_of.tolist() == [0, 0, 0, 1, 1, 2, 3, 3]
    # token means: (1+2)/2 = 1.5, 4/1 = 4, 0/max(0,1) = 0, 7/1 = 7 -> sum 12.5, GBS 5 -> 2.5
    close(algo.sample_mean_of_token_means(x, mask, sample_of, 5), 2.5)
    # two micro-batches of the same step add up to the step value
    first = algo.sample_mean_of_token_means(x[:5], mask[:5], algo.sample_ids([3, 2]), 5)
    second = algo.sample_mean_of_token_means(x[5:], mask[5:], algo.sample_ids([1, 2]), 5)
    close(first + second, 2.5)
    close(first, 5.5 / 5)


def test_token_mean_by_hand_and_grads():
    x = t(1, 2, 3, 4, 5, 6, NAN).requires_grad_()
    mask = t(1, 1, 0, 1, 0, 1, 0)
    # (1 + 2 + 4 + 6) / 8 tokens in the step
    out = algo.token_mean(x, mask, 8)
    close(out.detach(), 13 / 8)
    out.backward()
    close(x.grad, [1 / 8, 1 / 8, 0, 1 / 8, 0, 1 / 8, 0])
    x.grad = None
    algo.sample_mean_of_token_means(x, mask, algo.sample_ids([3, 4]), 2).backward()
    # sample 0: 2 tokens -> 1/(2*2); sample 1: 2 tokens -> 1/(2*2)
    close(x.grad, [0.25, 0.25, 0, 0.25, 0, 0.25, 0])


def test_kl_estimators_by_hand():
    logp, ref = t(-1.0, -2.0), t(-1.5, -1.0)
    # lr = [0.5, -1]
    close(algo.approx_kl(logp, ref, "k1"), [0.5, -1.0])
    close(algo.approx_kl(logp, ref, "k2"), [0.125, 0.5])
    # u = -lr = [-0.5, 1]: exp(u) - 1 - u
    k3 = [math.exp(-0.5) - 1 + 0.5, math.e - 2]
    close(algo.approx_kl(logp, ref, "k3"), k3)
    close(algo.approx_kl(logp, ref, "low_var_kl"), k3)
    with pytest.raises(ValueError, match="k4"):
        algo.approx_kl(logp, ref, "k4")


def test_kl_clamps_and_nonfinite_values():
    logp = t(0.0, -30.0, NAN, -INF, 0.0, -12.0, 0.0)
    ref = t(-30.0, 0.0, 0.0, 0.0, -INF, 0.0, -800.0)
    # u = ref - logp = [-30, 30, nan, inf, -inf, 12, -800]
    low = algo.approx_kl(logp, ref, "low_var_kl")
    # input clamp: -30 -> -20: exp(-20) + 19 -> output clamp 10; 30 -> 20: exp(20) - 21 -> 10; nan, +/-inf -> 0
    # (neutral, as the reference); 12 is inside [-20, 20]: exp(12) - 13 -> 10; -800 -> -20 -> 10
    close(low, [10.0, 10.0, 0.0, 0.0, 0.0, 10.0, 10.0])
    small = algo.approx_kl(t(-0.0), t(-2.0), "low_var_kl")  # u = -2: e^-2 + 1, below the output clamp
    close(small, [math.exp(-2) + 1])
    k3 = algo.approx_kl(logp, ref, "k3")  # no clamps: large finite values stay; non-finite ones -> 0
    close(k3[:2], [math.exp(-30) + 29, math.exp(30) - 31], atol=1e-3)
    close(k3[2:], [0.0, 0.0, 0.0, math.exp(12) - 13, 799.0], atol=1e-6)
    assert algo.kl_is_finite(logp, ref, "k3").tolist() == [True, True, False, False, False, True, True]
    # float32, u = 100: exp(100) overflows, so k3 is 0 there while the clamped low_var_kl stays 10
    logp32, ref32 = t(-100.0).float(), t(0.0).float()
    assert algo.approx_kl(logp32, ref32, "k3").item() == 0.0 and not algo.kl_is_finite(logp32, ref32, "k3").item()
    assert algo.approx_kl(logp32, ref32, "low_var_kl").item() == 10.0
    close(algo.approx_kl(logp, ref, "k1"), [30.0, -30.0, 0.0, 0.0, 0.0, -12.0, 800.0])
    close(algo.approx_kl(logp, ref, "k2"), [450.0, 450.0, 0.0, 0.0, 0.0, 72.0, 320000.0])


def test_tis_weights_and_clip_mask():
    old, rollout = t(-1.0, -1.0, 0.0, -3.0), t(-1.5, 0.0, -2.0, -3.0)
    # exp(old - rollout) = [e^0.5, e^-1, e^2, 1]
    close(algo.tis_weights(old, rollout), [math.exp(0.5), math.exp(-1), 2.0, 1.0])
    close(algo.tis_weights(old, rollout, clip_low=0.5, clip_high=1.5), [1.5, 0.5, 1.5, 1.0])
    assert algo.tis_clip_mask(old, rollout, 0.5, 1.5).tolist() == [True, True, True, False]
    assert algo.tis_clip_mask(old, rollout).tolist() == [False, False, True, False]
    # non-finite log-ratios weigh 1
    close(algo.tis_weights(t(NAN, -1.0, -INF), t(-1.0, -INF, -INF)), [1.0, 1.0, 1.0])


def test_ess_ratio_by_hand():
    # sample 0: w = [1, 2] -> (3)^2 / (2 * 5) = 0.9; sample 1: one masked-in token -> 1; sample 2: no token -> 1
    ppo_kl = -t(1.0, 2.0, 7.0, 3.0, 5.0).log()
    mask = t(1, 1, 0, 1, 0)
    close(algo.ess_ratio(ppo_kl, mask, algo.sample_ids([3, 1, 1])), [0.9, 1.0, 1.0])


def test_entropy_is_the_ops_function():
    from league.ops.logprob import entropy

    assert algo.entropy is entropy


PACKED = dict(
    # (prompt, response, response loss mask) of three sequences
    seqs=[
        ([11, 12, 13], [14, 15, 16], [1, 1, 1]),
        ([21], [22, 23], [1, 1]),
        ([31, 32], [33, 34, 35, 36], [1, 0, 1, 1]),
    ]
)


def packed_batch(pad: int = 0):
    tokens, mask, lens = [], [], []
    for prompt, resp, m in PACKED["seqs"]:
        tokens += prompt + resp
        mask += [0] * len(prompt) + m
        lens.append(len(prompt) + len(resp))
    tokens += [99] * pad
    mask += [0] * pad
    return torch.tensor(tokens), torch.tensor(mask, dtype=torch.float32), torch.tensor([0, *lens]).cumsum(0)


def test_mtp_labels_and_mask_on_packed_batch():
    tokens, mask, cu = packed_batch()
    assert cu.tolist() == [0, 6, 9, 15]
    next_tokens, labels, mtp_mask = algo.mtp_labels_and_mask(tokens, mask, cu)
    # row t: (h_t, token t+1) -> token t+2, trained iff token t+2 is a trained response token of the same sequence
    assert next_tokens.tolist() == [12, 13, 14, 15, 16, 0] + [22, 23, 0] + [32, 33, 34, 35, 36, 0]
    assert labels.tolist() == [13, 14, 15, 16, 0, 0] + [23, 0, 0] + [33, 34, 35, 36, 0, 0]
    assert mtp_mask.tolist() == [0, 1, 1, 1, 0, 0] + [1, 0, 0] + [1, 0, 1, 1, 0, 0]
    # trailing padding belongs to no sequence
    tokens, mask, cu = packed_batch(pad=3)
    next_tokens, labels, mtp_mask = algo.mtp_labels_and_mask(tokens, mask, cu)
    assert next_tokens.tolist()[15:] == [0, 0, 0] and labels.tolist()[15:] == [0, 0, 0]
    assert mtp_mask.tolist() == [0, 1, 1, 1, 0, 0] + [1, 0, 0] + [1, 0, 1, 1, 0, 0] + [0, 0, 0]
    assert labels.tolist()[:15] == [13, 14, 15, 16, 0, 0] + [23, 0, 0] + [33, 34, 35, 36, 0, 0]


def test_mtp_loss_matches_manual_cross_entropy():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 11, generator=gen, dtype=torch.float64).to(torch.bfloat16)
    labels = torch.tensor([3, 0, 10, 7, 7, 1])
    mask = torch.tensor([1, 0, 1, 1, 0, 1])
    manual = 0.0
    for row, label, m in zip(logits.double(), labels, mask):
        if m:
            manual += -(row[label] - torch.log(torch.exp(row).sum())).item()
    out = algo.mtp_loss(token_logprobs(logits, labels), mask)
    assert out.dtype == torch.float32
    close(out.double(), manual / 4, atol=1e-5)
    close(algo.mtp_loss(token_logprobs(logits, labels), torch.zeros(6)).double(), 0.0)
