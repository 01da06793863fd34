"""GRPO as the reference system computes it: advantages, clipped policy loss, aggregation, KL estimators,
truncated importance sampling, and the MTP head's labels and loss. Pure functions of tensors.

Not responsible for running the model, packing samples, reducing across ranks or choosing which terms enter the
loss: the trainer calls these with tensors it has already gathered.

Legend: N samples of a rollout, T tokens (packed, or the response tokens of a micro-batch: every per-token
function here works on either as long as its arguments agree), S samples of a micro-batch, V vocabulary.
Log-prob alignment: the log-prob of a response token is read from the logits one packed position before it.
"""

from typing import Literal

import torch

from league.ops.logprob import entropy

__all__ = [
    "approx_kl",
    "count_nonfinite",
    "dual_clip_mask",
    "entropy",
    "ess_ratio",
    "grpo_advantages",
    "grpo_advantages_by_group",
    "kl_is_finite",
    "mtp_labels_and_mask",
    "mtp_loss",
    "policy_loss",
    "sample_ids",
    "sample_mean_of_token_means",
    "tis_clip_mask",
    "tis_weights",
    "token_mean",
]

KLKind = Literal["k1", "k2", "k3", "low_var_kl"]
LOG_RATIO_CLAMP = 20.0
LOW_VAR_KL_CLAMP = 10.0


