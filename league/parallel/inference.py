"""The engine over several ranks: how one engine's model is laid out over its ranks (``--tp-size`` heads,
``--ep-size`` experts), the groups it talks over, and which part of each whole weight a rank holds.

An engine of W ranks (W = the larger of tp and ep; the smaller divides it) runs every request on every rank: each rank
holds the same batch, caches and scheduler state (the ranks step in lock-step, see ``engine.lockstep``), so rows are
never split. Per decoder layer, on a rank:

- a token mixer (gated attention, Gated DeltaNet) runs its share of the heads (``heads.attention_share`` /
  ``gdn_share``, the trainer's head split) over every row, with a cache of those heads only; the group of tp ranks
  gathers the heads' outputs (``[T, H * K]``, head by head, as the mixer's ``heads`` returns them) and every rank
  projects them through the whole ``wo``. Each head's numbers are those of one process, and so is the projection:
  the result is bitwise the one-process result (no partial sums added in another order);
- the routed experts are held in blocks (rank e of ep: experts ``[e E/ep, (e+1) E/ep)``): each rank computes the
  weighted output of each token-expert pair routed to its block, the ep group sums the pair outputs (each pair is
  computed on one rank, so the sum is exact), and each token's pairs are added in ascending expert order from zero,
  as the one-process reference adds them (``ops.moe.swiglu_experts_reference``). With rows on every rank there is
  nothing to dispatch: an all-reduce replaces the trainer's all-to-all;
- the norms, router, shared expert, embedding and output head are whole on every rank.

Ranks beyond tp (or ep) hold the same shares as their group's (W / tp copies of each head share). The model's code
does not change: a mixer is replaced by the same module class built for its share of the heads (holding the whole
``wo``), whose ``forward`` gathers; the experts' ``forward`` is replaced. Not responsible for the lock-step
(``engine.lockstep``) or for which prompts an engine serves (the loop, the server).
"""

import datetime
import functools
import types
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from league.models.qwen3_5_moe import ModelArgs, Transformer
from league.models.qwen3_5_moe.gated_deltanet import GatedDeltaNet
from league.models.qwen3_5_moe.model import Experts, GatedAttention
from league.ops.moe import swiglu_experts
from league.ops.numerics import FAST, Numerics
from league.parallel.heads import HeadShare, attention_share, check_head_split, gdn_share

CONTROL_TIMEOUT = datetime.timedelta(days=365)
"""How long a served engine's other ranks wait for the next call (a server may idle for days)."""


def check_engine_layout(args: ModelArgs, tp: int, ep: int) -> int:
    """The engine's ranks (the larger of ``tp`` and ``ep``) when the model splits that way; a ValueError naming the
    flag and the fix otherwise."""
    small, large = sorted((tp, ep))
    if large % small:
        raise ValueError(
            f"`--tp-size` {tp} and `--ep-size` {ep}: one must divide the other (the engine spans the larger)"
        )
    if tp > 1:
        try:
            check_head_split(args, tp)
        except ValueError as e:
            raise ValueError(str(e).replace("tp x cp", "`--tp-size`")) from None
    if args.num_experts % ep:
        raise ValueError(f"`--ep-size` {ep} does not divide the model's {args.num_experts} experts; choose a divisor")
    return large


TRAIN_FLAGS = ("`--sglang-tp-size`", "`--sglang-ep-size`")
"""How ``league train`` names the engine's sizes (the reference's spelling)."""
SERVE_FLAGS = ("`--tp-size`", "`--ep-size`")
"""How ``league serve`` / ``generate`` / ``bench`` name them (SGLang's)."""


def resolve_engine_sizes(
    gpus_per_engine: int | None, tp: int, ep: int, world: int, flags: tuple[str, str] = TRAIN_FLAGS
) -> tuple[int, int]:
    """The engine's ``(tp, ep)``: as given when the larger of them is the engine's size; an engine of several ranks
    with neither set splits its heads over all of them (SGLang's engine is tensor-parallel over its GPUs). The
    engine's size is ``gpus_per_engine`` (``--rollout-num-gpus-per-engine``; 1 leaves it to ``tp`` and ``ep``) and
    the ``world`` ranks form engines of that size; None: one engine over all ``world`` processes (``league serve``,
    ``generate``, ``bench``). A ValueError naming the ``flags`` otherwise."""
    size = world if gpus_per_engine is None else gpus_per_engine
    if size > 1 and tp == ep == 1:
        tp = size
    tp_flag, ep_flag = flags
    if gpus_per_engine is None and max(tp, ep) != world:
        raise ValueError(
            f"{tp_flag} {tp} / {ep_flag} {ep} ask for an engine over {max(tp, ep)} ranks, but {world} processes "
            f"were started; start {max(tp, ep)} (`--nproc-per-node {max(tp, ep)}` or torchrun)"
        )
    if size not in (1, max(tp, ep)):
        raise ValueError(
            f"`--rollout-num-gpus-per-engine` {size} with the engine's {tp_flag} {tp} and {ep_flag} {ep}: an engine "
            f"spans the larger of the two; make it {size} (or leave both at 1: the heads are split over the engine's "
            "GPUs)"
        )
    if world % max(tp, ep):
        raise ValueError(
            f"an engine over {max(tp, ep)} ranks (`--rollout-num-gpus-per-engine` {size}, {tp_flag} {tp}, {ep_flag} "
            f"{ep}) needs a multiple of {max(tp, ep)} ranks; the run has {world} (`--nproc-per-node`)"
        )
    return tp, ep


