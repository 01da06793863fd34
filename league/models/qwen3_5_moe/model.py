"""The Qwen3.5 / Qwen3.6 MoE text model, single-device code.

One forward serves training (packed variable-length sequences, ``cu_seqlens``, no cache) and the
engine (each sequence continues from a cache slot: prefill, decode, or verify, which reads the GDN states without
committing them and keeps its inputs, so that :meth:`Transformer.commit_verified` commits the accepted prefix).
Knows nothing of parallelism, of how cache slots are allocated, or of sampling.

Legend: T packed tokens, N sequences, D model dim, V vocabulary, H query heads, G KV heads, K head dim.
"""

import math
from collections.abc import Callable

import torch
from torch import nn

from league.models.qwen3_5_moe.args import ModelArgs
from league.models.qwen3_5_moe.batch import AttentionCache, ForwardBatch, GDNCache, ModelCache
from league.models.qwen3_5_moe.gated_deltanet import GatedDeltaNet
from league.ops.activations import add_gated, sigmoid, silu_mul
from league.ops.attention import cached_attention, varlen_causal_attention, varlen_causal_attention_as_decode
from league.ops.linear import join_rows, linear, linear_joined
from league.ops.moe import renormalised_weights, route_topk, swiglu_experts
from league.ops.norm import rms_norm
from league.ops.numerics import FAST, Numerics
from league.ops.rope import apply_rope, rope_cos_sin, rope_inv_freq


class RMSNorm(nn.Module):
    """Zero-centred ``(1 + w)`` RMSNorm."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class GatedAttention(nn.Module):
    """Full attention with q/k RMSNorm, partial RoPE, GQA and a sigmoid output gate from ``wq``."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        # wq's output is per head [query (K) | gate (K)], interleaved head by head
        self.wq = nn.Linear(args.dim, 2 * args.num_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.num_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.num_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.num_heads * args.head_dim, args.dim, bias=False)
        self.q_norm = RMSNorm(args.head_dim, args.norm_eps)
        self.k_norm = RMSNorm(args.head_dim, args.norm_eps)

    def forward(
        self,
        x_TD: torch.Tensor,
        batch: ForwardBatch,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: AttentionCache | None,
    ) -> torch.Tensor:
        return batch.linear(self.heads(x_TD, batch, rope, cache), self.wo.weight)

    def heads(
        self,
        x_TD: torch.Tensor,
        batch: ForwardBatch,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: AttentionCache | None,
    ) -> torch.Tensor:
        """The gated heads' outputs, ``[T, H * K]`` head by head: what ``wo`` projects."""
        num_tokens, numerics = x_TD.shape[0], batch.numerics
        q_and_gate, k_TG, v_TG = batch.linears(x_TD, self.wq.weight, self.wk.weight, self.wv.weight)
        q_THK, gate_THK = q_and_gate.view(num_tokens, self.num_heads, 2 * self.head_dim).chunk(2, dim=-1)
        k_TGK = k_TG.view(num_tokens, self.num_kv_heads, self.head_dim)
        v_TGK = v_TG.view(num_tokens, self.num_kv_heads, self.head_dim)
        cos, sin = rope
        q_THK = apply_rope(self.q_norm(q_THK), cos, sin)
        k_TGK = apply_rope(self.k_norm(k_TGK), cos, sin)
        scale = self.head_dim**-0.5
        if cache is not None:  # a token's cache row: its position in its slot's blocks
            rows_T = cache.pages.rows(batch.token_slots, batch.positions)
            cache.k.flatten(0, 1)[rows_T] = k_TGK.to(cache.k.dtype)
            cache.v.flatten(0, 1)[rows_T] = v_TGK.to(cache.v.dtype)
        fresh = cache is None or not any(batch.cache_lens)
        if fresh and not numerics.as_decode:  # fresh sequences: their own keys are all the keys
            out_THK = varlen_causal_attention(q_THK, k_TGK, v_TGK, batch.cu_seqlens, batch.max_seqlen, scale, numerics)
        elif cache is None:  # decode parity in training: the decode kernel over the packed keys
            out_THK = varlen_causal_attention_as_decode(q_THK, k_TGK, v_TGK, batch.cu_seqlens, batch.max_seqlen, scale)
        else:
            kv_lens_N = batch.cache_lens_t + batch.seq_lens_t
            max_kv = max(c + n for c, n in zip(batch.cache_lens, batch.seq_lens))
            out_THK = cached_attention(
                q_THK,
                cache.k,
                cache.v,
                batch.cu_seqlens,
                batch.slots_t,
                kv_lens_N,
                scale,
                batch.max_seqlen,
                max_kv,
                numerics=numerics,
                pages=cache.pages,
            )
        return out_THK.reshape(num_tokens, -1) * sigmoid(gate_THK.reshape(num_tokens, -1), numerics)


