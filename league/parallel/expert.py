"""Expert parallelism (``--ep``) and expert tensor parallelism (``--etp``) of the routed experts, Megatron's way.

The expert mesh lays the ranks out as ``(edp, ep, etp)``, ``etp`` innermost (``launch.make_ranks``). The ``ep``
ranks of an expert-parallel group each hold a contiguous block of every MoE layer's experts; the ``etp`` ranks of an
expert tensor-parallel group hold the same experts, each a contiguous share of their intermediate dim I: rows of
the gate and of the up projection (the same rows of both: a SwiGLU unit needs its gate and its up row) and the same
columns of the down projection. An expert's output is then the sum over the group of each rank's partial output;
FSDP2 shards the rest over ``edp``.

Placements (DTensors over the ``(ep, etp)`` mesh): ``w_gate_up`` ``[E, 2I, D]`` (gate rows ``[:I]``, up rows
``[I:]``) as ``Shard(0)`` and ``_StridedShard(1, split_factor=2)``: rank ``(e, t)`` holds experts
``[e E/ep, (e+1) E/ep)`` and, of each, gate rows and up rows ``[t I/etp, (t+1) I/etp)`` stacked as
``[E/ep, 2I/etp, D]``, the fused layout of a smaller expert, so the experts' code runs on it as it is; ``w_down``
``[E, D, I]`` as ``Shard(0)`` and ``Shard(2)``. Without ETP the experts are ``Shard(0)`` over ``ep`` alone.

One MoE call on a rank with T local tokens routed to A experts each (N = T * A pairs):

1. the pairs sorted by expert, which sorts them by destination ``ep`` rank (expert e lives on rank e // E_local);
2. the pair counts exchanged, then the pairs' rows and local expert ids sent over ``ep`` with one uneven
   ``all_to_all_single``;
3. the received rows run through the rank's experts (``ops.moe.swiglu_experts`` with weight 1 per row). With ETP the
   ranks of an ``etp`` group hold different rows (different samples, or different rows of a token group: league's
   TP and CP split the rows everywhere but in the token mixers, so they are never shared here). The group first
   gathers every member's received rows (and ids), each rank computes its share of I for all of them (a partial
   output), and the partials are summed back onto the rows each rank received (the reduce-scatter);
4. the outputs sent back over ``ep`` with the reverse ``all_to_all_single``, put back in pair order, weighted by the
   routing weights and summed over each token's A experts.

ETP gathers pairs after the EP exchange, as Megatron's all-to-all dispatcher does: the ``etp`` group holds the same
experts, so what it gathers is exactly the pairs its experts serve. Every collective that carries rows is an uneven
``all_to_all_single`` and an autograd function (the gather sends a rank's rows to each member, the reduce-scatter
each member its rows' partials), so the backward retraces them. Dropless: every pair is computed, however uneven
the routing. Not responsible for sharding the non-expert weights (FSDP2, ``parallelize``) or for the routing itself
(the model's router).
"""

import types

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from league.models.qwen3_5_moe import Transformer
from league.models.qwen3_5_moe.model import Experts
from league.ops.moe import swiglu_experts
from league.ops.numerics import FAST, Numerics

INTERMEDIATE_DIMS = {"w_gate_up": (1, 2), "w_down": (2, 1)}
"""Each expert weight's dim of the intermediate size I, and how many blocks of I it holds (gate and up: 2)."""


def apply_ep(model: Transformer, expert_mesh: DeviceMesh) -> None:
    """Shard every MoE layer's routed experts (trunk and MTP) over ``expert_mesh`` (dims ``edp``, ``ep``, ``etp``):
    by expert over ``ep`` and, with ``etp`` > 1, by intermediate unit over ``etp`` (DTensors; the module docstring
    gives the placements), and route their calls through :func:`ep_forward`. Parameter names and the model's code
    do not change.

    Raises:
        ValueError: when ``ep`` does not divide the experts or ``etp`` their intermediate size.
    """
    ep_mesh, etp_mesh = expert_mesh["ep"], expert_mesh["etp"]
    ep, etp = ep_mesh.size(), etp_mesh.size()
    num_experts, intermediate = model.args.num_experts, model.args.moe_intermediate_size
    if num_experts % ep:
        raise ValueError(f"`--ep` {ep} does not divide the model's {num_experts} experts; choose a divisor of it")
    if intermediate % etp:
        raise ValueError(
            f"`--etp` {etp} does not divide the experts' intermediate size (moe_intermediate_size {intermediate}); "
            "choose a divisor of it"
        )
    mesh = ep_mesh if etp == 1 else expert_mesh["ep", "etp"]
    layers = [layer for layer in model.layers if layer is not None] + list(model.mtp.layers if model.mtp else ())
    for layer in layers:
        experts = layer.moe.experts
        for name, param in list(experts.named_parameters(recurse=False)):
            dim, split_factor = INTERMEDIATE_DIMS[name]
            local = param.detach().chunk(ep, dim=0)[ep_mesh.get_local_rank()]
            placements = [Shard(0)]
            if etp > 1:
                local = intermediate_share(local, dim, split_factor, etp_mesh.get_local_rank(), etp)
                placements.append(_StridedShard(dim, split_factor=split_factor) if split_factor > 1 else Shard(dim))
            sharded = DTensor.from_local(local.clone(), mesh, placements, shape=param.shape, stride=param.stride())
            setattr(experts, name, torch.nn.Parameter(sharded, requires_grad=param.requires_grad))
        groups = (ep_mesh.get_group() if ep > 1 else None, etp_mesh.get_group() if etp > 1 else None)
        experts.forward = types.MethodType(ep_forward_method(*groups), experts)