@dataclass(frozen=True, slots=True)
class EngineLayout:
    """One rank's place in an engine of ``world`` ranks.

    Args:
        tp (int): ranks sharing each mixer's heads; ``tp_rank`` this rank's share, ``tp_group`` the ranks gathering
            the heads' outputs (None when tp is 1).
        ep (int): ranks sharing the experts; ``ep_rank`` this rank's block, ``ep_group`` the ranks summing the pair
            outputs (None when ep is 1).
        group (ProcessGroup): every rank of this engine (None: one process); ``control_group`` the same ranks over
            gloo with no practical timeout, for the calls a served engine's leading rank sends (``engine.lockstep``).
        rank (int): this rank's place in its engine (0 drives a served engine).
        engine (int): which engine this rank belongs to (data-parallel engines); ``num_engines`` of them.
    """

    tp: int = 1
    ep: int = 1
    tp_rank: int = 0
    ep_rank: int = 0
    tp_group: dist.ProcessGroup | None = None
    ep_group: dist.ProcessGroup | None = None
    group: dist.ProcessGroup | None = None
    control_group: dist.ProcessGroup | None = None
    rank: int = 0
    engine: int = 0
    num_engines: int = 1

    @property
    def world(self) -> int:
        return max(self.tp, self.ep)

    @property
    def leads(self) -> bool:
        """Whether this rank answers for its engine (its place 0): each engine's outputs are kept once."""
        return self.rank == 0

    def shares(self, args: ModelArgs) -> dict[str, HeadShare]:
        """This rank's share of the heads of each kind of mixer."""
        return {"attn": attention_share(args, self.tp_rank, self.tp), "gdn": gdn_share(args, self.tp_rank, self.tp)}

    def cache_args(self, args: ModelArgs) -> ModelArgs:
        """``args`` with this rank's head counts: what its cache holds."""
        if self.tp == 1:
            return args
        shares = self.shares(args)
        attn, gdn = shares["attn"].args, shares["gdn"].args
        return args.replace(
            num_heads=attn.num_heads,
            num_kv_heads=attn.num_kv_heads,
            linear_num_key_heads=gdn.linear_num_key_heads,
            linear_num_value_heads=gdn.linear_num_value_heads,
        )

    def local_part(self, args: ModelArgs, name: str, whole: torch.Tensor) -> torch.Tensor:
        """The part of parameter ``name``'s whole tensor that this rank holds (league's names): its block of the
        experts, its heads' rows of a mixer's input projections, gates, conv and per-head parameters, the whole of
        everything else (``wo`` included). A view where the part is one block of rows."""
        parts = name.split(".")
        if self.ep > 1 and parts[-2:-1] == ["experts"]:
            return whole.chunk(self.ep, dim=0)[self.ep_rank]
        mixer = next((i for i, part in enumerate(parts) if part in ("attn", "gdn")), None)
        if self.tp > 1 and mixer is not None:
            local = ".".join(parts[mixer + 1 :])
            if local != "wo.weight":
                return _rows_of_share(self.shares(args)[parts[mixer]], local, whole)
        return whole

    def local_expert(self, args: ModelArgs, expert: int) -> int | None:
        """Where expert ``expert`` sits in this rank's block (None: another rank holds it)."""
        per_rank = args.num_experts // self.ep
        local = expert - self.ep_rank * per_rank
        return local if 0 <= local < per_rank else None


