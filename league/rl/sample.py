"""One generated response and everything the RL step needs to know about it.

Log-prob convention: ``rollout_logprobs[j]`` is the log-probability of ``response_ids[j]`` given the prompt and
``response_ids[:j]``. Once prompt and response are laid end to end (``prompt_ids + response_ids``), the logits that
predict response token ``j`` sit at position ``len(prompt_ids) + j - 1``: the logits at position ``p`` predict
the token at ``p + 1``.

Not responsible for generating, rewarding, normalising rewards or packing samples into batches.
"""

from dataclasses import dataclass, field
from typing import Any

import torch

STATUSES = ("completed", "truncated", "aborted")


@dataclass(kw_only=True, slots=True)
class Sample:
    """One response to one prompt.

    Args:
        prompt_ids (list[int]): prompt token ids (at least one).
        response_ids (list[int]): generated token ids.
        rollout_logprobs (list[float]): the engine's log-prob of each response token (same length).
        reward (float): the reward function's score. Default: ``0.0``.
        advantage (float): the group-normalised reward, broadcast to every response token. Default: ``0.0``.
        loss_mask (list[int], Optional): 1 for response tokens that are trained, 0 for the others
            (same length as ``response_ids``). Default: all ones.
        status (str): ``completed`` (stop token or string), ``truncated`` (length limit) or ``aborted``.
            Default: ``"completed"``.
        group_index (int): index of the prompt group (samples of one prompt share it). Default: ``0``.
        index (int): index of the sample in its rollout. Default: ``0``.
        label (str, Optional): the reference answer given to the reward function. Default: ``None``.
        metadata (dict): anything the dataset row carried along. Default: empty.
        spec_stats (dict[str, int]): speculative-decoding counters of this response (``draft_tokens``,
            ``accepted_tokens``, ``verify_steps``). Default: empty.
        routed_experts (torch.Tensor, Optional): int32 ``[num_tokens - 1, layers, top_k]``, the experts the rollout's
            MoE layers chose at each position but the last (routing replay). Default: None.
    """

    prompt_ids: list[int]
    response_ids: list[int]
    rollout_logprobs: list[float]
    reward: float = 0.0
    advantage: float = 0.0
    loss_mask: list[int] | None = None
    status: str = "completed"
    group_index: int = 0
    index: int = 0
    label: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    spec_stats: dict[str, int] = field(default_factory=dict)
    routed_experts: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError(f"sample {self.index}: `prompt_ids` is empty; a prompt needs at least one token")
        if self.status not in STATUSES:
            raise ValueError(f"sample {self.index}: `status` {self.status!r} is not one of {STATUSES}")
        num = len(self.response_ids)
        if len(self.rollout_logprobs) != num:
            raise ValueError(
                f"sample {self.index}: {len(self.rollout_logprobs)} `rollout_logprobs` for {num} response tokens"
            )
        if self.loss_mask is not None and len(self.loss_mask) != num:
            raise ValueError(f"sample {self.index}: `loss_mask` has {len(self.loss_mask)} entries for {num} tokens")
        rows = len(self.prompt_ids) + num - 1
        if self.routed_experts is not None and (self.routed_experts.dim() != 3 or len(self.routed_experts) != rows):
            raise ValueError(
                f"sample {self.index}: `routed_experts` has shape {list(self.routed_experts.shape)}; expected "
                f"[{rows}, layers, top_k] (every position but the last)"
            )

    @property
    def num_tokens(self) -> int:
        """Prompt plus response tokens."""
        return len(self.prompt_ids) + len(self.response_ids)

    @property
    def response_loss_mask(self) -> list[int]:
        """``loss_mask``, or all ones over the response when it is ``None``."""
        return self.loss_mask if self.loss_mask is not None else [1] * len(self.response_ids)