def intermediate_share(weight: torch.Tensor, dim: int, split_factor: int, rank: int, size: int) -> torch.Tensor:
    """Share ``rank`` of ``size`` of an expert weight's intermediate ``dim``, which holds ``split_factor`` equal
    blocks (gate and up): the ``rank``-th of ``size`` equal slices of each block, in block order (what
    ``_StridedShard(dim, split_factor)`` holds; ``Shard(dim)`` for one block)."""
    blocks = weight.chunk(split_factor, dim=dim)
    return torch.cat([block.chunk(size, dim=dim)[rank] for block in blocks], dim=dim)


def ep_forward_method(group: dist.ProcessGroup | None, etp_group: dist.ProcessGroup | None = None):
    def forward(
        self: Experts, x_TD: torch.Tensor, weights_TA: torch.Tensor, experts_TA: torch.Tensor, numerics: Numerics = FAST
    ) -> torch.Tensor:
        return ep_forward(x_TD, weights_TA, experts_TA, self.w_gate_up, self.w_down, group, numerics, etp_group)

    return forward


def ep_forward(
    x_TD: torch.Tensor,
    weights_TA: torch.Tensor,
    experts_TA: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    group: dist.ProcessGroup | None,
    numerics: Numerics = FAST,
    etp_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """``Experts.forward`` with the experts spread over ``group`` (``w_gate_up`` and ``w_down`` sharded by expert;
    DTensors or this rank's blocks; None: every expert here) and, with ``etp_group``, their intermediate dim over
    it (this rank's share of each). Every rank of both groups must call it together."""
    w_gate_up_local = w_gate_up.to_local() if isinstance(w_gate_up, DTensor) else w_gate_up
    w_down_local = w_down.to_local() if isinstance(w_down, DTensor) else w_down
    local_experts = w_gate_up_local.shape[0]
    num_tokens, num_topk = experts_TA.shape
    # 1. pairs in expert order, hence in destination order
    experts_N = experts_TA.reshape(-1)
    order_N = experts_N.argsort(stable=True)
    sorted_experts_N = experts_N[order_N]
    x_ND = x_TD.index_select(0, order_N // num_topk)
    # 2. counts, then rows and local expert ids
    if group is None:
        x_recv, ids_recv = x_ND, sorted_experts_N
    else:
        ep = dist.get_world_size(group)
        send_counts = torch.bincount(sorted_experts_N // local_experts, minlength=ep)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=group)
        send, recv = send_counts.tolist(), recv_counts.tolist()
        x_recv = exchange(x_ND, recv, send, group)
        ids_recv = sorted_experts_N.new_empty(sum(recv))
        dist.all_to_all_single(ids_recv, sorted_experts_N % local_experts, recv, send, group=group)
    # 3. this rank's experts (its share of them with ETP), one expert per received row
    if etp_group is None:
        ones = x_recv.new_ones(x_recv.shape[0], 1)
        y_recv = swiglu_experts(x_recv, w_gate_up_local, w_down_local, ones, ids_recv[:, None], numerics)
    else:
        y_recv = etp_experts(x_recv, ids_recv, w_gate_up_local, w_down_local, etp_group, numerics)
    # 4. back to the senders, in pair order, weighted and summed per token
    if group is None:
        y_ND = y_recv
    else:
        y_ND = exchange(y_recv, send, recv, group)
    inverse_N = torch.empty_like(order_N).scatter_(0, order_N, torch.arange(order_N.numel(), device=order_N.device))
    y_TAD = y_ND.index_select(0, inverse_N).view(num_tokens, num_topk, -1)
    return (y_TAD * weights_TA[..., None].to(y_TAD.dtype)).sum(1).to(x_TD.dtype)


def etp_experts(
    x_RD: torch.Tensor,
    ids_R: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    group: dist.ProcessGroup,
    numerics: Numerics = FAST,
) -> torch.Tensor:
    """The outputs of R rows, row r through local expert ``ids_R[r]``, with each expert's intermediate dim split over
    ``group`` (``w_gate_up`` ``[E_local, 2I/etp, D]`` and ``w_down`` ``[E_local, D, I/etp]``: this rank's share):
    every member's rows gathered, this rank's partial outputs of all of them computed, and each member's rows'
    partials summed back to it, in rank order (in the rows' dtype, as Megatron sums them: bf16 partials in a bf16
    run). Every rank of ``group`` calls it together, with its own R."""
    etp, num_rows = dist.get_world_size(group), x_RD.shape[0]
    counts = torch.empty(etp, dtype=torch.int64, device=x_RD.device)
    dist.all_to_all_single(counts, torch.full((etp,), num_rows, dtype=torch.int64, device=x_RD.device), group=group)
    rows, mine = counts.tolist(), [num_rows] * etp
    # the gather: this rank's rows sent to every member, each member's received in rank order
    x_all = exchange(x_RD.repeat(etp, 1), rows, mine, group)
    ids_all = ids_R.new_empty(sum(rows))
    dist.all_to_all_single(ids_all, ids_R.repeat(etp), rows, mine, group=group)
    ones = x_all.new_ones(x_all.shape[0], 1)
    partial = swiglu_experts(x_all, w_gate_up, w_down, ones, ids_all[:, None], numerics)
    # the reduce-scatter: each member's rows' partials sent back to it and summed
    partials = exchange(partial, mine, rows, group)
    return partials.view(etp, num_rows, -1).sum(0)


def exchange(x: torch.Tensor, recv: list[int], send: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    """``x``'s rows sent to the ranks of ``group`` (``send[r]`` rows to rank r, in order) and theirs received
    (``recv[r]`` from rank r), uneven sizes allowed; differentiable: the backward sends the gradients back the same
    way."""
    return funcol.all_to_all_single_autograd(x.contiguous(), recv, send, group)
