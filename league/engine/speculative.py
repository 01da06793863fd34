"""Speculative decoding with the model's MTP head: the draft-and-verify step, and acceptance of a verified chain.

topk = 1: the MTP head proposes a chain of ``num_steps`` tokens (its top-1 at each step); one target
forward verifies the bonus token plus the chain. Greedy acceptance keeps drafts while they equal the
target's argmax; sampling acceptance is exact speculative sampling with a deterministic draft (accept
d with probability p(d), else resample from the residual ``max(p - onehot(d), 0)``), so the emitted
tokens are distributed exactly as the target's. Not responsible for caches or scheduling.

Legend: B requests, N draft steps, D model dim, V vocabulary.
"""

import torch

from league.engine.cuda_graph import capture_pieces, layer_pieces
from league.engine.request import SamplingParams, rows_by_settings
from league.models.qwen3_5_moe import ForwardBatch, ModelCache, Transformer
from league.ops.numerics import FAST, Numerics
from league.ops.sampling import coins, filtered_probs, sample_logits, sample_rows, unfiltered


class SpeculativeStep:
    """One speculative step for up to ``max_rows`` requests, over fixed-shape buffers so that a CUDA graph can
    capture it whole (the host reads nothing from the device until the step is over).

    A request brings its slot, the position ``start`` of its first MTP row and ``tokens``, the token after
    each row (1 to N + 1 of them: after a verify, the accepted drafts and the bonus token; after prefill, the
    first sampled token). The trunk hidden states of those rows wait in ``hidden[slot]``, written by the
    previous verify (all its N + 1 rows) or by prefill (row 0). The step then runs, on the device:

    1. the MTP head over N + 1 rows per request from ``start``; the rows past the request's own are computed
       and dropped (causal attention keeps them out of the rows before them, and the MTP keys they write lie
       past the committed length, where the draft steps overwrite them before anything reads them);
    2. the draft chain: the MTP head's top-1 token from the last real row, then N - 1 more MTP steps, each
       fed the previous step's output and token;
    3. one verify forward of the pending token and the N drafts (slots' GDN states read, not written; each
       step's conv window and the recurrence's inputs kept in the cache's scratch rows for
       ``Transformer.commit_verified``), its output head into ``logits`` and its hidden states into
       ``hidden[slot]`` for the next step's MTP rows.

    The same functions run eagerly or captured per batch size (:meth:`capture`); a batch smaller than a
    captured size is padded with rows on ``scratch_slot``. Acceptance, committing states and bookkeeping stay
    with the engine.

    Args:
        model (Transformer): the model with its MTP head.
        cache (ModelCache): the engine's cache, with verify scratch rows for ``max_rows`` requests.
        num_steps (int): N, draft tokens per verify.
        num_slots (int): cache slots (the scratch slot included, when capturing).
        max_rows (int): most requests in one step.
        numerics (Numerics): the forwards' numerics (``ops.numerics``). Default: ``FAST``.
    """

    def __init__(
        self,
        model: Transformer,
        cache: ModelCache,
        num_steps: int,
        num_slots: int,
        max_rows: int,
        numerics: Numerics = FAST,
    ):
        self.model, self.cache, self.num_steps, self.numerics = model, cache, num_steps, numerics
        param = next(model.parameters())
        device, width = param.device, num_steps + 1
        self.width, self.max_rows = width, max_rows

        def longs(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.long, device=device)

        self.hidden = torch.zeros(num_slots, width, model.args.dim, dtype=param.dtype, device=device)
        # per request: slot, position of the first MTP row, index of the last MTP row, the token after each row
        self.slots, self.starts, self.last = longs(max_rows), longs(max_rows), longs(max_rows)
        self.tokens = longs(max_rows, width)
        self.drafts = longs(max_rows, num_steps)
        self.logits = torch.empty(max_rows * width, model.args.vocab_size, dtype=param.dtype, device=device)
        self.rows = torch.arange(max_rows, device=device)
        self.offsets = torch.arange(width, device=device)
        self.cu_rows = torch.arange(0, max_rows * width + 1, width, device=device)  # N + 1 tokens per request
        self.row_lens = torch.full((max_rows,), width, dtype=torch.long, device=device)
        self.cu_one = torch.arange(max_rows + 1, device=device)  # one token per request
        self.ones = torch.ones(max_rows, dtype=torch.long, device=device)
        self.graphs: dict[int, list] = {}
        self.pool = None

    def run(self, slots: list[int], starts: list[int], tokens: list[list[int]], scratch_slot: int | None = None):
        """Draft and verify for B requests; returns ``([B, N] drafts, [B, N + 1, V] verify logits)`` on the
        device, valid until the next run (nothing is read back). ``scratch_slot`` pads a batch up to a captured
        size."""
        batch = len(slots)
        size = next((s for s in sorted(self.graphs) if s >= batch), batch)
        pad = size - batch
        if pad and scratch_slot is None:
            raise ValueError("padding a batch to a captured size needs a scratch slot")
        padded = [[*t, *[0] * (self.width - len(t))] for t in tokens] + [[0] * self.width] * pad
        meta = [
            [*slots, *[scratch_slot] * pad],
            [*starts, *[0] * pad],
            [*(len(t) - 1 for t in tokens), *[0] * pad],
        ]
        flat = [t for row in padded for t in row] + [v for values in meta for v in values]
        staged = torch.tensor(flat, dtype=torch.long).to(self.slots.device, non_blocking=True)  # one transfer
        self.tokens[:size].copy_(staged[: size * self.width].view(size, self.width))
        for buffer, values in zip((self.slots, self.starts, self.last), staged[size * self.width :].view(3, size)):
            buffer[:size].copy_(values)
        if size in self.graphs:
            for graph in self.graphs[size]:
                graph.replay()
        else:
            for piece in self.pieces(size):
                piece()
        return self.drafts[:batch], self.logits[: batch * self.width].view(batch, self.width, -1)

    def _batch(
        self, size: int, width: int, positions: torch.Tensor, cache_lens: torch.Tensor, verify: bool = False
    ) -> ForwardBatch:
        """``size`` sequences of ``width`` new tokens each, continuing in their slots (no host values read)."""
        return ForwardBatch.continuing(
            width=width,
            positions=positions,
            slots_t=self.slots[:size],
            cache_lens_t=cache_lens,
            cu_seqlens=(self.cu_rows if width > 1 else self.cu_one)[: size + 1],
            seq_lens_t=self.row_lens[:size] if width > 1 else self.ones[:size],
            numerics=self.numerics,
            verify=verify,
        )

    def pieces(self, size: int) -> list:
        """The step for ``size`` requests as functions run in order (each one graph when captured): the MTP rows
        and the draft chain, the verify's embedding, its decoder layers in runs, its output head."""
        model, cache, numerics, width, state = self.model, self.cache, self.numerics, self.width, {}
        slots, starts, last, rows = self.slots[:size], self.starts[:size], self.last[:size], self.rows[:size]

        def draft() -> None:
            positions = (starts[:, None] + self.offsets).reshape(-1)
            batch = self._batch(size, width, positions, starts)
            hidden_NTD = model.mtp_forward(
                self.hidden[slots].reshape(size * width, -1), self.tokens[:size].reshape(-1), batch, cache
            )
            hidden = hidden_NTD.view(size, width, -1)[rows, last]
            token = model.mtp_logits(hidden, numerics=numerics).argmax(-1)
            committed = starts + last + 1
            chain = [token]
            for step in range(1, self.num_steps):
                at = committed - 1 + step
                hidden = model.mtp_forward(hidden, token, self._batch(size, 1, at, at), cache)
                token = model.mtp_logits(hidden, numerics=numerics).argmax(-1)
                chain.append(token)
            self.drafts[:size] = torch.stack(chain, dim=1)
            pending = self.tokens[:size].gather(1, last[:, None])
            verify_tokens = torch.cat([pending, self.drafts[:size]], dim=1).reshape(-1)
            positions = (committed[:, None] + self.offsets).reshape(-1)
            state["batch"] = self._batch(size, width, positions, committed, verify=True)
            state["x"], state["rope"] = model.embed(verify_tokens, state["batch"])

        def head() -> None:
            hidden = model.norm(state["x"])
            out = self.logits[: size * width]
            if numerics.row_by_row:
                out.copy_(model.logits(hidden, numerics))
            else:
                torch.mm(hidden, model.output_weight().t(), out=out)
            self.hidden[slots] = hidden.view(size, width, -1)

        return [draft, *layer_pieces(model, cache, state), head]

    def capture(self, sizes: list[int], scratch_slot: int) -> None:
        """Capture the step for each of ``sizes`` (at most ``max_rows``); larger batches run eagerly. The capture's
        warm-up runs write only into ``scratch_slot``."""
        self.slots.fill_(scratch_slot)
        self.starts.zero_(), self.last.zero_(), self.tokens.zero_()
        for size in sorted(set(sizes), reverse=True):  # largest first, so smaller graphs reuse its memory pool
            if size > self.max_rows:
                raise ValueError(f"cannot capture {size} rows: the step has buffers for {self.max_rows}")
            self.graphs[size], self.pool = capture_pieces(self.pieces(size), self.pool)


