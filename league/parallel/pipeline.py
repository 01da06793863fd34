"""Pipeline parallelism: the policy's layers split into consecutive stages, one per rank of a pipeline, run by
torch.distributed.pipelining's 1F1B schedule.

A stage is the policy with every part it does not own removed (the model code does not change; parameter names keep
their layer numbers, so checkpoints and weight syncs see the same names at any layout):

- stage 0 owns the token embedding; the last stage owns the final norm, the output head and the MTP head, which reads
  the embedding of the next tokens: the last stage keeps a copy of the embedding's values (a buffer, refreshed from
  stage 0 after each optimizer step by :meth:`Pipeline.refresh_embedding`). The MTP loss reaches only MTP parameters,
  so the copy needs no gradient. A policy whose output head is its embedding (tied) is refused.
- stage s owns the decoder layers :func:`stage_layers` gives it (the earlier stages take the extra layers; the
  last already runs the heads).

Every stage of a pipeline holds the same samples. pipelining sends activations of one shape, so each optimizer
step's micro-batches are padded to the step's longest: the padding is one more sequence of pad tokens, which no
real token attends to and the loss never reads. The loss of a micro-batch is computed on the last stage from its
final hidden states by a function the trainer gives (``on_hidden``), the same that one process runs.

Not responsible for what the loss is (the trainer), nor for sharding a stage's weights (``parallelize``).
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B

from league.models.qwen3_5_moe import ForwardBatch, ModelArgs, Transformer
from league.ops.linear import linear
from league.ops.numerics import FAST, Numerics

T = TypeVar("T")


def stage_layers(num_layers: int, num_stages: int, stage: int) -> range:
    """The decoder layers of ``stage``: consecutive runs of ``num_layers // num_stages`` layers, one more for each
    of the first ``num_layers % num_stages`` stages."""
    base, extra = divmod(num_layers, num_stages)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (stage < extra))


def check_pipeline_split(args: ModelArgs, num_stages: int) -> None:
    """A clear error when the policy does not split into ``num_stages`` pipeline stages."""
    if args.num_layers < num_stages:
        raise ValueError(
            f"`--pp` {num_stages} exceeds the policy's {args.num_layers} decoder layers: every stage needs at least "
            "one; choose at most that many stages"
        )
    if args.tie_word_embeddings:
        raise ValueError(
            f"`--pp` {num_stages}: the policy's output head is its token embedding (tie_word_embeddings), which "
            "would live on the first and the last stage at once; train it without pipeline parallelism"
        )


@dataclass(frozen=True, slots=True)
class StageInput:
    """One micro-batch as a stage runs it: the tokens padded to the step's length (stage 0 reads them), the batch
    of the padded tokens and the number of real tokens (the rows the loss reads)."""

    tokens_T: torch.Tensor
    batch: ForwardBatch
    num_real: int


def padded_input(tokens_T: torch.Tensor, batch: ForwardBatch, length: int) -> StageInput:
    """``tokens_T`` padded with token 0 to ``length``, the pad being one more sequence of ``batch``."""
    pad = length - tokens_T.shape[0]
    if pad < 0:
        raise ValueError(f"a micro-batch of {tokens_T.shape[0]} tokens does not fit the step's {length}")
    if pad:
        tokens_T = F.pad(tokens_T, (0, pad))
        batch = ForwardBatch.training([*batch.seq_lens, pad], tokens_T.device, batch.numerics)
    return StageInput(tokens_T, batch, length - pad)


class Stage(nn.Module):
    """The part of the policy one pipeline stage owns (``model``, pruned in place), run one micro-batch at a time.

    ``forward(x, index)``: ``x`` is ``[1, T]`` token ids (stage 0) or ``[1, T, D]`` hidden states from the stage
    before; ``index`` ``[1]`` is the micro-batch's number in :attr:`inputs`. A stage other than the last returns its
    hidden states ``[1, T, D]``; the last applies the final norm and returns ``on_hidden(index, hidden [T_real, D])``
    as a ``[1]`` tensor (the micro-batch's loss, or a placeholder when only log-probs are wanted).

    The last stage also stands in for the policy in the trainer's loss (:meth:`output_weight`, :meth:`logits`,
    :meth:`mtp_forward`, :meth:`mtp_logits`: the methods of ``Transformer`` the loss calls).
    """

    def __init__(self, model: Transformer, stage: int, num_stages: int):
        super().__init__()
        check_pipeline_split(model.args, num_stages)
        self.first, self.last = stage == 0, stage == num_stages - 1
        self.layer_ids = stage_layers(len(model.layers), num_stages, stage)
        for i in range(len(model.layers)):
            if i not in self.layer_ids:
                model.layers._modules[str(i)] = None  # noqa: SLF001 (keeps the other layers' numbers and names)
        if self.last and model.mtp is not None:
            self.register_buffer("mtp_embedding", model.tok_embeddings.weight.detach().clone(), persistent=False)
        if not self.first:
            model.tok_embeddings = None
        if not self.last:
            model.norm = model.output = model.mtp = None
        self.model = model
        self.inputs: list[StageInput] = []
        self.on_hidden: Callable[[int, torch.Tensor], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        k = int(index[0])
        step = self.inputs[k]
        x_TD = self.model.tok_embeddings(x[0]) if self.first else x[0]
        rope = self.model.rope(step.batch.positions)
        x_TD = self.model.forward_layers(x_TD, step.batch, rope, None, self.layer_ids)
        if not self.last:
            return x_TD[None]
        hidden_TD = self.model.norm(x_TD)[: step.num_real]
        return self.on_hidden(k, hidden_TD).reshape(1)

    def output_weight(self) -> torch.Tensor:
        return self.model.output_weight()

    def logits(self, hidden_TD: torch.Tensor, numerics: Numerics = FAST) -> torch.Tensor:
        return self.model.logits(hidden_TD, numerics)

    def mtp_forward(
        self, hidden_TD: torch.Tensor, next_tokens_T: torch.Tensor, batch: ForwardBatch, detach_trunk: bool = True
    ) -> torch.Tensor:
        """``Transformer.mtp_forward`` with the embedding's copy (no gradient reaches the trunk: ``detach_trunk``
        must be true)."""
        if not detach_trunk:
            raise ValueError("a pipeline stage's MTP head trains on detached trunk inputs only")
        embeds_TD = F.embedding(next_tokens_T, self.mtp_embedding)
        return self.model.mtp(embeds_TD, hidden_TD.detach(), batch, self.model.rope(batch.positions), None)

    def mtp_logits(
        self, mtp_hidden_TD: torch.Tensor, detach_head: bool = False, numerics: Numerics = FAST
    ) -> torch.Tensor:
        weight = self.output_weight()
        return linear(mtp_hidden_TD, weight.detach() if detach_head else weight, numerics.plain_gemm())


class Pipeline:
    """This rank's stage of a pipeline and how the micro-batches of a step run through the pipeline's ranks.

    Args:
        stage_module (Stage): this rank's stage (its weights sharded over the stage's ranks, or not).
        stage (int), num_stages (int): this rank's stage and the pipeline's length.
        group (ProcessGroup): the pipeline's ranks, stage 0 first.
    """

    def __init__(self, stage_module: Stage, stage: int, num_stages: int, group: dist.ProcessGroup):
        self.module, self.stage, self.num_stages, self.group = stage_module, stage, num_stages, group
        self.first, self.last = stage_module.first, stage_module.last

    @property
    def device(self) -> torch.device:
        return self.module.model.inv_freq.device

    def run(
        self,
        micro: list[tuple[torch.Tensor, ForwardBatch]],
        on_hidden: Callable[[int, torch.Tensor], torch.Tensor],
        backward: bool,
    ) -> None:
        """Run the micro-batches ``(tokens_T, batch)`` through the pipeline (every stage calls it with the same
        micro-batches): 1F1B forwards and backwards, or forwards only. On the last stage ``on_hidden(k, hidden)``
        is called with each micro-batch's final hidden states and returns the loss whose backward the schedule
        runs (or, without backward, anything: its value is dropped)."""
        n, length = len(micro), max(tokens.shape[0] for tokens, _ in micro)
        self.module.inputs = [padded_input(tokens, batch, length) for tokens, batch in micro]
        self.module.on_hidden = on_hidden
        dtype = next(self.module.parameters()).dtype
        # the shapes each stage receives and sends (the hidden states carry gradients back)
        hidden = torch.empty(1, length, self.module.model.args.dim, dtype=dtype, device="meta")
        hidden.requires_grad_(backward)
        tokens = torch.empty(1, length, dtype=torch.long, device="meta")
        loss = torch.empty(1, dtype=torch.float32, device="meta")
        stage = PipelineStage(
            self.module,
            self.stage,
            self.num_stages,
            self.device,
            input_args=tokens if self.first else hidden,
            output_args=loss if self.last else hidden,
            group=self.group,
        )
        # the losses are already divided by the step's global counts: no scaling by the number of micro-batches
        schedule = Schedule1F1B(stage, n, loss_fn=_sum if backward else None, scale_grads=False)
        args = (torch.stack([s.tokens_T for s in self.module.inputs]),) if self.first else ()
        index = torch.arange(n, device=self.device)
        target = torch.zeros(n, device=self.device) if self.last and backward else None
        try:
            if backward:
                schedule.step(*args, target=target, index=index, return_outputs=False)
            else:
                schedule.eval(*args, index=index)
        finally:
            self.module.inputs, self.module.on_hidden = [], None

    def from_last_stage(self, value: T) -> T:
        """The last stage's ``value`` (any picklable object) on every stage of the pipeline."""
        box = [value]
        dist.broadcast_object_list(box, group_src=self.num_stages - 1, group=self.group)
        return box[0]

    @torch.no_grad()
    def refresh_embedding(self) -> None:
        """Copy stage 0's token embedding (gathered whole from its shards) into the last stage's copy: after each
        optimizer step, so the MTP head reads the embedding the policy has. Every stage of the pipeline calls it."""
        if self.module.model.args.mtp_num_layers == 0 or not (self.first or self.last):
            return
        if self.first:
            weight = self.module.model.tok_embeddings.weight
            whole = weight.full_tensor() if hasattr(weight, "full_tensor") else weight.detach()
            dist.send(whole.contiguous(), group_dst=self.num_stages - 1, group=self.group)
        else:
            dist.recv(self.module.mtp_embedding, group_src=0, group=self.group)


def _sum(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The schedule's loss: the last stage's output is the micro-batch's loss already."""
    return output.sum()
