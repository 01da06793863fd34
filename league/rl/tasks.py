"""Built-in verifiable tasks for the embedded default run: generated problems with exact answers of
several tokens, and a short supervised warm-up on the answer format.

Their reward is ``exact`` (``rl.rewards.exact``). Not responsible for file datasets (``rl.data``).
"""

import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from league.models.qwen3_5_moe import ForwardBatch, Transformer

TASKS = ("add", "reverse")


@dataclass(frozen=True, slots=True)
class Problem:
    question: str
    answer: str


def make_problems(task: str, num: int, seed: int) -> list[Problem]:
    """``num`` distinct problems of ``task``, in a fixed order for a given seed.

    ``add``: ``a+b=`` with a, b in [0, 10); the answer (1 or 2 digits, then EOS) is the sum.
    ``reverse``: ``abc=`` with 3 letters from a..f; the answer (3 letters, then EOS) is the reverse.
    """
    if task not in TASKS:
        raise ValueError(f"unknown built-in task {task!r}; expected one of {TASKS}")
    rng = random.Random(seed)
    if task == "add":
        problems = [Problem(question=f"{a}+{b}=", answer=str(a + b)) for a in range(10) for b in range(10)]
    else:
        words = ["".join(w) for w in itertools.product("abcdef", repeat=3)]
        problems = [Problem(question=f"{w}=", answer=w[::-1]) for w in words]
    rng.shuffle(problems)
    if num > len(problems):
        raise ValueError(f"task {task!r} has {len(problems)} distinct problems, asked for {num}")
    return problems[:num]


def supervised_warmup(
    model: Transformer,
    examples: list[tuple[list[int], list[int]]],
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    label_smoothing: float = 0.0,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """A few steps of next-token cross-entropy on (prompt, answer) pairs, on the answer tokens only.

    Each step draws ``batch_size`` examples with replacement. The MTP head trains alongside (its loss reaches
    only its parameters).

    Args:
        model (Transformer): trained in place; left in eval mode.
        examples (list[tuple[list[int], list[int]]]): (prompt ids, answer ids ending with EOS) pairs.
        steps (int): optimizer steps.
        lr (float): AdamW learning rate (constant, no weight decay).
        batch_size (int): examples per step.
        seed (int): seed of the draws.
        label_smoothing (float): of the policy's loss (not the MTP head's). Default: ``0.0``.
        on_step (Callable[[int, float], None], Optional): called after each step with its index and loss.
            Default: ``None``.

    Returns:
        The loss of each step.
    """
    gen = random.Random(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    model.train()
    for step in range(steps):
        batch = [examples[gen.randrange(len(examples))] for _ in range(batch_size)]
        seqs = [p + a for p, a in batch]
        tokens = torch.tensor([t for s in seqs for t in s])
        fb = ForwardBatch.training([len(s) for s in seqs])
        hidden = model(tokens, fb)
        rows, labels, mtp_rows, mtp_labels = [], [], [], []
        offset = 0
        for p, a in batch:
            for j in range(len(a)):
                rows.append(offset + len(p) + j - 1)
                labels.append(a[j])
                if j + 1 < len(a):
                    mtp_rows.append(offset + len(p) + j - 1)
                    mtp_labels.append(a[j + 1])
            offset += len(p) + len(a)
        loss = F.cross_entropy(
            model.logits(hidden[rows]).float(), torch.tensor(labels), label_smoothing=label_smoothing
        )
        if model.mtp is not None and mtp_rows:
            next_tokens = torch.roll(tokens, -1)
            mtp_hidden = model.mtp_forward(hidden, next_tokens, fb, detach_trunk=True)
            mtp_logits = model.mtp_logits(mtp_hidden[mtp_rows], detach_head=True)
            loss = loss + F.cross_entropy(mtp_logits.float(), torch.tensor(mtp_labels))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
    model.eval()
    return losses
