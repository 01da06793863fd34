"""ModelRunner: runs the model for the engine. It owns the caches (state slots, KV blocks and the block table, GDN
snapshot slots), builds the forward batches of prefill, decode and verify (with the engine's numerics), and owns the
captured CUDA graphs and the speculative step, so that the engine decides only what runs.

Not responsible for which requests run (``scheduler``), for how a row is drawn (``sampler``, which it calls) or for
requests' bookkeeping (``engine``).

Legend: T tokens, B requests, N draft steps, D model dim, V vocabulary.
"""

import dataclasses
import warnings

import torch

from league.engine import sampler
from league.engine.cache import (
    allocate_cache,
    copy_blocks,
    copy_states,
    kv_bytes_per_token,
    pages_of,
    routes_of,
    state_bytes_per_slot,
)
from league.engine.config import EngineConfig
from league.engine.cuda_graph import DecodeGraphs, default_batch_sizes, graphs_apply
from league.engine.request import Request
from league.engine.speculative import SpeculativeStep, accept_on_device
from league.models.qwen3_5_moe import ForwardBatch, Transformer
from league.ops.logprob import token_logprobs
from league.ops.numerics import Numerics
from league.parallel.inference import EngineLayout


class ModelRunner:
    """The model, its cache slots and its captured steps, for one engine.

    Args:
        model (Transformer): the model, read in place (colocated with a trainer, nothing is copied).
        config (EngineConfig): sizes and speculative decoding.
        numerics (Numerics): how every forward computes.
        layout (EngineLayout, Optional): the model laid out over an engine's ranks (``parallel.inference``): the
            cache holds this rank's heads, weight updates keep this rank's part. Default: one process.
    """

    def __init__(
        self, model: Transformer, config: EngineConfig, numerics: Numerics, layout: EngineLayout | None = None
    ):
        self.model, self.config, self.numerics = model, config, numerics
        self.layout = layout or EngineLayout()
        self.cache_args = self.layout.cache_args(model.args)
        param = next(model.parameters())
        if param.is_meta:
            raise ValueError("the engine's model is on the meta device: allocate its weights first (to_empty, load)")
        self.device, self.dtype = param.device, param.dtype
        self.context_length = min(config.context_length, model.args.max_position_embeddings)
        self.state_dtype = getattr(torch, config.mamba_ssm_dtype)
        self.use_graphs = graphs_apply(config, numerics, self.device, self.dtype)
        if self.device.type == "cuda":  # each group of projections of one input as one GEMM
            model.join_projections()
        if config.cuda_graph_bs and not self.use_graphs:
            warnings.warn(
                "cuda_graph_bs is ignored: CUDA graphs serve a bf16 model on a Hopper or Blackwell GPU, "
                "with numerics other than batch_invariant and ep_size 1",
                stacklevel=3,
            )
        self.num_spec_steps = config.num_spec_steps
        self.slot_len = self.context_length + self.num_spec_steps + 1
        self.page_size = config.page_size
        self.num_slots, self.num_snapshots, self.num_blocks = self._sizes()
        self.scratch_slot = self.num_slots  # the padding rows of captured batches (with graphs)
        first = self.num_slots + self.use_graphs
        self.snapshot_slots = range(first, first + self.num_snapshots)
        """State slots of the prefix cache's GDN snapshots (after the running requests' and the scratch slot)."""
        steps = self.num_spec_steps + 1 if self.num_spec_steps else 0
        self.cache = allocate_cache(
            self.cache_args,
            first + self.num_snapshots,
            self.slot_len,
            self.dtype,
            self.device,
            max_rows=config.max_running_requests if steps else 0,
            max_steps=steps,
            state_dtype=self.state_dtype,
            routes=config.enable_return_routed_experts,
            page_size=self.page_size,
            num_blocks=self.num_blocks,
        )
        self.pages = pages_of(self.cache)
        self._table_rows: dict[int, list[int]] = {}
        self.graphs: DecodeGraphs | None = None  # captured at the first decode
        self._whole: dict[str, torch.Tensor] | None = None
        self.shared: set[str] = set()
        """Parameters that are views of a colocated trainer's own tensors (``parallel.inference.shared_expert_blocks``):
        never released, and left out of weight syncs."""
        self.released: dict[str, list] = {}
        """Memory given back by :meth:`release_memory`, by tag."""
        self.spec_step = None
        if self.num_spec_steps:
            self.spec_step = SpeculativeStep(
                model,
                self.cache,
                self.num_spec_steps,
                first + self.num_snapshots,
                config.max_running_requests,
                numerics,
            )

    def keep_routes(self, finished) -> None:
        """Before finished requests free their slots: the routed experts of those that asked for them."""
        for r in finished:
            if r.routed_experts_start_len is not None and r.slot is not None:
                r.routed_experts = self.routed_experts(r)

    def routed_experts(self, r: Request) -> torch.Tensor:
        """The experts the trunk's MoE layers chose at each of a request's positions from its
        ``routed_experts_start_len`` to the one before its last token (the last never ran through the model):
        int32 ``[rows, layers, top_k]``, SGLang's layout."""
        end = len(r.prompt_ids) + len(r.output_ids) - 1
        return routes_of(self.cache, r.slot, r.routed_experts_start_len, end)

    def release_memory(self, tags: set[str], discard: set[str] = frozenset()) -> int:
        """Free the memory of ``tags`` (``MEMORY_TAGS``), keeping every tensor object, so that a colocated trainer can
        use it; :meth:`resume_memory` brings it back. ``kv_cache``: the cache slots' storages (their contents are
        lost: no request may be running); ``weights`` / ``weights_drafter``: the trunk's / the MTP layer's
        parameters, kept in host memory meanwhile, unless their tag is in ``discard`` (a weight sync will rewrite
        them: they come back zeroed); ``cuda_graph``: the captured steps (captured again when next needed; freeing
        the cache or the weights drops them too, as they read those addresses). Returns the bytes freed."""
        freed = 0
        for tag in sorted(tags - self.released.keys()):
            if tag == "cuda_graph":
                continue
            keep = tag != "kv_cache" and tag not in discard
            stored = [_release(storage, keep) for storage in _storages(self._tensors_of(tag))]
            self.released[tag] = stored
            freed += sum(nbytes for _, nbytes, _ in stored)
        self._drop_graphs()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return freed

    def resume_memory(self, tags: set[str]) -> None:
        """Give back what :meth:`release_memory` freed for ``tags``: weights as they were, cache slots zeroed."""
        for tag in sorted(tags & self.released.keys()):
            for storage, nbytes, backup in self.released.pop(tag):
                storage.resize_(nbytes)
                if backup is None:
                    storage.fill_(0)
                else:
                    storage.copy_(backup)

    def _tensors_of(self, tag: str) -> list[torch.Tensor]:
        if tag == "kv_cache":
            layers = [*self.cache.layers, *self.cache.mtp_layers]
            values = [getattr(c, f.name) for c in layers for f in dataclasses.fields(c)]
            return [t for t in values if isinstance(t, torch.Tensor)]
        drafter = tag == "weights_drafter"
        params = self.model.named_parameters()
        return [p for name, p in params if name.startswith("mtp.") == drafter and name not in self.shared]

    def _drop_graphs(self) -> None:
        self.graphs = None
        if self.spec_step is not None:
            self.spec_step.graphs, self.spec_step.pool = {}, None

    def _sizes(self) -> tuple[int, int, int]:
        """``(state slots of running requests, snapshot slots, KV blocks)``: on a GPU what ``mem_fraction_static``
        leaves once the weights are in (unless set), elsewhere what the settings say (default: every slot's whole
        context in blocks)."""
        config, page = self.config, self.page_size
        slots = config.num_slots or config.max_running_requests
        snapshots = config.num_snapshots
        per_slot = -(-self.slot_len // page)
        if config.max_total_tokens is not None:
            blocks = -(-config.max_total_tokens // page)
        elif self.device.type != "cuda":
            blocks = slots * per_slot
        else:  # the GDN states of the running requests and the snapshots, then KV blocks in what is left
            free, total = torch.cuda.mem_get_info(self.device)
            budget = total * config.mem_fraction_static - (total - free)
            state = state_bytes_per_slot(self.cache_args, self.dtype, self.state_dtype)
            block = page * kv_bytes_per_token(self.cache_args, self.dtype, config.enable_return_routed_experts)
            fixed = (self.use_graphs + snapshots) * state + (per_slot + 1) * block  # one whole context, the scratch
            if config.num_slots is None:  # as many running requests as asked for, or as fit beside one context
                slots = max(0, min(slots, int((budget - fixed) // state)))
            if slots < 1:
                raise ValueError(
                    f"mem_fraction_static {config.mem_fraction_static} leaves no room for one running request of "
                    f"context_length {self.context_length} beside {snapshots} GDN snapshots "
                    f"({(snapshots * state + per_slot * block) / 2**30:.2f} GiB): lower max_mamba_cache_size or "
                    "context_length, or raise mem_fraction_static"
                )
            blocks = int((budget - (slots + self.use_graphs + snapshots) * state) // block) - 1
        if blocks < per_slot:
            raise ValueError(
                f"max_total_tokens {blocks * page} cannot hold one request of context_length {self.context_length} "
                f"({per_slot * page} tokens with the speculative rows): raise it or lower context_length"
            )
        return slots, snapshots, blocks

    # the caches, as the scheduler hands them out (scheduler.Memory) -------------------------------------------

    def set_blocks(self, slot: int, blocks: list[int]) -> None:
        """Slot ``slot``'s row of the block table is ``blocks`` (written to the device before the next forward)."""
        self._table_rows[slot] = list(blocks)

    def copy_blocks(self, src: list[int], dst: list[int]) -> None:
        copy_blocks(self.cache, src, dst)

    def copy_states(self, src: int, dsts: list[int]) -> None:
        copy_states(self.cache, src, dsts)

    def _write_table(self) -> None:
        """The block-table rows changed since the last forward, in one transfer."""
        if not self._table_rows:
            return
        slots, cols, blocks = [], [], []
        for slot, row in self._table_rows.items():
            slots.extend([slot] * len(row))
            cols.extend(range(len(row)))
            blocks.extend(row)
        self._table_rows = {}
        if blocks:
            index = torch.tensor([slots, cols, blocks], dtype=torch.long).to(self.device, non_blocking=True)
            self.pages.table[index[0], index[1]] = index[2]

    def _batch(self, seq_lens: list[int], cache_lens: list[int], slots: list[int]) -> ForwardBatch:
        return ForwardBatch.prefill(seq_lens, cache_lens, slots, self.device, self.numerics)

    def logits(self, hidden_TD: torch.Tensor) -> torch.Tensor:
        return self.model.logits(hidden_TD, self.numerics)

    def prefill(self, chunks: list[tuple[Request, int, int]]) -> tuple[torch.Tensor, ForwardBatch]:
        """The forward of prompt chunks ``(request, start, end)`` into their slots (and, speculating, the MTP rows of
        the prompt positions whose next token is known); returns the hidden states and the batch."""
        self._write_table()
        tokens = torch.tensor([t for r, s, e in chunks for t in r.fill_ids[s:e]], device=self.device)
        batch = self._batch([e - s for _, s, e in chunks], [s for _, s, _ in chunks], [r.slot for r, _, _ in chunks])
        hidden = self.model(tokens, batch, self.cache)
        if self.spec_step is not None:
            self._mtp_extend_prompt(chunks, hidden, batch)
        return hidden, batch

    def prompt_logprobs(self, chunks, hidden: torch.Tensor, sequences) -> None:
        """After a prefill: the log-probs of the prompt tokens that requests asked for (from ``logprob_start_len``
        on), appended to each request's ``input_logprobs``: the token at position q is scored by the row of position
        q - 1; the first prompt token has none (None)."""
        rows, targets, owners = [], [], []
        for (r, s, e), (_, start, _end) in zip(chunks, sequences):
            if r.logprob_start_len < 0:
                continue
            if r.logprob_start_len == 0 and s == 0:
                r.input_logprobs.append(None)
                r.input_top_logprobs.append(None)
            lo, hi = max(s, r.logprob_start_len - 1, 0), min(e, len(r.prompt_ids) - 1)
            if hi > lo:
                rows.extend(range(start + lo - s, start + hi - s))
                targets.extend(r.prompt_ids[lo + 1 : hi + 1])
                owners.append((r, hi - lo))
        if not rows:
            return
        logits = self.logits(hidden[rows])
        logprobs = token_logprobs(logits, torch.tensor(targets, device=self.device)).tolist()
        row_reqs = [r for r, count in owners for _ in range(count)]
        tops = sampler.top_pairs(row_reqs, sampler.top_tensors(row_reqs, logits))
        for r, count in owners:
            r.input_logprobs.extend(logprobs[:count])
            r.input_top_logprobs.extend(tops[:count])
            logprobs, tops = logprobs[count:], tops[count:]

    def start_sample(self, leader: Request, member: Request, hidden_D: torch.Tensor, token: int) -> None:
        """A prefill's last position gave ``token`` to ``member`` (for the other samples of a group, a copy of
        ``leader``'s GDN states first; the scheduler shares its blocks); speculating, the MTP row of that position
        waits for the next step."""
        if member is not leader:
            copy_states(self.cache, leader.slot, [member.slot])
        if self.spec_step is not None:
            self.spec_step.hidden[member.slot, 0] = hidden_D
            member.mtp_start, member.mtp_tokens = len(leader.fill_ids) - 1, [token]

    def _mtp_extend_prompt(self, chunks, hidden: torch.Tensor, batch: ForwardBatch) -> None:
        """MTP rows for prompt positions whose next token is known (all but the last prompt position)."""
        rows, tokens, lens, starts, slots = [], [], [], [], []
        for (r, s, e), (_, start, _end) in zip(chunks, batch.sequences()):
            known_end = min(e, len(r.fill_ids) - 1)
            if known_end <= s:
                continue
            rows.append(hidden[start : start + known_end - s])
            tokens.extend(r.fill_ids[s + 1 : known_end + 1])
            lens.append(known_end - s)
            starts.append(s)
            slots.append(r.slot)
        if rows:
            self._mtp_forward(torch.cat(rows), tokens, lens, starts, slots)

    def _mtp_forward(self, hidden: torch.Tensor, tokens: list[int], lens: list[int], starts: list[int], slots) -> None:
        """The MTP layer over rows of several requests (``lens[i]`` rows from position ``starts[i]`` in slot
        ``slots[i]``, row j pairing the trunk's hidden state at j with the token after it), for the keys and values
        it caches; its outputs are not needed."""
        self._write_table()
        batch = self._batch(lens, starts, slots)
        self.model.mtp_forward(hidden, torch.tensor(tokens, device=self.device), batch, self.cache)

    def mtp_catch_up(self, reqs: list[Request]) -> None:
        """Before a step without drafts in a speculating engine: the MTP rows each request still owes (those of the
        last verify, prefill or step), from the trunk's hidden states kept in the speculative step's buffer."""
        owing = [r for r in reqs if r.mtp_tokens]
        if not owing:
            return
        hidden = torch.cat([self.spec_step.hidden[r.slot, : len(r.mtp_tokens)] for r in owing])
        tokens = [t for r in owing for t in r.mtp_tokens]
        lens = [len(r.mtp_tokens) for r in owing]
        self._mtp_forward(hidden, tokens, lens, [r.mtp_start for r in owing], [r.slot for r in owing])
        for r in owing:
            r.mtp_tokens = []

    def decode(self, tokens_B: torch.Tensor, positions: list[int], slots: list[int]) -> torch.Tensor:
        """One token for each of B requests (``tokens_B`` on the device, ``positions`` = tokens already cached), by a
        captured graph where one fits; returns the ``[B, V]`` logits without waiting for the device. Speculating, each
        request's new MTP row (the trunk's hidden state at its new token) waits in the speculative step's buffer."""
        self._write_table()
        if self.use_graphs and self.graphs is None:
            sizes = self.config.cuda_graph_bs or default_batch_sizes(self.config.max_running_requests)
            self.graphs = DecodeGraphs(self.model, self.cache, sizes, self.scratch_slot, self.numerics)
        if self.graphs is not None and self.graphs.fits(len(slots)):
            logits, hidden = self.graphs.run(tokens_B, positions, slots)
        else:
            batch = ForwardBatch.decode(positions, slots, self.device, self.numerics)
            hidden = self.model(tokens_B, batch, self.cache)
            logits = self.logits(hidden)
        if self.spec_step is not None:
            self.spec_step.hidden[torch.tensor(slots, device=self.device), 0] = hidden
        return logits

    def speculate(self, reqs: list[Request]) -> tuple[torch.Tensor, torch.Tensor]:
        """The draft chain and one verify for ``reqs`` (their MTP rows first): ``([B, N] drafts, [B, N + 1, V] verify
        logits)`` on the device, nothing read back."""
        self._write_table()
        step = self.spec_step
        if self.use_graphs and not step.graphs:
            sizes = self.config.cuda_graph_bs or default_batch_sizes(self.config.max_running_requests)
            step.capture([s for s in sizes if s <= step.max_rows], scratch_slot=self.scratch_slot)
        return step.run(
            [r.slot for r in reqs],
            [r.mtp_start for r in reqs],
            [r.mtp_tokens for r in reqs],
            scratch_slot=self.scratch_slot if self.use_graphs else None,
        )

    def commit_verified(self, slots_B: torch.Tensor, accepted_B: torch.Tensor) -> None:
        """Commit each verified request's accepted prefix into its slot (``Transformer.commit_verified``)."""
        self.model.commit_verified(self.cache, slots_B, accepted_B, self.numerics)

    def commit_part(self, rows: list[int], slots: list[int], accepted: list[int]) -> None:
        """After a speculative step: the first ``accepted[i] + 1`` tokens of the last verify's row ``rows[i]``
        committed into slot ``slots[i]``, which holds a copy of that row's states from before the verify (a snapshot
        part-way through the tokens the step accepted)."""
        rows_B, slots_B, accepted_B = torch.tensor([rows, slots, accepted]).to(self.device).unbind(0)
        self.model.commit_verified(self.cache, slots_B, accepted_B, self.numerics, rows_B)

    def speculative_step(self, reqs: list[Request], eos_ids: set[int]) -> list[tuple[int, list[int], list, list]]:
        """Draft, verify, accept (the requests' penalties applied to the verify's logits) and commit each request's
        accepted prefix, all queued on the device and read back once: per request ``(accepted drafts, emitted tokens,
        their log-probs, their top log-probs)``, the emitted tokens being the accepted drafts and the bonus token."""
        num_steps = self.num_spec_steps
        drafts_BN, logits = self.speculate(reqs)
        target = sampler.penalized_verify(reqs, logits, drafts_BN, eos_ids)
        params, seeds, positions = [r.params for r in reqs], [r.seed for r in reqs], [len(r.output_ids) for r in reqs]
        accepted_B, bonus_B = accept_on_device(target, drafts_BN, params, seeds, positions)
        self.commit_verified(torch.tensor([r.slot for r in reqs]).to(self.device, non_blocking=True), accepted_B)
        # emitted token t of request i: draft t while t < accepted_i, the bonus at t == accepted_i (and past it,
        # where nothing is emitted)
        steps = torch.arange(num_steps + 1, device=self.device)
        candidates = torch.cat([drafts_BN, bonus_B[:, None]], dim=1)
        emitted_BN1 = torch.where(steps < accepted_B[:, None], candidates, bonus_B[:, None])
        rows_RV = logits.reshape(-1, logits.shape[-1])
        logprobs_BN1 = token_logprobs(rows_RV, emitted_BN1.flatten())
        verify_reqs = [r for r in reqs for _ in range(num_steps + 1)]
        tops = sampler.top_tensors(verify_reqs, rows_RV)
        rows = torch.cat([accepted_B[:, None], emitted_BN1], dim=1).tolist()  # the step's one wait
        logprob_rows = logprobs_BN1.view(len(reqs), num_steps + 1).tolist()
        pairs = sampler.top_pairs(verify_reqs, tops)
        results = []
        for i, (num_accepted, *tokens) in enumerate(rows):
            first, count = i * (num_steps + 1), num_accepted + 1
            results.append((num_accepted, tokens[:count], logprob_rows[i][:count], pairs[first : first + count]))
        return results

    def update_weights_from_disk(self, path: str) -> None:
        """Load a Hugging Face checkpoint folder into the model in place (trunk and MTP head; laid out over ranks,
        each keeps its part). The whole checkpoint is checked against the running model first (architecture,
        tensor names, shapes, dtypes): on a mismatch nothing changes and the ValueError names the first
        differences."""
        from league.checkpoint.hf import load_hf_weights

        load_hf_weights(self.model, path, strict=True, layout=self.layout)

    def update_weights(self, named_tensors) -> int:
        """Copy whole tensors named as in a Hugging Face checkpoint or as league's parameters into the model in
        place (``checkpoint.hf.load_named_tensors``: all checked before the first copy; laid out over ranks, each
        keeps its part). Returns how many were copied."""
        from league.checkpoint.hf import load_named_tensors, whole_parameters

        if self._whole is None:  # names and whole shapes, made once (a meta model when laid out over ranks)
            self._whole = whole_parameters(self.model, self.layout)
        return load_named_tensors(self.model, list(named_tensors), self.layout, self._whole)


MEMORY_TAGS = ("kv_cache", "weights", "weights_drafter", "cuda_graph")
"""What ``release_memory`` frees (SGLang's memory tags)."""


def _storages(tensors: list[torch.Tensor]) -> list[torch.UntypedStorage]:
    """The distinct storages under ``tensors`` (joined projections share one), each once."""
    seen: dict[int, torch.UntypedStorage] = {}
    for t in tensors:
        storage = t.untyped_storage()
        if storage.nbytes():
            seen.setdefault(storage.data_ptr(), storage)
    return list(seen.values())


def _release(
    storage: torch.UntypedStorage, keep: bool
) -> tuple[torch.UntypedStorage, int, torch.UntypedStorage | None]:
    """Shrink a storage to nothing; ``keep``: first copy its bytes to host memory."""
    nbytes = storage.nbytes()
    backup = torch.UntypedStorage(nbytes, device="cpu").copy_(storage) if keep else None
    storage.resize_(0)
    return storage, nbytes, backup
