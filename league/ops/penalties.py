"""Sampling penalties on logits: a logit bias, repetition, frequency and presence penalties, and the ban on stop tokens
before ``min_new_tokens`` (SGLang's ``sampling_params`` and the OpenAI API).

Pure functions of tensors, applied to the rows of requests that ask for them, before their draws (plain sampling,
greedy argmax, and the target distribution of speculative acceptance alike). Not responsible for the log-probs a
request reports (those are of the raw logits) nor for deciding which rows are penalized.

Legend: R rows, V vocabulary, L token ids of a row (padded with -1).
"""

import torch


def token_counts(ids_RL: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``[R, V]`` fp32: how many times each token occurs in each row of ``ids_RL`` (entries < 0 are padding)."""
    counts = torch.zeros(ids_RL.shape[0], vocab_size + 1, dtype=torch.float32, device=ids_RL.device)
    index = torch.where(ids_RL >= 0, ids_RL, vocab_size)
    counts.scatter_add_(1, index, torch.ones_like(index, dtype=torch.float32))
    return counts[:, :vocab_size]


def penalize(
    logits_RV: torch.Tensor,
    output_counts_RV: torch.Tensor,
    seen_RV: torch.Tensor,
    banned_RV: torch.Tensor,
    frequency_R: torch.Tensor,
    presence_R: torch.Tensor,
    repetition_R: torch.Tensor,
    bias_RV: torch.Tensor | None = None,
) -> torch.Tensor:
    """Penalized fp32 logits: the logit bias added, then, in vLLM's order, the repetition penalty (a seen token's
    logit ``l`` becomes ``l / r`` if ``l > 0``, else ``l * r``) and ``- frequency * count - presence * (count > 0)``
    over the output tokens; last, ``-inf`` for banned tokens.

    Args:
        logits_RV (torch.Tensor): ``[R, V]`` raw logits, any float dtype.
        output_counts_RV (torch.Tensor): ``[R, V]`` fp32 occurrences of each token in the row's output so far.
        seen_RV (torch.Tensor): ``[R, V]`` bool: tokens in the row's prompt or output (for the repetition penalty).
        banned_RV (torch.Tensor): ``[R, V]`` bool: tokens that may not be drawn (stop tokens before min_new_tokens).
        frequency_R, presence_R, repetition_R (torch.Tensor): ``[R]`` fp32 penalties (0, 0 and 1 are off).
        bias_RV (torch.Tensor, Optional): ``[R, V]`` fp32 added to the logits. Default: ``None`` (none).

    Returns:
        ``[R, V]`` fp32 logits.
    """
    logits = logits_RV.float() if bias_RV is None else logits_RV.float() + bias_RV
    repetition = repetition_R[:, None]
    logits = torch.where(seen_RV, torch.where(logits > 0, logits / repetition, logits * repetition), logits)
    logits = logits - frequency_R[:, None] * output_counts_RV - presence_R[:, None] * (output_counts_RV > 0)
    return logits.masked_fill(banned_RV, float("-inf"))