def grpo_advantages_by_group(
    rewards_N: torch.Tensor, group_ids_N: torch.Tensor, std_normalization: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """Group-normalised rewards: ``r - mean_g(r)``, then ``/ (std_g(r) + eps)`` where that is defined.

    The division happens only when ``std_normalization`` is on, the group has more than one sample and its
    unbiased (N - 1) standard deviation is > 0; a group whose rewards are all equal gets zeros.

    Args:
        rewards_N (torch.Tensor): ``[N]`` rewards.
        group_ids_N (torch.Tensor): ``[N]`` integer group of each sample (any values; equal means same group).
        std_normalization (bool): divide by the group's standard deviation (off: Dr. GRPO). Default: ``True``.
        eps (float): added to the standard deviation. Default: ``1e-6``.

    Returns:
        ``[N]`` advantages, in the dtype of ``rewards_N``.
    """
    if rewards_N.shape != group_ids_N.shape or rewards_N.ndim != 1:
        raise ValueError(f"rewards {tuple(rewards_N.shape)} and group_ids {tuple(group_ids_N.shape)} must be [N]")
    groups_G, group_N = torch.unique(group_ids_N, return_inverse=True)
    counts_G = rewards_N.new_zeros(groups_G.numel()).index_add_(0, group_N, torch.ones_like(rewards_N))
    sums_G = torch.zeros_like(counts_G).index_add_(0, group_N, rewards_N)
    centred_N = rewards_N - (sums_G / counts_G)[group_N]
    if not std_normalization:
        return centred_N
    sq_G = torch.zeros_like(counts_G).index_add_(0, group_N, centred_N.square())
    std_G = (sq_G / (counts_G - 1).clamp_min(1)).sqrt()
    divide_G = (counts_G > 1) & (std_G > 0)
    return torch.where(divide_G[group_N], centred_N / (std_G[group_N] + eps), centred_N)


def grpo_advantages(
    rewards_N: torch.Tensor, group_size: int, std_normalization: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """:func:`grpo_advantages_by_group` for groups of ``group_size`` consecutive samples.

    Args:
        rewards_N (torch.Tensor): ``[N]`` rewards, N a multiple of ``group_size``.
        group_size (int): samples per prompt.
        std_normalization (bool): divide by the group's standard deviation. Default: ``True``.
        eps (float): added to the standard deviation. Default: ``1e-6``.
    """
    if group_size < 1 or rewards_N.numel() % group_size:
        raise ValueError(f"{rewards_N.numel()} rewards do not split into groups of `group_size` {group_size}")
    group_ids_N = torch.arange(rewards_N.numel(), device=rewards_N.device) // group_size
    return grpo_advantages_by_group(rewards_N, group_ids_N, std_normalization, eps)


def _neutral(x_T: torch.Tensor) -> torch.Tensor:
    """``x`` where finite, 0 where NaN or infinite, with no gradient through the non-finite entries."""
    return torch.where(torch.isfinite(x_T), x_T, torch.zeros((), dtype=x_T.dtype, device=x_T.device))


def _log_ratio(logp_T: torch.Tensor, old_logp_T: torch.Tensor) -> torch.Tensor:
    """``logp - old_logp``: 0 (ratio 1) where not finite, as the reference masks it; finite values clamped to
    [-20, 20], which only keeps ``exp`` of a large finite difference in range."""
    return _neutral(logp_T - old_logp_T).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def count_nonfinite(mask_T: torch.Tensor, *values_T: torch.Tensor) -> torch.Tensor:
    """Masked-in tokens where any of ``values_T`` is NaN or infinite (the tokens the loss treats as neutral).

    Args:
        mask_T (torch.Tensor): ``[T]`` loss mask.
        *values_T (torch.Tensor): ``[T]`` tensors each, e.g. log-probs.

    Returns:
        Scalar long tensor.
    """
    bad_T = torch.zeros_like(mask_T, dtype=torch.bool)
    for x_T in values_T:
        bad_T |= ~torch.isfinite(x_T.detach())
    return (bad_T & (mask_T != 0)).sum()


def _clip_losses(
    log_ratio_T: torch.Tensor, advantages_T: torch.Tensor, eps_clip: float, eps_clip_high: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ratio_T = log_ratio_T.exp()
    pg1_T = -advantages_T * ratio_T
    pg2_T = -advantages_T * ratio_T.clamp(1 - eps_clip, 1 + eps_clip_high)
    return torch.maximum(pg1_T, pg2_T), pg1_T, pg2_T


def _check_dual_clip(eps_clip_c: float | None) -> None:
    if eps_clip_c is not None and eps_clip_c <= 1:
        raise ValueError(f"`eps_clip_c` must be > 1 for dual-clip PPO, got {eps_clip_c}")


def policy_loss(
    logp_T: torch.Tensor,
    old_logp_T: torch.Tensor,
    advantages_T: torch.Tensor,
    eps_clip: float,
    eps_clip_high: float,
    eps_clip_c: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token PPO clipped loss, with the optional dual clip.

    ``log_ratio = logp - old_logp``, ``ratio = exp(log_ratio)``,
    ``loss = max(-A * ratio, -A * clip(ratio, 1 - eps_clip, 1 + eps_clip_high))``; with ``eps_clip_c`` the loss
    of tokens with ``A < 0`` is further bounded by ``-eps_clip_c * A``. Unmasked: the aggregation applies the mask.

    Non-finite values are neutral, as in the reference: a NaN or infinite log-ratio becomes 0 (ratio 1) and a NaN
    or infinite advantage 0, with no gradient through them (:func:`count_nonfinite` counts such tokens). Finite
    log-ratios are clamped to [-20, 20] so that ``exp`` stays finite.

    Args:
        logp_T (torch.Tensor): ``[T]`` log-probs of the current policy (with grad).
        old_logp_T (torch.Tensor): ``[T]`` log-probs of the policy that generated the data.
        advantages_T (torch.Tensor): ``[T]`` advantages.
        eps_clip (float): lower clip, ratio >= 1 - eps_clip.
        eps_clip_high (float): upper clip, ratio <= 1 + eps_clip_high.
        eps_clip_c (float, Optional): dual-clip constant, > 1. Default: ``None`` (off).

    Returns:
        ``(loss_T, clipfrac_T, ppo_kl_T)``: the loss; 1.0 where the clipped term won (``pg2 > pg1``), else 0.0;
        and ``ppo_kl = old_logp - logp`` after the same treatment as the ratio (``-log_ratio``).
        :func:`dual_clip_mask` gives the tokens that the dual clip bounded.
    """
    _check_dual_clip(eps_clip_c)
    log_ratio_T = _log_ratio(logp_T, old_logp_T)
    advantages_T = _neutral(advantages_T)
    loss_T, pg1_T, pg2_T = _clip_losses(log_ratio_T, advantages_T, eps_clip, eps_clip_high)
    if eps_clip_c is not None:
        loss_T = torch.where(advantages_T < 0, torch.minimum(-eps_clip_c * advantages_T, loss_T), loss_T)
    return loss_T, (pg2_T > pg1_T).float(), -log_ratio_T


def dual_clip_mask(
    logp_T: torch.Tensor,
    old_logp_T: torch.Tensor,
    advantages_T: torch.Tensor,
    eps_clip: float,
    eps_clip_high: float,
    eps_clip_c: float,
) -> torch.Tensor:
    """``[T]`` bool: tokens whose loss :func:`policy_loss` replaced by ``-eps_clip_c * A`` (A < 0 and the
    clipped loss above that bound). Same arguments as :func:`policy_loss`."""
    _check_dual_clip(eps_clip_c)
    advantages_T = _neutral(advantages_T)
    loss_T, _, _ = _clip_losses(_log_ratio(logp_T, old_logp_T), advantages_T, eps_clip, eps_clip_high)
    return (advantages_T < 0) & (loss_T > -eps_clip_c * advantages_T)


def sample_ids(lengths: list[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """``[T]`` index of the sample each token belongs to, for samples of ``lengths`` tokens laid end to end."""
    counts = torch.tensor(lengths, dtype=torch.long, device=device)
    return torch.repeat_interleave(torch.arange(len(lengths), device=device), counts, output_size=sum(lengths))


def _masked(x_T: torch.Tensor, mask_T: torch.Tensor) -> torch.Tensor:
    """``x * mask``, with exact zeros (not NaN) where the mask is 0 and ``x`` is not finite."""
    return torch.where(mask_T != 0, x_T * mask_T, torch.zeros((), dtype=x_T.dtype, device=x_T.device))


def sample_mean_of_token_means(
    x_T: torch.Tensor, mask_T: torch.Tensor, sample_of_T: torch.Tensor, num_samples_global: int
) -> torch.Tensor:
    """``(1 / num_samples_global) * sum_i (sum_t x_t m_t / max(sum_t m_t, 1))`` over the samples ``i`` present.

    Each sample weighs the same whatever its length; a sample with no masked-in token contributes 0. Passing the
    step's global sample count makes the micro-batch values add up to the step's mean over samples.

    Args:
        x_T (torch.Tensor): ``[T]`` per-token values.
        mask_T (torch.Tensor): ``[T]`` loss mask (0/1, any dtype).
        sample_of_T (torch.Tensor): ``[T]`` integer index of each token's sample (see :func:`sample_ids`).
        num_samples_global (int): samples of the whole optimizer step (global batch size).

    Returns:
        Scalar tensor.
    """
    mask_T = mask_T.to(x_T.dtype)
    num_samples = int(sample_of_T.max()) + 1 if sample_of_T.numel() else 0
    sums_S = x_T.new_zeros(num_samples).index_add(0, sample_of_T, _masked(x_T, mask_T))
    counts_S = x_T.new_zeros(num_samples).index_add(0, sample_of_T, mask_T)
    return (sums_S / counts_S.clamp_min(1)).sum() / num_samples_global


def token_mean(x_T: torch.Tensor, mask_T: torch.Tensor, num_tokens_global: int) -> torch.Tensor:
    """``sum_t x_t m_t / max(num_tokens_global, 1)`` (``--calculate-per-token-loss``).

    Args:
        x_T (torch.Tensor): ``[T]`` per-token values.
        mask_T (torch.Tensor): ``[T]`` loss mask.
        num_tokens_global (int): masked-in tokens of the whole optimizer step.

    Returns:
        Scalar tensor.
    """
    return _masked(x_T, mask_T.to(x_T.dtype)).sum() / max(num_tokens_global, 1)


def _kl_estimate(log_ratio_T: torch.Tensor, kind: KLKind) -> torch.Tensor:
    if kind == "k1":
        return log_ratio_T
    if kind == "k2":
        return log_ratio_T.square() / 2
    if kind == "k3":
        u_T = -log_ratio_T
        return u_T.exp() - 1 - u_T
    if kind == "low_var_kl":
        u_T = (-log_ratio_T).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        return (u_T.exp() - 1 - u_T).clamp(-LOW_VAR_KL_CLAMP, LOW_VAR_KL_CLAMP)
    raise ValueError(f"KL estimator {kind!r} is not one of k1, k2, k3, low_var_kl")


def kl_is_finite(logp_T: torch.Tensor, logp_ref_T: torch.Tensor, kind: KLKind) -> torch.Tensor:
    """``[T]`` bool: tokens whose log-ratio and :func:`approx_kl` estimate are finite (elsewhere it is 0).
    Same arguments as :func:`approx_kl`."""
    with torch.no_grad():
        log_ratio_T = logp_T - logp_ref_T
        return torch.isfinite(log_ratio_T) & torch.isfinite(_kl_estimate(log_ratio_T, kind))


def approx_kl(logp_T: torch.Tensor, logp_ref_T: torch.Tensor, kind: KLKind) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the log-probs of the sampled tokens.

    With ``lr = logp - logp_ref``: ``k1 = lr``; ``k2 = lr^2 / 2``; ``k3 = exp(u) - 1 - u`` with ``u = -lr``, no
    clamps; ``low_var_kl`` is k3 with two clamps: ``u`` is clamped to [-20, 20] so that ``exp(u)`` stays finite,
    and the estimate to [-10, 10] (it is never negative, so in effect at most 10).

    Where the log-ratio or the estimate is not finite (a NaN or infinite log-prob, or k3's ``exp`` overflowing)
    the estimate is 0, as the reference's ``nan_to_num`` makes it, with no gradient through that token
    (:func:`kl_is_finite` marks them).

    Args:
        logp_T (torch.Tensor): ``[T]`` log-probs of the policy.
        logp_ref_T (torch.Tensor): ``[T]`` log-probs of the reference model.
        kind (str): ``k1``, ``k2``, ``k3`` or ``low_var_kl``.

    Returns:
        ``[T]`` estimate.
    """
    finite_T = kl_is_finite(logp_T, logp_ref_T, kind)
    log_ratio_T = logp_T - logp_ref_T
    return _kl_estimate(torch.where(finite_T, log_ratio_T, torch.zeros_like(log_ratio_T)), kind)


def tis_weights(
    old_logp_T: torch.Tensor, rollout_logp_T: torch.Tensor, clip_low: float = 0.0, clip_high: float = 2.0
) -> torch.Tensor:
    """Truncated importance-sampling weights ``clamp(exp(old_logp - rollout_logp), clip_low, clip_high)``.

    They correct for the engine's sampling distribution differing from the trainer's: the token loss is
    multiplied by them. A NaN or infinite log-ratio gives the neutral weight 1.

    Args:
        old_logp_T (torch.Tensor): ``[T]`` trainer log-probs of the data-generating policy.
        rollout_logp_T (torch.Tensor): ``[T]`` the engine's log-probs of the same tokens.
        clip_low (float): lower clamp. Default: ``0.0``.
        clip_high (float): upper clamp. Default: ``2.0``.

    Returns:
        ``[T]`` weights (mean them with the loss's aggregation for the ``tis`` metric).
    """
    return _neutral(old_logp_T - rollout_logp_T).exp().clamp(clip_low, clip_high)


def tis_clip_mask(
    old_logp_T: torch.Tensor, rollout_logp_T: torch.Tensor, clip_low: float = 0.0, clip_high: float = 2.0
) -> torch.Tensor:
    """``[T]`` bool: tokens whose importance weight :func:`tis_weights` clamped (the ``tis_clipfrac`` metric)."""
    w_T = _neutral(old_logp_T - rollout_logp_T).exp()
    return (w_T < clip_low) | (w_T > clip_high)


def ess_ratio(ppo_kl_T: torch.Tensor, mask_T: torch.Tensor, sample_of_T: torch.Tensor) -> torch.Tensor:
    """Effective-sample-size ratio per sample, ``(sum w)^2 / (n * sum w^2)`` over its masked-in tokens.

    ``w = exp(-ppo_kl)`` is the policy ratio (``ppo_kl`` as :func:`policy_loss` returns it, already clamped).
    1 means all weights are equal; a sample with no masked-in token gets 1.

    Args:
        ppo_kl_T (torch.Tensor): ``[T]`` ``old_logp - logp`` per token.
        mask_T (torch.Tensor): ``[T]`` loss mask.
        sample_of_T (torch.Tensor): ``[T]`` sample of each token.

    Returns:
        ``[S]`` ratios in (0, 1].
    """
    mask_T = mask_T.to(ppo_kl_T.dtype)
    w_T = _masked((-ppo_kl_T).exp(), mask_T)
    num_samples = int(sample_of_T.max()) + 1 if sample_of_T.numel() else 0

    def per_sample(v_T: torch.Tensor) -> torch.Tensor:
        return ppo_kl_T.new_zeros(num_samples).index_add(0, sample_of_T, v_T)

    n_S, sum_S, sq_S = per_sample(mask_T), per_sample(w_T), per_sample(w_T.square())
    return torch.where(n_S > 0, sum_S.square() / (n_S * sq_S).clamp_min(torch.finfo(sq_S.dtype).tiny), 1.0)


def mtp_labels_and_mask(
    tokens_T: torch.Tensor, loss_mask_T: torch.Tensor, cu_seqlens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs, labels and mask of the MTP head (one depth) on a packed batch.

    Row ``t`` of a sequence pairs the trunk hidden state ``h_t`` with ``next_tokens[t] = tokens[t + 1]`` and
    predicts ``labels[t] = tokens[t + 2]``. ``mask[t]`` is 1 iff token ``t + 2`` exists in the same sequence
    and is a trained response token (``loss_mask_T[t + 2] == 1``). Rows past the end of their sequence get
    token 0 and mask 0; positions at or after ``cu_seqlens[-1]`` (padding) belong to no sequence.

    The reference system rolls a mask that is already next-token aligned (position ``p`` is 1 iff token
    ``p + 1`` is trained) twice more, so its row ``t`` is trained iff token ``t + 3`` is: it trains on the
    label at the last prompt position and skips the last response token. Here the mask is aligned with the
    label.

    Args:
        tokens_T (torch.Tensor): ``[T]`` packed token ids.
        loss_mask_T (torch.Tensor): ``[T]`` token-aligned mask: 1 at position ``p`` iff token ``p`` is a trained
            response token (0 on prompts).
        cu_seqlens (torch.Tensor): ``[N + 1]`` sequence offsets, ``cu_seqlens[0] == 0``.

    Returns:
        ``(next_tokens_T, labels_T, mask_T)``: long, long, and ``mask`` in the dtype of ``loss_mask_T``.
    """
    num_tokens = tokens_T.numel()
    pos_T = torch.arange(num_tokens, device=tokens_T.device, dtype=cu_seqlens.dtype)
    seq_T = torch.searchsorted(cu_seqlens, pos_T, right=True)
    end_T = cu_seqlens[seq_T.clamp(max=cu_seqlens.numel() - 1)]

    def shifted(x_T: torch.Tensor, k: int) -> torch.Tensor:
        valid_T = pos_T + k < end_T
        source_T = (pos_T + k).clamp(max=max(num_tokens - 1, 0))
        return torch.where(valid_T, x_T[source_T], torch.zeros((), dtype=x_T.dtype, device=x_T.device))

    return shifted(tokens_T, 1), shifted(tokens_T, 2), shifted(loss_mask_T, 2)


def mtp_loss(logprobs_T: torch.Tensor, mask_T: torch.Tensor, num_tokens_global: int | None = None) -> torch.Tensor:
    """``-sum_t m_t logp_t / max(N, 1)``: the masked mean cross-entropy of the MTP head, from the fp32 log-probs of
    its labels over the whole vocabulary (``token_logprobs`` of its logits, or the fused head's). ``N`` is
    ``num_tokens_global``, the masked-in tokens of the whole optimizer step (so that micro-batches, and ranks, add up
    to the step's token mean whatever the packing), or this call's own ``sum_t m_t``.

    Args:
        logprobs_T (torch.Tensor): ``[T]`` log-probs of the labels.
        mask_T (torch.Tensor): ``[T]`` 0/1 mask.
        num_tokens_global (int, Optional): the denominator. Default: ``None`` (this mask's token count).

    Returns:
        fp32 scalar.
    """
    ce_T = -logprobs_T.float()
    mask_T = mask_T.to(ce_T.dtype)
    count = mask_T.sum().clamp_min(1) if num_tokens_global is None else max(num_tokens_global, 1)
    return _masked(ce_T, mask_T).sum() / count
