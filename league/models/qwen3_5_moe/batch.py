"""What a forward of the model is given besides its tokens: the batch's metadata (``ForwardBatch``: sequences,
positions, cache slots, numerics) and the layouts of the caches it reads and writes (``ModelCache``: attention KV
in blocks found through each slot's block table, Gated DeltaNet states per slot, the verify's scratch rows).

These are the model's interface to whoever runs it (the trainer passes a batch and no cache; the engine's model
runner passes both). Not responsible for allocating caches or choosing slots (``engine.cache``, ``engine.scheduler``).

Legend: T packed tokens, N sequences, G KV heads, K head dim, C conv channels, W conv width, Hv value heads.
"""

import itertools
from dataclasses import dataclass

import torch

from league.ops.linear import linear, linear_joined
from league.ops.numerics import FAST, Numerics


@dataclass(kw_only=True, slots=True)
class Pages:
    """Where each slot's positions lie in the paged per-position caches (attention KV, routed experts): position p of
    slot s is row ``p % size`` of block ``table[s, p // size]``. One table serves every layer.

    Args:
        table (torch.Tensor): ``[slots, max_blocks]`` long block ids (on the caches' device).
        size (int): positions per block (the page size).
    """

    table: torch.Tensor
    size: int

    @classmethod
    def contiguous(cls, num_slots: int, max_len: int, device: torch.device | str) -> "Pages":
        """One block of ``max_len`` positions per slot, block s for slot s: a cache laid out by slot."""
        return cls(table=torch.arange(num_slots, device=device)[:, None], size=max_len)

    def rows(self, slots_T: torch.Tensor, positions_T: torch.Tensor) -> torch.Tensor:
        """``[T]`` rows of the caches flattened to ``[blocks * size, ...]`` that hold these (slot, position) pairs
        (device tensors; nothing is read on the host)."""
        return self.table[slots_T, positions_T // self.size] * self.size + positions_T % self.size


@dataclass(kw_only=True, slots=True)
class AttentionCache:
    """Keys (after k_norm and RoPE) and values of one full-attention layer, ``[blocks, page, G, K]``, found through
    ``pages``."""

    k: torch.Tensor
    v: torch.Tensor
    pages: Pages
    routes: torch.Tensor | None = None
    """``[blocks, page, top_k]`` int32: the experts this layer's MoE chose at each cached position (when the engine
    keeps them), paged as the keys; None otherwise."""


@dataclass(kw_only=True, slots=True)
class GDNCache:
    """State of one Gated DeltaNet layer per slot, and scratch rows for verify.

    ``conv`` ``[slots, C, W-1]`` holds the last pre-conv inputs; ``ssm`` ``[slots, Hv, K, V]`` (fp32) the
    recurrent state. A verify leaves both untouched; batch row i writes the conv window after each of its tokens
    into ``conv_steps[i, t]`` ``[rows, steps, C, W-1]``, and the recurrence's inputs, conv outputs
    ``verify_mixed[i, t]`` ``[rows, steps, C]`` and gate projections ``verify_a[i, t]``, ``verify_b[i, t]``
    ``[rows, steps, Hv]``, from which the commit steps the accepted tokens again (a recurrent state is ~2,000x
    the bytes of one token's inputs: a verify and its commit read a state twice and write it once, instead of
    writing it after every token and copying one of them).
    """

    conv: torch.Tensor
    ssm: torch.Tensor
    pages: Pages
    """Where the per-position ``routes`` lie (the states themselves are per slot)."""
    routes: torch.Tensor | None = None
    """As ``AttentionCache.routes``."""
    conv_steps: torch.Tensor | None = None
    verify_mixed: torch.Tensor | None = None
    verify_a: torch.Tensor | None = None
    verify_b: torch.Tensor | None = None


@dataclass(kw_only=True, slots=True)
class ModelCache:
    """Per-layer caches of the trunk and of the MTP head."""

    layers: list[AttentionCache | GDNCache]
    mtp_layers: list[AttentionCache]


@dataclass(kw_only=True, slots=True)
class ForwardBatch:
    """Metadata of one forward over N packed sequences.

    Args:
        cu_seqlens (torch.Tensor): ``[N + 1]`` offsets of each sequence's new tokens in the packed input.
        seq_lens (list[int]): new tokens per sequence (host copy of the differences of ``cu_seqlens``).
        positions (torch.Tensor): ``[T]`` absolute position of each token (for RoPE).
        slots (list[int], Optional): cache slot of each sequence. Default: no cache.
        cache_lens (list[int], Optional): tokens already in the cache for each sequence; 0 starts fresh.
        record_states (bool): verify mode: leave the slots' GDN states untouched, and keep each step's conv
            window and the recurrence's inputs in the scratch rows for :meth:`Transformer.commit_verified`.
            Default: ``False``.
        numerics (Numerics): how every op of the forward computes (``ops.numerics``: fast, batch invariant, or
            decode parity, under which a whole-sequence forward runs the token mixers as decode runs them: the
            recurrent GDN kernel over each sequence, ``ops.gdn.parity``, and the decode attention kernel,
            ``attention.varlen_causal_attention_as_decode``). Default: ``FAST``.
        routed_experts (torch.Tensor, Optional): ``[T, layers, top_k]`` experts each trunk MoE layer uses for each
            token instead of its own choice (routing replay); a row of -1 routes that token as usual. Default: None.

    The remaining fields are device copies that :meth:`packed` fills in one host-to-device transfer, so the
    forward itself never synchronises with the host (a CUDA graph can capture it): ``seq_lens_t`` ``[N]``,
    ``slots_t`` and ``cache_lens_t`` ``[N]`` (with a cache), ``token_slots`` ``[T]`` (each token's slot), and
    ``pad_rows`` ``[T]``, each token's row in the ``[N * longest]`` padded layout (``None`` when every sequence
    has the same length, which needs no padding).
    """

    cu_seqlens: torch.Tensor
    seq_lens: list[int]
    positions: torch.Tensor
    slots: list[int] | None = None
    cache_lens: list[int] | None = None
    record_states: bool = False
    numerics: Numerics = FAST
    routed_experts: torch.Tensor | None = None
    seq_lens_t: torch.Tensor | None = None
    slots_t: torch.Tensor | None = None
    cache_lens_t: torch.Tensor | None = None
    token_slots: torch.Tensor | None = None
    pad_rows: torch.Tensor | None = None

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """A dense projection as this forward's numerics run it (``ops.linear.linear``)."""
        return linear(x, weight, self.numerics)

    def linears(self, x: torch.Tensor, *weights: torch.Tensor) -> list[torch.Tensor]:
        """Projections of one input as :meth:`linear` runs each; one GEMM when the weights are joined
        (``Transformer.join_projections``) and no gradient is needed."""
        return linear_joined(x, weights, self.numerics)

    @classmethod
    def packed(
        cls,
        seq_lens: list[int],
        device: torch.device | str = "cpu",
        cache_lens: list[int] | None = None,
        slots: list[int] | None = None,
        record_states: bool = False,
        numerics: Numerics = FAST,
    ) -> "ForwardBatch":
        """Sequences laid end to end; positions continue from ``cache_lens`` (or start at 0)."""
        num_seqs = len(seq_lens)
        starts = cache_lens or [0] * num_seqs
        longest = max(seq_lens, default=0)
        parts = {
            "positions": [p for s, n in zip(starts, seq_lens) for p in range(s, s + n)],
            "cu_seqlens": list(itertools.accumulate(seq_lens, initial=0)),
            "seq_lens_t": list(seq_lens),
        }
        if slots is not None:
            parts["slots_t"] = list(slots)
            parts["cache_lens_t"] = list(starts)
            parts["token_slots"] = [slot for slot, n in zip(slots, seq_lens) for _ in range(n)]
        if any(n != longest for n in seq_lens):
            parts["pad_rows"] = [i * longest + j for i, n in enumerate(seq_lens) for j in range(n)]
        flat = torch.tensor([v for values in parts.values() for v in values], dtype=torch.long).to(device)
        fields = dict(zip(parts, flat.split([len(v) for v in parts.values()])))
        return cls(
            seq_lens=list(seq_lens),
            slots=slots,
            cache_lens=cache_lens,
            record_states=record_states,
            numerics=numerics,
            **fields,
        )

    @classmethod
    def training(
        cls,
        seq_lens: list[int],
        device: torch.device | str = "cpu",
        numerics: Numerics = FAST,
        routed_experts: torch.Tensor | None = None,
    ) -> "ForwardBatch":
        """Whole sequences from position 0 and no cache: the trainer's, the scorer's and the reference's forward
        (``routed_experts``: replay these experts, see the class)."""
        batch = cls.packed(seq_lens, device, numerics=numerics)
        batch.routed_experts = routed_experts
        return batch

    @classmethod
    def prefill(
        cls,
        seq_lens: list[int],
        cache_lens: list[int],
        slots: list[int],
        device: torch.device | str = "cpu",
        numerics: Numerics = FAST,
    ) -> "ForwardBatch":
        """Chunks written into cache slots, sequence i continuing after the ``cache_lens[i]`` tokens its slot holds
        (0: a fresh prompt): the engine's prompt chunks and MTP rows."""
        return cls.packed(seq_lens, device, cache_lens=cache_lens, slots=slots, numerics=numerics)

    @classmethod
    def decode(
        cls, positions: list[int], slots: list[int], device: torch.device | str = "cpu", numerics: Numerics = FAST
    ) -> "ForwardBatch":
        """One new token per sequence, at ``positions[i]`` (the tokens its slot already holds)."""
        return cls.prefill([1] * len(slots), positions, slots, device, numerics)

    @classmethod
    def continuing(
        cls,
        *,
        width: int,
        positions: torch.Tensor,
        slots_t: torch.Tensor,
        cache_lens_t: torch.Tensor,
        cu_seqlens: torch.Tensor,
        seq_lens_t: torch.Tensor,
        numerics: Numerics = FAST,
        verify: bool = False,
    ) -> "ForwardBatch":
        """``len(slots_t)`` sequences of ``width`` new tokens each, continuing in their slots, from device tensors
        alone (no host value read, so a CUDA graph can capture the forward; ``cu_seqlens`` and ``seq_lens_t`` are the
        caller's fixed buffers for that width). ``verify``: the forward of a speculative verify, which records its
        states instead of committing them (``record_states``)."""
        size = slots_t.shape[0]
        return cls(
            cu_seqlens=cu_seqlens,
            seq_lens=[width] * size,
            positions=positions,
            cache_lens=[1] * size,  # continuing sequences; the lengths themselves are read from cache_lens_t
            seq_lens_t=seq_lens_t,
            slots_t=slots_t,
            cache_lens_t=cache_lens_t,
            token_slots=slots_t[:, None].expand(size, width).reshape(-1),
            record_states=verify,
            numerics=numerics,
        )

    @property
    def max_seqlen(self) -> int:
        return max(self.seq_lens, default=0)

    def sequences(self):
        """Yield ``(i, start, end)`` of each sequence in the packed input."""
        start = 0
        for i, n in enumerate(self.seq_lens):
            yield i, start, start + n
            start += n
