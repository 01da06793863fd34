"""The policy update: log-prob passes and the train step on packed micro-batches.

One optimizer step consumes ``global_batch_size`` samples, packed into micro-batches of at most
``max_tokens_per_gpu`` tokens whose gradients accumulate. The loss is the clipped policy loss (plus the
KL and entropy terms when their coefficients are non-zero) aggregated as the mean over samples of each
sample's token mean, plus the MTP loss, which reaches only the MTP head's parameters. Not responsible for
generating, rewarding, or checkpoint files.

Legend: T packed tokens, R response tokens of a micro-batch, V vocabulary.
"""

import copy
from dataclasses import dataclass

import torch
import torch.distributed as dist

from league.checks import check_int, check_number
from league.models.qwen3_5_moe import ForwardBatch, Transformer
from league.ops.logprob import entropy, linear_token_logprobs, linear_token_logprobs_entropy, token_logprobs
from league.ops.numerics import FAST, Numerics
from league.parallel.recompute import Recompute
from league.rl import algorithms as algo
from league.rl.batching import PackedBatch, pack_by_token_budget, pack_samples
from league.rl.optim import OptimConfig, Optimizer, lr_at
from league.rl.sample import Sample

COUNTS = ("train/nonfinite_logprob_tokens", "train/nonfinite_kl_tokens")
"""Metrics that are token counts: summed over a rollout's optimizer steps, where the others are averaged."""


@dataclass(kw_only=True, slots=True)
class AlgorithmConfig:
    """The RL objective (flag names as the reference system's)."""

    advantage_estimator: str = "grpo"
    """``grpo`` (group-normalised rewards broadcast to every response token)."""
    disable_grpo_std_normalization: bool = False
    """Only subtract the group mean (Dr. GRPO)."""
    eps_clip: float = 0.2
    """Lower clip of the ratio: 1 - eps_clip."""
    eps_clip_high: float | None = None
    """Upper clip of the ratio: 1 + eps_clip_high (default: eps_clip)."""
    eps_clip_c: float | None = None
    """Dual-clip constant (> 1) bounding the loss of negative-advantage tokens; None disables."""
    use_kl_loss: bool = False
    """Keep a frozen reference model and compute the KL to it (logged; added when kl_loss_coef != 0)."""
    kl_loss_coef: float = 0.0
    """Weight of the KL loss."""
    kl_loss_type: str = "low_var_kl"
    """KL estimator: k1, k2, k3 or low_var_kl."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus (entropy is computed only when != 0)."""
    use_tis: bool = False
    """Truncated importance sampling: weight each token by clamp(exp(logp_old - logp_rollout), low, high)."""
    tis_clip: float = 2.0
    """Upper clamp of the TIS weight."""
    tis_clip_low: float = 0.0
    """Lower clamp of the TIS weight."""
    calculate_per_token_loss: bool = False
    """Average the loss over all tokens of the step instead of per-sample token means."""
    enable_mtp_training: bool = False
    """Train the MTP head alongside the policy (its loss reaches only MTP parameters)."""
    mtp_loss_scaling_factor: float = 0.2
    """Weight of the MTP loss."""
    use_rollout_routing_replay: bool = False
    """Routing replay (R3): every forward of the trainer routes each token to the experts the rollout chose for it
    (the router's probabilities of them still weight the experts and get the gradient), so training and rollout
    agree on the experts. The engine keeps its routing for this (``--enable-return-routed-experts``, implied)."""

    def __post_init__(self) -> None:
        if self.advantage_estimator != "grpo":
            raise ValueError(f"`--advantage-estimator` {self.advantage_estimator!r} is not supported (expected grpo)")
        if self.kl_loss_type not in ("k1", "k2", "k3", "low_var_kl"):
            raise ValueError(f"`--kl-loss-type` {self.kl_loss_type!r}: expected k1, k2, k3 or low_var_kl")
        check_number("--eps-clip", self.eps_clip, 0)
        if self.eps_clip_high is not None:
            check_number("--eps-clip-high", self.eps_clip_high, 0)
        if self.eps_clip_c is not None:
            check_number("--eps-clip-c", self.eps_clip_c, 1, low_open=True)
        check_number("--kl-loss-coef", self.kl_loss_coef, 0)
        check_number("--entropy-coef", self.entropy_coef)
        check_number("--tis-clip", self.tis_clip, 0, low_open=True)
        check_number("--tis-clip-low", self.tis_clip_low, 0, self.tis_clip)
        check_number("--mtp-loss-scaling-factor", self.mtp_loss_scaling_factor, 0)
        if self.kl_loss_coef != 0 and not self.use_kl_loss:
            raise ValueError("`--kl-loss-coef` is non-zero but `--use-kl-loss` is off")


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """Batching of the policy update."""

    global_batch_size: int = 16
    """Samples per optimizer step."""
    max_tokens_per_gpu: int = 8192
    """Token budget of one micro-batch (dynamic batching)."""
    log_probs_max_tokens_per_gpu: int | None = None
    """Token budget of the forward-only log-prob passes (default: max_tokens_per_gpu)."""
    recompute: bool = True
    """Activation recompute as the three options below say (``--no-recompute`` keeps every activation)."""
    recompute_granularity: str = "full"
    """``full`` (whole decoder layers) or ``selective`` (each layer's attention / GDN mixer only)."""
    recompute_method: str = "uniform"
    """With ``full``: ``uniform`` (runs of ``recompute_num_layers`` layers, each recomputed as a unit) or ``block``
    (the first ``recompute_num_layers`` layers of each rank's part)."""
    recompute_num_layers: int = 1
    """Layers per unit (uniform; 1: every layer its own) or layers recomputed (block)."""

    @property
    def recompute_policy(self) -> "Recompute | None":
        """The recompute to apply, or None (``--no-recompute``)."""
        if not self.recompute:
            return None
        return Recompute(self.recompute_granularity, self.recompute_method, self.recompute_num_layers)

    def __post_init__(self) -> None:
        Recompute(self.recompute_granularity, self.recompute_method, self.recompute_num_layers)
        for name in ("global_batch_size", "max_tokens_per_gpu", "log_probs_max_tokens_per_gpu"):
            if getattr(self, name) is not None:
                check_int(f"--{name.replace('_', '-')}", getattr(self, name), 1)