def accept(
    logits_NV: torch.Tensor, drafts: list[int], params: SamplingParams, seed: int, position: int
) -> tuple[int, int]:
    """Decide how many drafts to keep and the bonus token (one request; see :func:`accept_batch`).

    Args:
        logits_NV (torch.Tensor): ``[N + 1, V]`` target logits; row t predicts the token after verify input t
            (input 0 is the pending token, input t > 0 is draft t).
        drafts (list[int]): the N draft tokens.
        params (SamplingParams): temperature 0 selects greedy acceptance.
        seed (int): the request's seed.
        position (int): output position of the token row 0 decides (the request's output length).

    Returns:
        ``(num_accepted, bonus_token)``.
    """
    return accept_batch(logits_NV[None], [drafts], [params], [seed], [position])[0]


def accept_batch(
    logits_BNV: torch.Tensor,
    drafts: list[list[int]],
    params: list[SamplingParams],
    seeds: list[int],
    positions: list[int],
) -> list[tuple[int, int]]:
    """:func:`accept` for B requests verified together (:func:`accept_on_device`, read back).

    Returns:
        ``[(num_accepted, bonus_token)]`` per request.
    """
    drafts_BN = torch.tensor(drafts, dtype=torch.long).view(len(drafts), logits_BNV.shape[1] - 1)
    accepted_B, bonus_B = accept_on_device(logits_BNV, drafts_BN.to(logits_BNV.device), params, seeds, positions)
    return [(a, b) for a, b in zip(*torch.stack([accepted_B, bonus_B]).tolist())]


