"""Head parallelism (league's TP and CP): the ranks of a token group (``--tp`` x ``--cp`` of them) share each
micro-batch, split its packed tokens into equal row blocks everywhere, and split the mixers' heads.

In one decoder layer, on rank g of a group of G:

- the norms, the MoE (router, experts, shared expert) and the residual run on the rank's T/G rows;
- each token mixer (gated attention, Gated DeltaNet) gathers its input rows from the group, runs its g-th share of
  the heads over every row (whole sequences, so GDN's conv and recurrence and causal attention need nothing from
  another rank), projects them out through its share of ``wo``'s columns, and the group sums the partial outputs
  and scatters the rows back (a reduce-scatter).

The embedding runs on the rank's rows; the final hidden states are gathered whole, so the output head, the
log-probs and the losses see every row on every rank of the group (each rank's loss is scaled by 1/G, which the
trainer does, so the gradients add up to one process's). The packed rows are padded to a multiple of G with one
extra sequence that nothing reads. TP and CP are one mechanism here: heads split over tp x cp ranks, rows split over
the same ranks; parameters are sharded by FSDP2 (``parallelize``), and each mixer takes its heads' rows (or
columns) of the whole weights FSDP gathers for the layer.

The model's code does not change: the mixers' ``forward``, the model's ``forward`` and ``mtp_forward`` are replaced
on the instances, and a mixer's share runs as the same module class built for its head counts
(``torch.func.functional_call`` with the selected weights). Not responsible for the token group's ranks (``launch``)
or for the loss scale (the trainer).
"""

import functools
import types
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from league.models.qwen3_5_moe import ModelArgs, Transformer
from league.models.qwen3_5_moe.batch import ForwardBatch
from league.models.qwen3_5_moe.gated_deltanet import GatedDeltaNet
from league.models.qwen3_5_moe.model import GatedAttention


@dataclass(frozen=True, slots=True)
class HeadShare:
    """Rank ``rank``'s share of a mixer's heads among ``size`` ranks: the mixer's arguments for that many heads, and
    for each parameter the rows (dim 0) or columns (dim 1) of the whole weight it takes (``None``: all of it)."""

    args: ModelArgs
    rows: dict[str, list[range] | None]
    columns: dict[str, range]


def check_head_split(args: ModelArgs, size: int) -> None:
    """The heads split over ``size`` ranks: query, key and value heads of GDN and query heads of attention in equal
    shares; attention's KV heads either split too or each rank's query heads share one."""
    needs = {
        "attention query heads (num_attention_heads)": args.num_heads,
        "GDN key heads (linear_num_key_heads)": args.linear_num_key_heads,
        "GDN value heads (linear_num_value_heads)": args.linear_num_value_heads,
    }
    for what, count in needs.items():
        if count % size:
            raise ValueError(f"tp x cp = {size} does not divide the model's {count} {what}; choose a divisor of it")
    kv = args.num_kv_heads
    if kv % size and size % kv:
        raise ValueError(
            f"tp x cp = {size} and the model's {kv} KV heads (num_key_value_heads): one must divide the other"
        )


def gdn_share(args: ModelArgs, rank: int, size: int) -> HeadShare:
    """Key heads ``[rank hk, (rank + 1) hk)`` and value heads ``[rank hv, (rank + 1) hv)`` (hk = Hk / size, hv = Hv /
    size): value head j reads key head j // (Hv / Hk), so contiguous shares keep the grouping."""
    k, v = args.linear_key_head_dim, args.linear_value_head_dim
    hk, hv = args.linear_num_key_heads // size, args.linear_num_value_heads // size
    key_dim = args.linear_num_key_heads * k
    q = range(rank * hk * k, (rank + 1) * hk * k)
    values = range(rank * hv * v, (rank + 1) * hv * v)
    channels = [
        q,
        range(key_dim + q.start, key_dim + q.stop),
        range(2 * key_dim + values.start, 2 * key_dim + values.stop),
    ]
    heads = [range(rank * hv, (rank + 1) * hv)]
    rows = {
        "w_qkv.weight": channels,
        "conv_weight": channels,
        "w_z.weight": [values],
        "w_b.weight": heads,
        "w_a.weight": heads,
        "dt_bias": heads,
        "A_log": heads,
        "norm_weight": None,
        "wo.weight": None,
    }
    local = args.replace(linear_num_key_heads=hk, linear_num_value_heads=hv)
    return HeadShare(args=local, rows=rows, columns={"wo.weight": values})


def attention_share(args: ModelArgs, rank: int, size: int) -> HeadShare:
    """Query heads ``[rank h, (rank + 1) h)`` (h = H / size) and the KV heads they read (query head i reads KV head
    i // (H / G)): G / size of them, or the one all of them share."""
    dim, h = args.head_dim, args.num_heads // size
    group = args.num_heads // args.num_kv_heads
    first, last = rank * h // group, ((rank + 1) * h - 1) // group
    kv = range(first * dim, (last + 1) * dim)
    rows = {
        "wq.weight": [range(rank * h * 2 * dim, (rank + 1) * h * 2 * dim)],  # [query | gate] per head
        "wk.weight": [kv],
        "wv.weight": [kv],
        "q_norm.weight": None,
        "k_norm.weight": None,
        "wo.weight": None,
    }
    local = args.replace(num_heads=h, num_kv_heads=last - first + 1)
    return HeadShare(args=local, rows=rows, columns={"wo.weight": range(rank * h * dim, (rank + 1) * h * dim)})