class Experts(nn.Module):
    """Routed SwiGLU experts held as fused 3-D weights."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w_gate_up = nn.Parameter(torch.empty(args.num_experts, 2 * args.moe_intermediate_size, args.dim))
        self.w_down = nn.Parameter(torch.empty(args.num_experts, args.dim, args.moe_intermediate_size))

    def forward(
        self, x_TD: torch.Tensor, weights_TA: torch.Tensor, experts_TA: torch.Tensor, numerics: Numerics = FAST
    ) -> torch.Tensor:
        """``sum_a weights[t, a] * expert_{experts[t, a]}(x[t])`` (``ops.moe.swiglu_experts``). The one call into
        the experts, so that placing them elsewhere (expert parallelism) replaces this method alone."""
        return swiglu_experts(x_TD, self.w_gate_up, self.w_down, weights_TA, experts_TA, numerics)


class SwiGLU(nn.Module):
    """The shared expert's weights, ``down(silu(gate(x)) * up(x))``; ``MoE.forward`` runs it, its gate and up
    projections beside the router's."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Linear(dim, hidden, bias=False)
        self.w_up = nn.Linear(dim, hidden, bias=False)
        self.w_down = nn.Linear(hidden, dim, bias=False)


class MoE(nn.Module):
    """Sparse MoE: fp32 softmax router, renormalised top-k, SwiGLU experts, sigmoid-gated shared expert."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = args.num_experts_per_tok
        self.router = nn.Linear(args.dim, args.num_experts, bias=False)
        self.experts = Experts(args)
        self.shared = SwiGLU(args.dim, args.shared_expert_intermediate_size)
        self.shared_gate = nn.Linear(args.dim, 1, bias=False)

    def forward(
        self,
        x_TD: torch.Tensor,
        numerics: Numerics = FAST,
        replay_TA: torch.Tensor | None = None,
        record: Callable[[torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """The dense projections (router, shared expert and its gate) run as the numerics run dense projections.
        ``replay_TA``: experts to use instead of the router's top-k (rows of -1: the router's), weighted by the
        router's renormalised probabilities of them (so the router still gets its gradient); ``record`` receives
        the experts used."""
        shared = self.shared
        router_TE, shared_gate_TI, shared_up_TI, gate_T1 = linear_joined(
            x_TD, (self.router.weight, shared.w_gate.weight, shared.w_up.weight, self.shared_gate.weight), numerics
        )
        weights, experts = route_topk(router_TE, self.top_k)
        if replay_TA is not None:
            experts = torch.where(replay_TA >= 0, replay_TA.to(experts.dtype), experts)
            weights = renormalised_weights(router_TE, experts)
        if record is not None:
            record(experts)
        routed = self.experts(x_TD, weights, experts, numerics)
        shared_TD = linear(silu_mul(shared_gate_TI, shared_up_TI, numerics), shared.w_down.weight, numerics)
        return add_gated(routed, gate_T1, shared_TD, numerics)


class DecoderLayer(nn.Module):
    """Pre-norm block: token mixer (gated attention or Gated DeltaNet) then the MoE, each with a residual."""

    def __init__(self, args: ModelArgs, layer_type: str, index: int | None = None):
        super().__init__()
        self.layer_type = layer_type
        self.index = index
        """Position among the trunk's layers (None in the MTP head): which column of routing replay is its."""
        self.attn_norm = RMSNorm(args.dim, args.norm_eps)
        if layer_type == "full_attention":
            self.attn = GatedAttention(args)
        else:
            self.gdn = GatedDeltaNet(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.moe = MoE(args)

    def forward(
        self,
        x_TD: torch.Tensor,
        batch: ForwardBatch,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: AttentionCache | GDNCache | None,
    ) -> torch.Tensor:
        h = self.attn_norm(x_TD)
        if self.layer_type == "full_attention":
            x_TD = x_TD + self.attn(h, batch, rope, cache)
        else:
            x_TD = x_TD + self.gdn(h, batch, cache)
        replay = None if batch.routed_experts is None or self.index is None else batch.routed_experts[:, self.index]
        record = None
        if cache is not None and cache.routes is not None:

            def record(experts_TA: torch.Tensor) -> None:
                rows_T = cache.pages.rows(batch.token_slots, batch.positions)
                cache.routes.flatten(0, 1)[rows_T] = experts_TA.to(cache.routes.dtype)

        return x_TD + self.moe(self.ffn_norm(x_TD), batch.numerics, replay, record)


class MTP(nn.Module):
    """Multi-token prediction head: row j pairs the trunk's final hidden state at j with token j+1 and
    predicts token j+2 through the shared output head.

    ``u = fc([embed_norm(embed(x_{j+1})), hidden_norm(h_j)])`` -> full-attention MoE layer(s) -> ``norm``.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_norm = RMSNorm(args.dim, args.norm_eps)
        self.hidden_norm = RMSNorm(args.dim, args.norm_eps)
        self.fc = nn.Linear(2 * args.dim, args.dim, bias=False)
        self.layers = nn.ModuleList(DecoderLayer(args, "full_attention") for _ in range(args.mtp_num_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)

    def forward(
        self,
        embeds_TD: torch.Tensor,
        hidden_TD: torch.Tensor,
        batch: ForwardBatch,
        rope: tuple[torch.Tensor, torch.Tensor],
        caches: list[AttentionCache] | None,
    ) -> torch.Tensor:
        joined = torch.cat([self.embed_norm(embeds_TD), self.hidden_norm(hidden_TD)], dim=-1)
        x_TD = batch.linear(joined, self.fc.weight)
        for j, layer in enumerate(self.layers):
            x_TD = layer(x_TD, batch, rope, None if caches is None else caches[j])
        return self.norm(x_TD)


class Transformer(nn.Module):
    """The trunk (embedding, decoder layers, final norm), the output head and the MTP head."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(DecoderLayer(args, kind, i) for i, kind in enumerate(args.layer_types))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = None if args.tie_word_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)
        self.mtp = MTP(args) if args.mtp_num_layers > 0 else None
        self.register_buffer("inv_freq", rope_inv_freq(args.rotary_dim, args.rope_theta), persistent=False)

    def _apply(self, fn, recurse=True):
        """``Module.to(dtype)`` casts buffers too: the RoPE frequencies are remade in fp32 rather than kept in
        bf16/fp16, whose rounding would shift the rotation angles at long positions (fp64 is kept)."""
        super()._apply(fn, recurse)
        if self.inv_freq.dtype in (torch.bfloat16, torch.float16):
            device = self.inv_freq.device
            self.inv_freq = rope_inv_freq(self.args.rotary_dim, self.args.rope_theta).to(device)
        return self

    def rope(self, positions_T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_cos_sin(positions_T, self.inv_freq)

    def forward(self, tokens_T: torch.Tensor, batch: ForwardBatch, cache: ModelCache | None = None) -> torch.Tensor:
        """Hidden states after the final norm, ``[T, D]`` (the input of the output head and of the MTP head).

        Args:
            tokens_T (torch.Tensor): ``[T]`` packed token ids.
            batch (ForwardBatch): how the tokens split into sequences, their positions and cache slots.
            cache (ModelCache, Optional): read and written per ``batch``. Default: no cache (training).
        """
        x_TD, rope = self.embed(tokens_T, batch)
        x_TD = self.forward_layers(x_TD, batch, rope, cache, range(len(self.layers)))
        return self.norm(x_TD)

    def embed(self, tokens_T: torch.Tensor, batch: ForwardBatch) -> tuple[torch.Tensor, tuple]:
        """The first part of :meth:`forward`: token embeddings and the rotary cos/sin of the batch's positions."""
        return self.tok_embeddings(tokens_T), self.rope(batch.positions)

    def forward_layers(
        self, x_TD: torch.Tensor, batch: ForwardBatch, rope: tuple, cache: ModelCache | None, layers: range
    ) -> torch.Tensor:
        """The decoder layers ``layers`` of :meth:`forward` (a contiguous run; the engine captures a decode step
        as several CUDA graphs, so the GPU starts on the first while the next ones are launched)."""
        for i in layers:
            x_TD = self.layers[i](x_TD, batch, rope, None if cache is None else cache.layers[i])
        return x_TD

    def commit_verified(
        self,
        cache: ModelCache,
        slots_B: torch.Tensor,
        accepted_B: torch.Tensor,
        numerics: Numerics = FAST,
        rows_B: torch.Tensor | None = None,
    ) -> None:
        """After a verify forward (``ForwardBatch.record_states``) of B rows, commit each row's GDN conv windows and
        states at its last accepted token ``accepted_B[b]`` (0 keeps the first token) into slot ``slots_B[b]``
        (``[B]`` long tensors on the cache's device; nothing is read back). Attention caches need no commit: keys
        past a sequence's length are never read and are overwritten. ``rows_B``: only these rows of the verify
        (``GatedDeltaNet.commit_verified``)."""
        for layer, layer_cache in zip(self.layers, cache.layers):
            if layer.layer_type != "full_attention":
                layer.gdn.commit_verified(layer_cache, slots_B, accepted_B, numerics, rows_B)

    def output_weight(self) -> torch.Tensor:
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def logits(self, hidden_TD: torch.Tensor, numerics: Numerics = FAST) -> torch.Tensor:
        """``[T, V]`` logits in the parameters' dtype."""
        return linear(hidden_TD, self.output_weight(), numerics.plain_gemm())

    def mtp_forward(
        self,
        hidden_TD: torch.Tensor,
        next_tokens_T: torch.Tensor,
        batch: ForwardBatch,
        cache: ModelCache | None = None,
        detach_trunk: bool = False,
    ) -> torch.Tensor:
        """The MTP head's output (after ``mtp.norm``) for rows pairing ``hidden[j]`` with ``next_tokens[j]``.

        Args:
            hidden_TD (torch.Tensor): trunk hidden states after the final norm (or the previous draft
                step's MTP output, when chaining drafts).
            next_tokens_T (torch.Tensor): the token after each row's position.
            batch (ForwardBatch): positions are those of the hidden states (row j at position j).
            cache (ModelCache, Optional): the MTP layers' KV caches are read and written.
            detach_trunk (bool): cut the gradient to the embedding and to ``hidden`` (MTP training reaches
                only MTP parameters). Default: ``False``.
        """
        if self.mtp is None:
            raise ValueError("this model has no MTP head (mtp_num_hidden_layers is 0)")
        embeds_TD = self.tok_embeddings(next_tokens_T)
        if detach_trunk:
            embeds_TD, hidden_TD = embeds_TD.detach(), hidden_TD.detach()
        return self.mtp(
            embeds_TD, hidden_TD, batch, self.rope(batch.positions), None if cache is None else cache.mtp_layers
        )

    def mtp_logits(
        self, mtp_hidden_TD: torch.Tensor, detach_head: bool = False, numerics: Numerics = FAST
    ) -> torch.Tensor:
        """Logits of the MTP head through the shared output head (detached from it if asked)."""
        weight = self.output_weight()
        return linear(mtp_hidden_TD, weight.detach() if detach_head else weight, numerics.plain_gemm())

    def join_projections(self) -> None:
        """Put the weights of each group of projections of one input (a GDN mixer's qkv, z, a, b; attention's q,
        k, v; the router and the shared expert's gate and up of each MoE), trunk and MTP layers, end to end in one
        buffer, so that forwards without gradients run each group as one GEMM (``ops.linear.linear_joined``).
        Values and parameter names are unchanged; meant for the engine's model. (The shared expert's one-column
        gate joins the router's group, whose buffer ``join_rows`` pads to a multiple of 8 rows.)"""
        layers = [*self.layers, *(self.mtp.layers if self.mtp is not None else ())]
        for layer in layers:
            if layer.layer_type == "full_attention":
                groups = [(layer.attn.wq, layer.attn.wk, layer.attn.wv)]
            else:
                groups = [(layer.gdn.w_qkv, layer.gdn.w_z, layer.gdn.w_a, layer.gdn.w_b)]
            moe = layer.moe
            groups.append((moe.router, moe.shared.w_gate, moe.shared.w_up, moe.shared_gate))
            for group in groups:
                join_rows([m.weight for m in group])

    @torch.no_grad()
    def init_weights(self, seed: int, std: float = 0.02) -> None:
        """Random initialisation of every parameter by :func:`init_parameter`, in ``named_parameters`` order
        from one generator seeded with ``seed``."""
        gen = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            p.copy_(init_parameter(name, p.shape, gen, std))


def init_parameter(name: str, shape: torch.Size, generator: torch.Generator, std: float = 0.02) -> torch.Tensor:
    """The fp32 initial value of one parameter, as the published family initialises it: normal(0, std)
    matrices, zero (1+w) norms, ones for the GDN gated norm and dt_bias, ``A_log = log(U(0.01, 16))``,
    ``U(-1/sqrt(W), 1/sqrt(W))`` conv kernels.

    A pure function of the name, the shape and the generator's state, so that ``league init`` can stream a
    checkpoint tensor by tensor and get the same numbers as :meth:`Transformer.init_weights`.

    Args:
        name (str): league parameter name (only its last component matters).
        shape (torch.Size): the parameter's shape.
        generator (torch.Generator): CPU generator, advanced by the draw.
        std (float): standard deviation of the matrices. Default: ``0.02``.
    """
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "A_log":
        return torch.empty(shape, dtype=torch.float32).uniform_(0.01, 16.0, generator=generator).log()
    if leaf in ("dt_bias", "norm_weight"):
        return torch.ones(shape, dtype=torch.float32)
    if leaf == "conv_weight":
        bound = 1.0 / math.sqrt(shape[-1])
        return torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
    if len(shape) == 1:
        return torch.zeros(shape, dtype=torch.float32)
    return torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=generator)
