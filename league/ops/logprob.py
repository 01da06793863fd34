"""Log-probabilities and entropy from logits, in fp32 over the whole vocabulary.

This one function serves the engine (log-prob of a sampled token) and the trainer (log-prob of a
trained token), so both compute a token's log-probability the same way.

Legend: T rows, V vocabulary.
"""

import torch


def token_logprobs(logits_TV: torch.Tensor, tokens_T: torch.Tensor, chunk_size: int = 4096) -> torch.Tensor:
    """``log_softmax(float(logits))[t, tokens[t]]`` for each row, ``chunk_size`` rows at a time.

    Args:
        logits_TV (torch.Tensor): ``[T, V]`` raw logits (any float dtype).
        tokens_T (torch.Tensor): ``[T]`` token ids.
        chunk_size (int): rows converted to fp32 at once. Default: ``4096``.

    Returns:
        ``[T]`` fp32.
    """
    out = []
    for start in range(0, logits_TV.shape[0], chunk_size):
        rows = logits_TV[start : start + chunk_size].float()
        picked = rows.gather(-1, tokens_T[start : start + chunk_size, None])[:, 0]
        out.append(picked - rows.logsumexp(-1))
    return torch.cat(out) if out else logits_TV.new_zeros(0, dtype=torch.float32)


def entropy(logits_TV: torch.Tensor, chunk_size: int = 4096) -> torch.Tensor:
    """``logsumexp(z) - sum softmax(z) z`` per row, fp32, ``[T]``."""
    out = []
    for start in range(0, logits_TV.shape[0], chunk_size):
        z = logits_TV[start : start + chunk_size].float()
        out.append(z.logsumexp(-1) - (z.softmax(-1) * z).sum(-1))
    return torch.cat(out) if out else logits_TV.new_zeros(0, dtype=torch.float32)