def share_of(share: HeadShare, name: str, weight: torch.Tensor) -> torch.Tensor:
    """The part of the whole ``weight`` named ``name`` that the share takes (differentiable)."""
    if name in share.columns:
        cols = share.columns[name]
        return weight.narrow(1, cols.start, len(cols))
    parts = share.rows[name]
    if parts is None:
        return weight
    pieces = [weight.narrow(0, r.start, len(r)) for r in parts]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


# rows across the group ------------------------------------------------------------------------------------------


def _reduce_scatter(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    out = x.new_empty(x.shape[0] // dist.get_world_size(group), *x.shape[1:])
    reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    reduce_scatter(out, x.contiguous(), group=group)
    return out


def _all_gather(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    out = x.new_empty(x.shape[0] * dist.get_world_size(group), *x.shape[1:])
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    all_gather(out, x.contiguous(), group=group)
    return out


class _GatherRows(torch.autograd.Function):
    """Every rank's rows, in rank order; the backward sums the gradients over the group and keeps the rank's rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup):
        ctx.group = group
        return _all_gather(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _reduce_scatter(grad, ctx.group), None


class _ScatterSum(torch.autograd.Function):
    """The sum over the group of every rank's whole ``x``, each rank keeping its rows; the backward gathers."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup):
        ctx.group = group
        return _reduce_scatter(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_gather(grad, ctx.group), None


def gather_rows(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return _GatherRows.apply(x, group)


def scatter_sum(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return _ScatterSum.apply(x, group)


# applying it ----------------------------------------------------------------------------------------------------


def apply_head_parallel(model: Transformer, group: dist.ProcessGroup) -> None:
    """Make ``model`` compute over the token group ``group`` (module docstring). Training forwards only: the
    replaced forwards refuse a cache."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    args = model.args
    check_head_split(args, size)
    shares = {"attn": attention_share(args, rank, size), "gdn": gdn_share(args, rank, size)}
    builders = {"attn": GatedAttention, "gdn": GatedDeltaNet}
    layers = [*model.layers, *(model.mtp.layers if model.mtp is not None else ())]
    for layer in layers:
        kind = "attn" if layer.layer_type == "full_attention" else "gdn"
        with torch.device("meta"):
            skeleton = builders[kind](shares[kind].args)
        mixer = getattr(layer, kind)
        mixer.forward = types.MethodType(functools.partial(_mixer_forward, skeleton, shares[kind], group), mixer)
    model.forward = types.MethodType(functools.partial(_model_forward, group), model)
    if model.mtp is not None:
        model.mtp_forward = functools.partial(_mtp_forward, model.mtp_forward, group)


def _mixer_forward(skeleton: nn.Module, share: HeadShare, group, mixer: nn.Module, x_TD, batch, *rest):
    """A mixer's share of the heads over the group's gathered rows; the partial outputs summed and scattered."""
    weights = {name: share_of(share, name, p) for name, p in mixer.named_parameters()}
    out = functional_call(skeleton, weights, (gather_rows(x_TD, group), batch, *rest))
    return scatter_sum(out, group)


def padded_batch(batch: ForwardBatch, num_rows: int, size: int) -> tuple[ForwardBatch, int]:
    """``batch`` with one more sequence of the rows that pad ``num_rows`` to a multiple of ``size`` (none when it
    already is), and the number of those rows."""
    pad = -num_rows % size
    seq_lens = batch.seq_lens + ([pad] if pad else [])
    return ForwardBatch.training(seq_lens, batch.positions.device, batch.numerics), pad


def _rows_of_rank(x: torch.Tensor, pad: int, group) -> torch.Tensor:
    """The rank's block of ``x``'s rows once padded with ``pad`` zero rows."""
    padded = F.pad(x, (0, 0) * (x.dim() - 1) + (0, pad))
    return padded.chunk(dist.get_world_size(group))[dist.get_rank(group)]


def _model_forward(group, model: Transformer, tokens_T, batch: ForwardBatch, cache=None) -> torch.Tensor:
    if cache is not None:
        raise ValueError("a head-parallel model runs training forwards only (no cache)")
    padded, pad = padded_batch(batch, tokens_T.shape[0], dist.get_world_size(group))
    x_TD, rope = model.embed(_rows_of_rank(tokens_T, pad, group), padded)
    x_TD = model.forward_layers(x_TD, padded, rope, None, range(len(model.layers)))
    return gather_rows(model.norm(x_TD), group)[: tokens_T.shape[0]]


def _mtp_forward(mtp_forward, group, hidden_TD, next_tokens_T, batch: ForwardBatch, cache=None, detach_trunk=False):
    if cache is not None:
        raise ValueError("a head-parallel model runs training forwards only (no cache)")
    num_rows = hidden_TD.shape[0]
    padded, pad = padded_batch(batch, num_rows, dist.get_world_size(group))
    hidden, tokens = _rows_of_rank(hidden_TD, pad, group), _rows_of_rank(next_tokens_T, pad, group)
    out = mtp_forward(hidden, tokens, padded, None, detach_trunk)
    return gather_rows(out, group)[:num_rows]
