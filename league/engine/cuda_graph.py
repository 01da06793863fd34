"""Captured decode steps: one CUDA graph per batch size replays the model forward and the output head.

A decode step is the same sequence of kernels every time for a given batch size, so launching them one by one
(hundreds per step for a 40-layer model) costs more than running them at small batches. Each graph reads
static input buffers (tokens, positions, slots, cached lengths) that are refilled before a replay; a batch
smaller than a captured size is padded with rows that decode into a scratch slot no request owns. Needs a
forward without host synchronisation (the grouped-GEMM MoE, the batched attention kernels); not used with
``batch_invariant``. Not responsible for sampling, which runs after the replay.

Legend: B batch rows, V vocabulary.
"""

import torch

from league.models.qwen3_5_moe import ForwardBatch, ModelCache, Transformer
from league.ops.moe import grouped_mm_is_native

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256)


def graphs_apply(config, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether an engine with ``config`` (an ``EngineConfig``) decodes through captured graphs: not disabled,
    plain decode (speculative steps are not captured), not ``batch_invariant``, and a forward with no host
    synchronisation, which needs the grouped-GEMM MoE's own kernel (bf16 on Hopper or Blackwell)."""
    return (
        not config.disable_cuda_graph
        and not config.num_spec_steps
        and not config.batch_invariant
        and grouped_mm_is_native(dtype, device)
    )


def default_batch_sizes(max_running_requests: int) -> list[int]:
    """SGLang-like sizes up to the most requests that run at once (which is always included)."""
    sizes = [b for b in DEFAULT_BATCH_SIZES if b < max_running_requests]
    return [*sizes, max_running_requests]


class DecodeGraphs:
    """Decode forwards captured for ``batch_sizes``.

    Args:
        model (Transformer): the model (its weights are read in place at each replay: updating them in place,
            as weight sync does, needs no recapture).
        cache (ModelCache): the engine's cache; slot ``scratch_slot`` must exist and belong to no request.
        batch_sizes (list[int]): sizes to capture; a batch runs in the smallest size that holds it.
        scratch_slot (int): where padding rows write their keys and states (all of them the same slot: they start
            fresh, and nothing reads what they leave there).
    """

    def __init__(self, model: Transformer, cache: ModelCache, batch_sizes: list[int], scratch_slot: int):
        self.model, self.cache = model, cache
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
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = None
        for size in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory pool
            self._capture(size)

    def _batch(self, size: int) -> ForwardBatch:
        return ForwardBatch(
            cu_seqlens=self.cu_seqlens[: size + 1],
            seq_lens=[1] * size,
            positions=self.positions[:size],
            slots=[self.scratch_slot] * size,
            cache_lens=[1] * size,  # continuing sequences (the lengths themselves are read from cache_lens_t)
            seq_lens_t=self.ones[:size],
            slots_t=self.slots[:size],
            cache_lens_t=self.positions[:size],  # one new token each: its position is its cached length
            token_slots=self.slots[:size],
        )

    def _forward(self, size: int) -> None:
        hidden = self.model(self.tokens[:size], self._batch(size), self.cache)
        torch.mm(hidden, self.model.output_weight().t(), out=self.logits[:size])

    @torch.no_grad()
    def _capture(self, size: int) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # compile and autotune kernels outside the capture
            for _ in range(2):
                self._forward(size)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self._forward(size)
        self.pool = graph.pool()
        self.graphs[size] = graph

    def fits(self, batch: int) -> bool:
        return batch <= self.sizes[-1]

    @torch.no_grad()
    def run(self, tokens: list[int], positions: list[int], slots: list[int]) -> torch.Tensor:
        """Decode one token for each of B requests (``positions`` = tokens already cached); ``[B, V]`` logits,
        valid until the next replay."""
        batch = len(tokens)
        size = next(s for s in self.sizes if s >= batch)
        pad = size - batch
        host = torch.tensor(
            [[*tokens, *[0] * pad], [*positions, *[0] * pad], [*slots, *[self.scratch_slot] * pad]], dtype=torch.long
        )
        staged = host.to(self.tokens.device, non_blocking=True)
        self.tokens[:size].copy_(staged[0])
        self.positions[:size].copy_(staged[1])
        self.slots[:size].copy_(staged[2])
        self.graphs[size].replay()
        return self.logits[:batch]