@dataclass(frozen=True, slots=True)
class StepCounts:
    """An optimizer step's global counts (over its data-parallel ranks), which divide its loss terms: samples,
    response tokens in the loss, and MTP tokens."""

    samples: int
    tokens: int
    mtp_tokens: int


@dataclass(kw_only=True, slots=True)
class MicroBatch:
    """Some samples packed end to end, with their positions in the list they were cut from."""

    packed: PackedBatch
    batch: ForwardBatch
    indices: list[int]


def response_logprobs(
    model: Transformer, mb: MicroBatch, temperature: float = 1.0, hidden_TD: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of the response tokens ``[R]`` (fp32) and the trunk hidden states ``[T, D]``.

    The output head is fused into the log-prob (no ``[R, V]`` logits held) unless the batch's numerics are row by row,
    where the log-probs must equal the engine's bitwise and so take the engine's own path.
    """
    if hidden_TD is None:
        hidden_TD = model(mb.packed.tokens_T, mb.batch)
    if not mb.batch.numerics.row_by_row:
        hidden_RD = hidden_TD[mb.packed.logit_index_R]
        logp_R = linear_token_logprobs(hidden_RD, model.output_weight(), mb.packed.response_tokens_R, temperature)
        return logp_R, hidden_TD
    logits_RV = model.logits(hidden_TD[mb.packed.logit_index_R], mb.batch.numerics)
    if temperature != 1.0:
        logits_RV = logits_RV / temperature
    return token_logprobs(logits_RV, mb.packed.response_tokens_R), hidden_TD


def response_entropy(model: Transformer, mb: MicroBatch, hidden_TD: torch.Tensor, temperature: float) -> torch.Tensor:
    """Entropy ``[R]`` (fp32) of the tempered distribution at each response position; the output head is fused in
    (no ``[R, V]`` logits held) unless the batch's numerics are row by row."""
    hidden_RD = hidden_TD[mb.packed.logit_index_R]
    if not mb.batch.numerics.row_by_row:
        weight = model.output_weight()
        return linear_token_logprobs_entropy(hidden_RD, weight, mb.packed.response_tokens_R, temperature)[1]
    return entropy(model.logits(hidden_RD, mb.batch.numerics) / temperature)


class Trainer:
    """Owns the optimizer and (when a KL term needs it) a frozen reference copy of the policy.

    Args:
        model (Transformer): the policy, trained in place (the engine reads the same parameters).
        train (TrainConfig), algo_config (AlgorithmConfig), optim (OptimConfig): settings.
        total_steps (int): optimizer steps of the run (for LR decay).
        temperature (float): rollout temperature; log-probs use logits / temperature. Default: ``1.0``.
        numerics (Numerics): how forwards compute (``ops.numerics``), as the engine that samples computes.
            Default: ``FAST``.
        group (ProcessGroup, Optional): the data-parallel ranks that share each optimizer step (each holding an equal
            share of its samples); losses are normalised by the step's global counts and the metrics are the step's.
            Default: ``None`` (one process).
        shard_group (ProcessGroup, Optional): every rank of the run (their parameter shards are disjoint): the
            gradient norm is summed over them and each runs as many micro-batches (the sharded forward's
            collectives). Default: ``group``.
        loss_scale (float): each rank's losses are multiplied by it before the backward: 1 / G where G ranks
            compute the same loss (a token group of head parallelism), so the gradients add up to one process's.
            Default: ``1.0``.
        ref_model (Transformer, Optional): the frozen reference policy, when ``use_kl_loss`` (prepared for the
            ranks as the policy is). Default: ``None`` (a copy of ``model``, in one process).
        pipeline (Pipeline, Optional): with pipeline parallelism, this rank's stage of the policy (``model`` is the
            part it holds): the micro-batches run through the pipeline's ranks, the loss on the last stage, and the
            step's metrics are the last stage's. Default: ``None``.
        ref_pipeline (Pipeline, Optional): the reference's stage, with a pipeline. Default: ``None``.
    """

    def __init__(
        self,
        model: Transformer,
        train: TrainConfig,
        algo_config: AlgorithmConfig,
        optim: OptimConfig,
        total_steps: int,
        temperature: float = 1.0,
        numerics: Numerics = FAST,
        group: dist.ProcessGroup | None = None,
        ref_model: Transformer | None = None,
        shard_group: dist.ProcessGroup | None = None,
        loss_scale: float = 1.0,
        pipeline=None,
        ref_pipeline=None,
    ):
        self.model, self.config, self.algo, self.optim_config = model, train, algo_config, optim
        self.pipeline, self.ref_pipeline = pipeline, ref_pipeline
        self.total_steps, self.temperature, self.numerics = total_steps, temperature, numerics
        self.group, self.shard_group, self.loss_scale = group, shard_group or group, loss_scale
        self.world = 1 if group is None else dist.get_world_size(group)
        if train.global_batch_size % self.world:
            raise ValueError(
                f"`--global-batch-size` {train.global_batch_size} does not split over {self.world} data-parallel ranks"
            )
        self.device = next(model.parameters()).device
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not algo_config.enable_mtp_training:
            trainable = [(n, p) for n, p in trainable if not n.startswith("mtp.")]
        self.optimizer = Optimizer(trainable, optim, group=self.shard_group)
        self.ref_model = None
        if algo_config.use_kl_loss:
            self.ref_model = ref_model if ref_model is not None else copy.deepcopy(model).requires_grad_(False)
        self.num_steps = 0

    def _sum(self, value: float) -> float:
        """``value`` summed over the data-parallel ranks."""
        if self.group is None:
            return value
        t = torch.tensor(float(value), dtype=torch.float64)
        dist.all_reduce(t, group=self.group)
        return float(t)

    def _passes(self, count: int) -> int:
        """The most micro-batches any rank runs (every rank runs that many: the sharded forward's collectives), and
        at least one per pipeline stage (1F1B's least)."""
        least = 1 if self.pipeline is None else self.pipeline.num_stages
        if self.shard_group is None:
            return max(count, least)
        t = torch.tensor(count)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.shard_group)
        return max(int(t), least)

    def _micro_batches(self, samples: list[Sample], budget: int) -> list[MicroBatch]:
        lengths = [len(s.prompt_ids) + len(s.response_ids) for s in samples]
        micro = []
        for group in pack_by_token_budget(lengths, budget):
            packed = pack_samples([samples[i] for i in group], self.device)
            micro.append(
                MicroBatch(
                    packed=packed,
                    batch=ForwardBatch.training(
                        packed.seq_lens,
                        self.device,
                        self.numerics,
                        packed.routed_experts if self.algo.use_rollout_routing_replay else None,
                    ),
                    indices=list(group),
                )
            )
        return micro

    @torch.no_grad()
    def compute_logprobs(self, samples: list[Sample], ref: bool = False) -> list[torch.Tensor]:
        """Forward-only response log-probs of each sample, by the policy or (``ref``) the reference. With a
        pipeline, only the last stage has them (the other stages get empty tensors): the loss is computed there."""
        model, pipeline = (self.ref_model, self.ref_pipeline) if ref else (self.model, self.pipeline)
        budget = self.config.log_probs_max_tokens_per_gpu or self.config.max_tokens_per_gpu
        out: list[torch.Tensor] = [torch.empty(0)] * len(samples)
        micro = self._micro_batches(samples, budget)
        passes = [micro[min(k, len(micro) - 1)] for k in range(self._passes(len(micro)))]

        def keep(k: int, logp: torch.Tensor) -> None:
            if k < len(micro):  # past its own, a rank repeats its last micro-batch
                for i, lp in zip(passes[k].indices, logp.split(passes[k].packed.response_lengths)):
                    out[i] = lp

        if pipeline is None:
            for k, mb in enumerate(passes):
                keep(k, response_logprobs(model, mb, self.temperature)[0])
            return out

        def on_hidden(k: int, hidden_TD: torch.Tensor) -> torch.Tensor:
            keep(k, response_logprobs(pipeline.module, passes[k], self.temperature, hidden_TD)[0])
            return hidden_TD.new_zeros(1, dtype=torch.float32)

        pipeline.run([(mb.packed.tokens_T, mb.batch) for mb in passes], on_hidden, backward=False)
        return out

    def train(self, samples: list[Sample]) -> dict[str, float]:
        """All optimizer steps of one rollout; returns the metrics averaged over them (the :data:`COUNTS` summed)."""
        gbs = self.config.global_batch_size // self.world  # this rank's share of each optimizer step
        if len(samples) % gbs:
            raise ValueError(f"a rollout of {len(samples)} samples does not split into global batches of {gbs}")
        # several updates per rollout: the ratio needs the log-probs from before the first update
        old = self.compute_logprobs(samples) if len(samples) > gbs else None
        ref = self.compute_logprobs(samples, ref=True) if self.ref_model is not None else None
        metrics: dict[str, list[float]] = {}
        for start in range(0, len(samples), gbs):
            window = slice(start, start + gbs)
            result = self._optimizer_step(
                samples[window], None if old is None else old[window], None if ref is None else ref[window]
            )
            for key, value in result.items():
                metrics.setdefault(key, []).append(value)
        return {k: sum(v) if k in COUNTS else sum(v) / len(v) for k, v in metrics.items()}

    def _optimizer_step(
        self, samples: list[Sample], old_logprobs: list[torch.Tensor] | None, ref_logprobs: list[torch.Tensor] | None
    ) -> dict[str, float]:
        micro = self._micro_batches(samples, self.config.max_tokens_per_gpu)
        # the step's global counts: micro-batches (and ranks) add up to the step's means
        counts = StepCounts(
            samples=int(self._sum(len(samples))),
            tokens=int(self._sum(sum(sum(s.response_loss_mask) for s in samples))),
            mtp_tokens=int(self._sum(sum(int(self._mtp_rows(mb)[2].sum()) for mb in micro)))
            if self.algo.enable_mtp_training
            else 0,
        )
        # past its own micro-batches a rank repeats its last with no weight, so every rank runs as many
        passes = [(micro[min(k, len(micro) - 1)], float(k < len(micro))) for k in range(self._passes(len(micro)))]
        sums: dict[str, float] = {}

        def loss_of(head, k: int, hidden_TD: torch.Tensor) -> torch.Tensor:
            mb, share = passes[k]
            loss = self._micro_loss(head, mb, share, hidden_TD, old_logprobs, ref_logprobs, counts, sums)
            return loss * self.loss_scale if self.loss_scale != 1.0 else loss

        self.model.train()
        self.optimizer.zero_grad()
        if self.pipeline is None:
            for k, (mb, _) in enumerate(passes):
                loss_of(self.model, k, self.model(mb.packed.tokens_T, mb.batch)).backward()
        else:
            head = self.pipeline.module
            micro_inputs = [(mb.packed.tokens_T, mb.batch) for mb, _ in passes]
            self.pipeline.run(micro_inputs, lambda k, hidden: loss_of(head, k, hidden), backward=True)
        lr = lr_at(self.optim_config, self.num_steps, self.total_steps)
        grad_norm = self.optimizer.step(lr)
        self.num_steps += 1
        metrics = {k: self._sum(v) for k, v in sums.items()}
        if self.pipeline is not None:
            self.pipeline.refresh_embedding()
            metrics = self.pipeline.from_last_stage(metrics)
        return {**metrics, "train/grad_norm": grad_norm, "train/lr": lr}

    def _micro_loss(
        self,
        head,
        mb: MicroBatch,
        share: float,
        hidden_TD: torch.Tensor,
        old_logprobs: list[torch.Tensor] | None,
        ref_logprobs: list[torch.Tensor] | None,
        counts: "StepCounts",
        sums: dict[str, float],
    ) -> torch.Tensor:
        """The loss of one micro-batch from the policy's final hidden states (``head``: the policy, or the last
        pipeline stage, which gives the output and MTP heads), its metrics added into ``sums``. ``share`` is 0 for
        a repeated micro-batch (no weight, no metrics)."""
        cfg = self.algo
        eps_high = cfg.eps_clip if cfg.eps_clip_high is None else cfg.eps_clip_high

        def add(key: str, value: torch.Tensor | float) -> None:
            sums[key] = sums.get(key, 0.0) + float(value)

        logp, hidden = response_logprobs(head, mb, self.temperature, hidden_TD)
        # one update per rollout: the old policy is the current one, so the ratio is 1 by construction
        old = logp.detach() if old_logprobs is None else torch.cat([old_logprobs[i] for i in mb.indices])
        rollout, adv, mask = mb.packed.rollout_logprobs_R, mb.packed.advantages_R, mb.packed.loss_mask_R

        def reduce(x_R: torch.Tensor, mask=mask * share, sample_of=mb.packed.sample_of_R) -> torch.Tensor:
            if cfg.calculate_per_token_loss:
                return algo.token_mean(x_R, mask, counts.tokens)
            return algo.sample_mean_of_token_means(x_R, mask, sample_of, counts.samples)

        pg_tok, clip_tok, ppo_kl_tok = algo.policy_loss(logp, old, adv, cfg.eps_clip, eps_high, cfg.eps_clip_c)
        if cfg.use_tis:
            weight = algo.tis_weights(old, rollout, cfg.tis_clip_low, cfg.tis_clip)
            pg_tok = pg_tok * weight
            add("train/tis", reduce(weight))
        loss = reduce(pg_tok)
        add("train/pg_loss", loss.detach())
        add("train/pg_clipfrac", reduce(clip_tok.float()))
        add("train/ppo_kl", reduce(ppo_kl_tok.detach()))
        abs_diff = torch.nan_to_num((old - rollout).abs(), nan=0.0, posinf=0.0, neginf=0.0)
        add("train/train_rollout_logprob_abs_diff", reduce(abs_diff))
        add("train/nonfinite_logprob_tokens", share * algo.count_nonfinite(mask, logp, old, rollout))
        if ref_logprobs is not None:
            ref = torch.cat([ref_logprobs[i] for i in mb.indices])
            nonfinite = ~algo.kl_is_finite(logp, ref, cfg.kl_loss_type) & (mask != 0)
            add("train/nonfinite_kl_tokens", share * nonfinite.sum())
            kl = reduce(algo.approx_kl(logp, ref, cfg.kl_loss_type))
            add("train/kl_loss", kl.detach())
            if cfg.kl_loss_coef != 0:
                loss = loss + cfg.kl_loss_coef * kl
        if cfg.entropy_coef != 0:
            ent = reduce(response_entropy(head, mb, hidden, self.temperature))
            add("train/entropy_loss", ent.detach())
            loss = loss - cfg.entropy_coef * ent
        if cfg.enable_mtp_training:
            mtp_loss = share * self._mtp_loss(mb, hidden, counts.mtp_tokens, head)
            add("train/mtp_loss", mtp_loss.detach())
            loss = loss + cfg.mtp_loss_scaling_factor * mtp_loss
        return loss

    @staticmethod
    def _mtp_rows(mb: MicroBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The MTP head's inputs of a micro-batch: ``(next tokens, labels, mask)`` (``algo.mtp_labels_and_mask``)."""
        packed = mb.packed
        return algo.mtp_labels_and_mask(packed.tokens_T, packed.loss_mask_T, packed.cu_seqlens)

    def _mtp_loss(
        self, mb: MicroBatch, hidden_TD: torch.Tensor, num_tokens: int | None = None, head=None
    ) -> torch.Tensor:
        """CE of the MTP head predicting token t+2 at row t, over response tokens only, summed and divided by
        ``num_tokens`` (the step's MTP tokens; default: this micro-batch's). ``head``: the policy (default) or the
        last pipeline stage."""
        head = head or self.model
        next_tokens, labels, mask = self._mtp_rows(mb)
        mtp_hidden = head.mtp_forward(hidden_TD, next_tokens, mb.batch, detach_trunk=True)
        rows = mask.nonzero()[:, 0]
        hidden_RD, labels_R = mtp_hidden[rows], labels[rows]
        if self.numerics.row_by_row:  # the engine's own head, as the policy's log-probs take it
            logits = head.mtp_logits(hidden_RD, detach_head=True, numerics=self.numerics)
            return algo.mtp_loss(token_logprobs(logits, labels_R), mask[rows], num_tokens)
        # the output head fused into the log-prob (no [R, V] logits held), detached: the loss reaches MTP only
        logp_R = linear_token_logprobs(hidden_RD, head.output_weight().detach(), labels_R)
        return algo.mtp_loss(logp_R, mask[rows], num_tokens)
