"""Captured decode steps: per batch size, a few CUDA graphs replay the model forward and the output head
(speculative steps are captured the same way, by ``speculative.SpeculativeStep`` through :func:`capture_pieces`).

A decode step is the same sequence of kernels every time for a given batch size, so launching them one by one
(hundreds per step for a 40-layer model) costs more than running them at small batches. Each graph reads
static input buffers (tokens, positions, slots, cached lengths) that are refilled before a replay; a batch
smaller than a captured size is padded with rows that decode into a scratch slot no request owns. Needs a
forward without host synchronisation (the grouped-GEMM MoE, the batched attention kernels); not used with
row-by-row numerics. Not responsible for sampling, which runs after the replay.

Legend: B batch rows, V vocabulary.
"""

import torch

from league.models.qwen3_5_moe import ForwardBatch, ModelCache, Transformer
from league.ops.moe import grouped_mm_is_native
from league.ops.numerics import FAST, Numerics

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256)


def graphs_apply(config, numerics: Numerics, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether an engine with ``config`` (an ``EngineConfig``) decodes (or drafts and verifies) through captured
    graphs: not disabled, numerics not row by row, and a forward with no host synchronisation, which needs the
    grouped-GEMM MoE's own kernel (bf16 on Hopper or Blackwell) and the experts on this rank (an engine with
    ``ep_size`` > 1 finds the pairs of its block of experts on the host: ``parallel.inference``)."""
    if config.disable_cuda_graph or numerics.row_by_row or config.ep_size > 1:
        return False
    return grouped_mm_is_native(dtype, device)


def default_batch_sizes(max_running_requests: int) -> list[int]:
    """SGLang-like sizes up to the most requests that run at once (which is always included)."""
    sizes = [b for b in DEFAULT_BATCH_SIZES if b < max_running_requests]
    return [*sizes, max_running_requests]


def layer_runs(num_layers: int) -> list[range]:
    """The layers of each captured piece, in runs of 2, 4, 8, 16, ... layers: launching a graph takes host time in
    proportion to its kernels, and the GPU waits only for the launch of the first (small) piece; each later
    launch is hidden behind the run of the piece before it, which has half its kernels but takes far longer
    to run than to launch."""
    runs, start, length = [], 0, 2
    while start < num_layers:
        runs.append(range(start, min(start + length, num_layers)))
        start, length = start + length, 2 * length
    return runs


def layer_pieces(model: Transformer, cache: ModelCache, state: dict) -> list:
    """The decoder layers of a captured step as pieces (one graph each, in :func:`layer_runs`), each reading and
    writing ``state["x"]`` with ``state["batch"]`` and ``state["rope"]``: the middle of every captured step, between
    the piece that embeds its tokens and the one that runs its output head."""

    def run_layers(run: range):
        def piece() -> None:
            state["x"] = model.forward_layers(state["x"], state["batch"], state["rope"], cache, run)

        return piece

    return [run_layers(run) for run in layer_runs(len(model.layers))]


def capture_pieces(pieces: list, pool=None) -> tuple[list, object]:
    """One CUDA graph per function of ``pieces`` (run in order at each replay), sharing the memory pool ``pool``
    (or a new one); returns the graphs and the pool. The pieces run twice first, on a side stream, so that
    kernels compile and autotune outside the capture."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(stream):
        for _ in range(2):
            for piece in pieces:
                piece()
    torch.cuda.current_stream().wait_stream(stream)
    graphs = []
    with torch.no_grad():
        for piece in pieces:  # captured in replay order, sharing one memory pool
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                piece()
            pool = graph.pool()
            graphs.append(graph)
    return graphs, pool


class DecodeGraphs:
    """Decode forwards captured for ``batch_sizes``.

    Args:
        model (Transformer): the model (its weights are read in place at each replay: updating them in place,
            as weight sync does, needs no recapture).
        cache (ModelCache): the engine's cache; slot ``scratch_slot`` must exist and belong to no request.
        batch_sizes (list[int]): sizes to capture; a batch runs in the smallest size that holds it.
        scratch_slot (int): where padding rows write their keys and states (all of them the same slot: they start
            fresh, and nothing reads what they leave there).
        numerics (Numerics): the forwards' numerics. Default: ``FAST``.
    """

    def __init__(
        self,
        model: Transformer,
        cache: ModelCache,
        batch_sizes: list[int],
        scratch_slot: int,
        numerics: Numerics = FAST,
    ):
        self.model, self.cache, self.numerics = model, cache, numerics
        self.sizes = sorted(set(batch_sizes))
        self.scratch_slot = scratch_slot
        device = next(model.parameters()).device
        largest = self.sizes[-1]
        self.tokens = torch.zeros(largest, dtype=torch.long, device=device)
        self.positions = torch.zeros(largest, dtype=torch.long, device=device)
        self.slots = torch.full((largest,), scratch_slot, dtype=torch.long, device=device)
        self.ones = torch.ones(largest, dtype=torch.long, device=device)
        self.cu_seqlens = torch.arange(largest + 1, dtype=torch.long, device=device)
        dtype = next(model.parameters()).dtype
        self.logits = torch.empty(largest, model.args.vocab_size, dtype=dtype, device=device)  # shared by all sizes
        self.hidden = torch.empty(largest, model.args.dim, dtype=dtype, device=device)  # after the final norm
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        self.pool = None
        for size in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory pool
            self._capture(size)

    def _batch(self, size: int) -> ForwardBatch:
        """``size`` one-token sequences from the captured buffers: each token's position is its cached length."""
        return ForwardBatch.continuing(
            width=1,
            positions=self.positions[:size],
            slots_t=self.slots[:size],
            cache_lens_t=self.positions[:size],
            cu_seqlens=self.cu_seqlens[: size + 1],
            seq_lens_t=self.ones[:size],
            numerics=self.numerics,
        )

    def _pieces(self, size: int) -> list:
        """The decode forward as functions run in order, each one graph: embedding and the first layers, more
        layers, ..., the final norm and the output head. Each piece hands its output to the next through
        ``state``, which keeps the captured tensors alive between replays."""
        model, state = self.model, {"batch": self._batch(size)}

        def first() -> None:
            state["x"], state["rope"] = model.embed(self.tokens[:size], state["batch"])

        def head() -> None:
            self.hidden[:size] = model.norm(state["x"])
            torch.mm(self.hidden[:size], model.output_weight().t(), out=self.logits[:size])

        return [first, *layer_pieces(model, self.cache, state), head]

    def _capture(self, size: int) -> None:
        self.graphs[size], self.pool = capture_pieces(self._pieces(size), self.pool)

    def fits(self, batch: int) -> bool:
        return batch <= self.sizes[-1]

    @torch.no_grad()
    def run(self, tokens: torch.Tensor, positions: list[int], slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode one token for each of B requests: ``tokens`` ``[B]`` on the device, ``positions`` = tokens
        already cached; ``([B, V] logits, [B, D] hidden states after the final norm)``, valid until the next replay.
        Nothing waits for the device."""
        batch = len(positions)
        size = next(s for s in self.sizes if s >= batch)
        pad = size - batch
        host = torch.tensor([[*positions, *[0] * pad], [*slots, *[self.scratch_slot] * pad]], dtype=torch.long)
        staged = host.to(self.tokens.device, non_blocking=True)
        self.tokens[:batch].copy_(tokens)
        self.tokens[batch:size].zero_()
        self.positions[:size].copy_(staged[0])
        self.slots[:size].copy_(staged[1])
        for graph in self.graphs[size]:
            graph.replay()
        return self.logits[:batch], self.hidden[:batch]
