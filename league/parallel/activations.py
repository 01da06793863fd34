"""An analytic estimate of one micro-batch's activations on a rank in the training forward and backward, from the
model's dimensions and the layout's token group (for the memory plan, ``plan``). An estimate, not a measurement: the
formula and its assumptions are in :func:`activation_estimate`.
"""

from dataclasses import dataclass

from league.models.qwen3_5_moe import ModelArgs

LOGPROB_CHUNK_ROWS = 1024
"""Rows of logits the fused log-prob computes at once (``ops.logprob.linear_token_logprobs``' ``chunk_size``)."""


@dataclass(kw_only=True, frozen=True, slots=True)
class ActivationEstimate:
    """Bytes of one micro-batch's activations on one rank, by part (:func:`activation_estimate`).

    Args:
        kept (int): what the forward keeps for the backward: each layer's input with recompute, each layer's saved
            tensors without.
        layer (int): one decoder layer's saved tensors (the largest kind), recomputed in its backward.
        head (int): the output head's and the losses' buffers.
        rows (int): rows of the micro-batch on this rank (the layers' MoE and norms run on them).
    """

    kept: int
    layer: int
    head: int
    rows: int

    @property
    def total(self) -> int:
        """What is kept, one layer's saved tensors and as much again for the gradients its backward makes (an upper
        end), and the head's buffers."""
        return self.kept + 2 * self.layer + self.head


def layer_bytes(args: ModelArgs, kind: str, rows: int, group: int, itemsize: int) -> int:
    """One decoder layer's saved tensors (:func:`activation_estimate`), its mixer being ``kind``."""
    s, dim, gathered = itemsize, args.dim, rows * group
    norms = 2 * rows * (dim * s + 4)
    if kind == "full_attention":
        kv_heads = max(1, args.num_kv_heads // group)
        per_row = (dim + 6 * args.num_heads * args.head_dim // group + 3 * kv_heads * args.head_dim) * s
        mixer = gathered * (per_row + 4 * args.num_heads // group)
    else:
        channels = 3 * args.gdn_conv_dim + 2 * args.gdn_key_dim + 3 * args.gdn_value_dim
        heads = args.linear_num_value_heads
        mixer = gathered * ((dim + (channels + 2 * heads) // group) * s + 8 * heads // group)
    pair = (2 * dim + 3 * args.moe_intermediate_size) * s + 12
    moe = rows * (
        (dim + 3 * args.shared_expert_intermediate_size + 1) * s
        + 4 * args.num_experts
        + args.num_experts_per_tok * pair
    )
    return norms + mixer + moe


def activation_estimate(
    args: ModelArgs, num_tokens: int, group: int, recompute: bool, itemsize: int
) -> ActivationEstimate:
    """An analytic estimate of one micro-batch's activations on a rank, for the training forward and backward.

    A micro-batch of ``num_tokens`` tokens T is shared by a token group of ``group`` ranks G (head parallelism):
    each rank holds R = ceil(T / G) rows, on which the embedding, the norms and the MoE run, and each token mixer
    runs 1/G of its heads over the group's G R gathered rows. With s = ``itemsize`` bytes an element (the
    parameters' dtype; fp32 where named), D the width, and the counts per row:

    - kept by the forward: with recompute, each decoder layer's input (trunk and MTP), the embedding's output and
      the MTP head's inputs: ``(L + L_mtp + 5) R D s``; without it, every layer's saved tensors (below).
    - one layer's saved tensors, recomputed in its backward (the larger of the two kinds):
      the two norms' inputs and fp32 rstd ``2 R (D s + 4)``;
      Gated DeltaNet over the gathered rows: its gathered input ``D s``, the projections, the conv's input and
      output and its activation, q and k normalised, the recurrence's output, z and the gated norm's output,
      ``(3 C + 2 Hk K + 3 Hv V + 2 Hv) / G`` elements (C = 2 Hk K + Hv V, the conv channels), and the fp32 gates
      ``8 Hv / G`` bytes; gated attention: ``D + (6 H K) / G + 3 g K`` elements (queries and gates, their norm and
      rotation, the output, the sigmoid and the gated output; g the KV heads a rank reads, Hkv / G but at least 1)
      and the fp32 log-sum-exp ``4 H / G``; the MoE over the rank's rows: ``(D + 3 I_s + 1) s`` (the norm's output,
      the shared expert's gate, up and product), the router's fp32 softmax ``4 E``, and per token-expert pair
      (A a row) the dispatched row, its gate/up and activation, its output, its weight and expert index,
      ``(2 D + 3 I) s + 12``.
      The backward makes as much again in gradients at most; :attr:`ActivationEstimate.total` counts both.
    - the output head and the losses, on all T rows on every rank of a group: the gathered final hidden states and
      their fp32 gradient ``T D (2 s + 4)``, and one block of logits of C = 1024 rows (the fused log-prob's chunk)
      over the vocabulary, ``C V (s + 8)`` (the linear's output, its fp32 copy and the probabilities, as the torch
      path holds them; the Triton path holds less).

    An estimate: it assumes balanced routing (under expert parallelism a rank computes its experts' pairs, A R on
    average; a skewed router sends it more), the micro-batch full to its budget, and the kernels' saved tensors as
    listed (the GPU's fla and flash kernels save a few more small ones, the CPU's reference ops much more).
    """
    rows = -(-num_tokens // group)
    s, dim = itemsize, args.dim
    kinds = [*args.layer_types, *["full_attention"] * args.mtp_num_layers]
    layers = {kind: layer_bytes(args, kind, rows, group, s) for kind in set(kinds)}
    if recompute:
        kept = (len(kinds) + 5) * rows * dim * s
    else:
        kept = sum(layers[kind] for kind in kinds)
    head = num_tokens * dim * (2 * s + 4) + min(LOGPROB_CHUNK_ROWS, num_tokens) * args.vocab_size * (s + 8)
    return ActivationEstimate(kept=kept, layer=max(layers.values()), head=head, rows=rows)