def _rows_of_share(share: HeadShare, name: str, whole: torch.Tensor) -> torch.Tensor:
    rows = share.rows[name]
    if rows is None:
        return whole
    pieces = [whole.narrow(0, r.start, len(r)) for r in rows]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def make_engine_layout(
    args: ModelArgs, tp: int, ep: int, device_type: str, group: dist.ProcessGroup | None = None
) -> EngineLayout:
    """This rank's :class:`EngineLayout` when the ranks of ``group`` (default: every rank) form engines of
    ``max(tp, ep)`` consecutive ranks each. Every rank of ``group`` calls it together (it makes the groups). One
    process, or tp = ep = 1 on one rank: the one-process layout."""
    size = check_engine_layout(args, tp, ep)
    world = 1 if not dist.is_initialized() else dist.get_world_size(group)
    if world % size:
        raise ValueError(
            f"the engine spans {size} ranks (`--tp-size` {tp}, `--ep-size` {ep}); {world} ranks do not split into "
            "engines of that size"
        )
    if world == 1:
        return EngineLayout()
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(world))
    me = ranks.index(dist.get_rank())
    engine, place = divmod(me, size)
    mine = {}
    # every rank makes every group, in the same order (dist.new_group's rule); each keeps its own
    for first in range(0, world, size):
        members = ranks[first : first + size]
        for kind, width in (("engine", size), ("tp", tp), ("ep", ep)):
            if width == 1:
                continue
            for start in range(0, size, width):
                g = dist.new_group(members[start : start + width], use_local_synchronization=False)
                if first == engine * size and start <= place < start + width:
                    mine[kind] = g
        if size > 1:
            control = dist.new_group(members, backend="gloo", timeout=CONTROL_TIMEOUT)
            if first == engine * size:
                mine["control"] = control
    return EngineLayout(
        tp=tp,
        ep=ep,
        tp_rank=place % tp,
        ep_rank=place % ep,
        tp_group=mine.get("tp"),
        ep_group=mine.get("ep"),
        group=mine.get("engine"),
        control_group=mine.get("control"),
        rank=place,
        engine=engine,
        num_engines=world // size,
    )