def accept_on_device(
    logits_BNV: torch.Tensor,
    drafts_BN: torch.Tensor,
    params: list[SamplingParams],
    seeds: list[int],
    positions: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`accept` for B requests verified together, left on the device (nothing is read back, so the host can
    queue what follows before it waits).

    Greedy requests keep drafts while they equal the target's argmax. Sampling requests that share settings are
    decided together: draft t is kept with probability p_t(d_t) (its coin: the uniform of the request's seed at
    output position ``position + t``, coin stream), and the first rejected position t draws from the residual
    ``max(p_t - onehot(d_t), 0)`` (or, all kept, from ``p_N``) with the seed's sampling noise at ``position + t``.
    Each draw uses noise no earlier decision saw, so the emitted tokens follow the target exactly; each request's
    result depends only on its own logits, seed and position, never on the batch.

    Args:
        logits_BNV (torch.Tensor): ``[B, N + 1, V]`` verify logits.
        drafts_BN (torch.Tensor): ``[B, N]`` draft tokens (long), on the logits' device.
        params, seeds, positions: per request, as :func:`accept` takes them.

    Returns:
        ``(accepted_B, bonus_B)``: drafts kept and the bonus token of each request (long, on the device).
    """
    num_rows, width = logits_BNV.shape[:2]
    num_drafts, device = width - 1, logits_BNV.device
    accepted_B = torch.empty(num_rows, dtype=torch.long, device=device)
    bonus_B = torch.empty(num_rows, dtype=torch.long, device=device)
    for key, rows in rows_by_settings(params).items():
        index = slice(None) if len(rows) == num_rows else torch.tensor(rows).to(device, non_blocking=True)
        drafts = drafts_BN[index]
        logits = logits_BNV[index]
        if key is None:  # greedy: drafts kept while they equal the argmax
            best_BN1 = logits.argmax(-1)
            keep_BN = drafts == best_BN1[:, :num_drafts]
            accepted = keep_BN.long().cumprod(-1).sum(-1)
            accepted_B[index], bonus_B[index] = accepted, best_BN1.gather(1, accepted[:, None])[:, 0]
            continue
        host = torch.tensor([[seeds[i] for i in rows], [positions[i] for i in rows]], dtype=torch.long)
        seeds_B, start_B = host.to(device, non_blocking=True).unbind(0)
        steps = torch.arange(width, device=device)
        seeds_BN1, positions_BN1 = seeds_B[:, None].expand(-1, width), start_B[:, None] + steps
        # each row's draw from its residual: the draft of that row left out (none after the last draft)
        exclude_BN1 = torch.cat([drafts, drafts.new_full((len(rows), 1), -1)], dim=1)
        seeds_flat, positions_flat = seeds_BN1.flatten(), positions_BN1.flatten()
        if unfiltered(*key):
            drawn, lse, coin = sample_logits(
                logits.flatten(0, 1), key[0], seeds_flat, positions_flat, exclude_BN1.flatten()
            )
            z_draft = logits[:, :num_drafts].gather(-1, drafts[..., None])[..., 0].float() / key[0]
            p_draft_BN = (z_draft - lse.view(len(rows), width)[:, :num_drafts]).exp()
        else:
            probs_BNV = filtered_probs(logits, *key)
            p_draft_BN = probs_BNV[:, :num_drafts].gather(-1, drafts[..., None])[..., 0]
            residual = probs_BNV.scatter(-1, exclude_BN1.clamp(min=0)[..., None], 0.0)
            residual[:, num_drafts] = probs_BNV[:, num_drafts]
            drawn = sample_rows(residual.flatten(0, 1), seeds_flat, positions_flat)
            coin = coins(seeds_flat, positions_flat)
        drawn_BN1 = drawn.view(len(rows), width)
        keep_BN = coin.view(len(rows), width)[:, :num_drafts] < p_draft_BN
        accepted = keep_BN.long().cumprod(-1).sum(-1)
        accepted_B[index], bonus_B[index] = accepted, drawn_BN1.gather(1, accepted[:, None])[:, 0]
    return accepted_B, bonus_B