@torch.no_grad()
def place_engine_model(model: Transformer, layout: EngineLayout) -> Transformer:
    """Lay ``model`` (whole, on this rank's device) out as ``layout`` says (module docstring), in place; returns it.
    Parameter names do not change; sharded ones hold this rank's part (:meth:`EngineLayout.local_part`)."""
    args = model.args
    layers = [layer for layer in model.layers if layer is not None] + list(model.mtp.layers if model.mtp else ())
    if layout.tp > 1:
        shares = layout.shares(args)
        builders = {"attn": GatedAttention, "gdn": GatedDeltaNet}
        for layer in layers:
            kind = "attn" if layer.layer_type == "full_attention" else "gdn"
            whole = getattr(layer, kind)
            with torch.device("meta"):
                local = builders[kind](shares[kind].args)
            local.wo = whole.wo  # the whole projection, shared
            state = {
                name: p if name == "wo.weight" else _rows_of_share(shares[kind], name, p).clone()
                for name, p in whole.named_parameters()
            }
            local.load_state_dict(state, assign=True)
            local.requires_grad_(False)
            local.forward = types.MethodType(functools.partial(_gathered_forward, layout.tp_group), local)
            setattr(layer, kind, local)
    if layout.ep > 1:
        for layer in layers:
            experts = layer.moe.experts
            for name in ("w_gate_up", "w_down"):
                block = layout.local_part(args, f"experts.{name}", getattr(experts, name)).clone()
                setattr(experts, name, nn.Parameter(block, requires_grad=False))
            first = layout.ep_rank * (args.num_experts // layout.ep)
            forward = functools.partial(_replicated_experts_forward, layout.ep_group, first)
            experts.forward = types.MethodType(forward, experts)
    return model


def _gathered_forward(group: dist.ProcessGroup, mixer: nn.Module, x_TD: torch.Tensor, batch, *rest) -> torch.Tensor:
    """A mixer's share of the heads, every share's outputs gathered, projected by the whole ``wo``."""
    heads_TF = mixer.heads(x_TD, batch, *rest)
    size, (num_tokens, width) = dist.get_world_size(group), heads_TF.shape
    gathered = heads_TF.new_empty(size * num_tokens, width)
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    all_gather(gathered, heads_TF.contiguous(), group=group)
    whole_TF = gathered.view(size, num_tokens, width).transpose(0, 1).reshape(num_tokens, size * width)
    return batch.linear(whole_TF, mixer.wo.weight)


def _replicated_experts_forward(
    group: dist.ProcessGroup,
    first: int,
    experts: Experts,
    x_TD: torch.Tensor,
    weights_TA: torch.Tensor,
    experts_TA: torch.Tensor,
    numerics: Numerics = FAST,
) -> torch.Tensor:
    """``Experts.forward`` with this rank's block of experts (``first`` the block's first expert): the pairs
    routed to the block computed here (as one-expert tokens, weighted), every pair's output summed over ``group``,
    each token's pairs added in ascending expert order (:func:`sum_in_expert_order`)."""
    num_tokens, num_topk = experts_TA.shape
    experts_N = experts_TA.reshape(-1)
    local_N = experts_N - first
    pairs = ((local_N >= 0) & (local_N < experts.w_gate_up.shape[0])).nonzero().squeeze(1)
    y_ND = x_TD.new_zeros(num_tokens * num_topk, x_TD.shape[-1])
    if pairs.numel():
        rows = x_TD.index_select(0, pairs // num_topk)
        weights = weights_TA.reshape(-1, 1)[pairs]
        y_ND[pairs] = swiglu_experts(rows, experts.w_gate_up, experts.w_down, weights, local_N[pairs, None], numerics)
    dist.all_reduce(y_ND, group=group)
    return sum_in_expert_order(y_ND.view(num_tokens, num_topk, -1), experts_TA)


def sum_in_expert_order(y_TAD: torch.Tensor, experts_TA: torch.Tensor) -> torch.Tensor:
    """Each token's A weighted expert outputs added from zero in ascending expert order, one at a time: the order
    in which the one-process reference accumulates them (a loop over the experts adding into each token's row)."""
    order_TA = experts_TA.argsort(dim=1)
    sorted_TAD = y_TAD.gather(1, order_TA[..., None].expand_as(y_TAD))
    total_TD = torch.zeros_like(sorted_TAD[:, 0])
    for a in range(sorted_TAD.shape[1]):
        total_TD = total_TD + sorted_TAD[:, a]
    return total_TD


def laid_out_model(model_dir, device: torch.device, dtype: torch.dtype, tp: int, ep: int, world: int):
    """A checkpoint folder's model for an engine over ``world`` processes (every one calls it together): this rank's
    part of it on ``device`` (laid out on the meta device, allocated, and filled tensor by tensor from the folder,
    each rank keeping its part: the whole model is never held), its :class:`EngineLayout` and ``(tp, ep)``. One
    process: the whole model, one-process layout."""
    from league.checkpoint.hf import load_hf_weights, load_model, meta_model, parse_dtype
    from league.ops.rope import rope_inv_freq

    if world == 1:
        return load_model(model_dir, device, dtype).eval(), EngineLayout(), (tp, ep)
    tp, ep = resolve_engine_sizes(None, tp, ep, world, SERVE_FLAGS)
    args = ModelArgs.from_dir(model_dir)
    layout = make_engine_layout(args, tp, ep, device.type)
    model = place_engine_model(meta_model(args, parse_dtype(dtype or args.dtype)), layout).to_empty(device=device)
    with torch.no_grad():
        model.inv_freq.copy_(rope_inv_freq(args.rotary_dim, args.rope_theta))
    load_hf_weights(model, model_dir, layout=layout)
    return model.eval(), layout, (tp, ep)


def shared_expert_blocks(engine_model: Transformer, policy: nn.Module, layout: EngineLayout) -> list[str]:
    """Where the trainer and the engine lay the experts out alike, make the engine read the trainer's blocks in
    place: each engine expert weight becomes a view of the policy's local shard (a DTensor sharded by expert over
    the same ep ranks, whole over the rest: FSDP2's ``edp`` of one rank, no ``etp``), when its shape, dtype and
    device are the engine's block's. Returns the names shared (a weight sync leaves them: the optimizer step has
    already written them). Every rank calls it with the same layouts, so every rank shares the same names."""
    from torch.distributed.tensor import DTensor, Shard

    if layout.ep == 1:
        return []
    policy_params = dict(policy.named_parameters())
    shared = []
    with torch.no_grad():
        for name, param in engine_model.named_parameters():
            trained = policy_params.get(name)
            if not (name.split(".")[-2:-1] == ["experts"] and isinstance(trained, DTensor)):
                continue
            mesh, placements = trained.device_mesh, trained.placements
            by_expert = [i for i, p in enumerate(placements) if p == Shard(0) and mesh.size(i) == layout.ep]
            others = [i for i in range(mesh.ndim) if i not in by_expert]
            if len(by_expert) != 1 or any(mesh.size(i) != 1 for i in others):
                continue
            local = trained.to_local()
            if mesh.get_local_rank(by_expert[0]) != layout.ep_rank:
                continue
            if (local.shape, local.dtype, local.device) != (param.shape, param.dtype, param.device):
                continue
            param.data = local.detach()
            shared.append(name)
    return shared
