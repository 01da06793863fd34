"""Expert parallelism: each rank of an expert-parallel group holds a contiguous block of every MoE layer's routed
experts, and the token-expert pairs travel to the rank that holds their expert and back (dropless: every pair is
computed, however uneven the routing).

One MoE call on a rank of the group, with T local tokens routed to A experts each (N = T * A pairs):

1. the pairs sorted by expert, which sorts them by destination rank (expert e lives on rank e // E_local);
2. the pair counts exchanged, then the pairs' rows and local expert ids sent with one uneven ``all_to_all_single``;
3. the received rows run through the rank's own experts (``ops.moe.swiglu_experts`` with weight 1 per row);
4. the outputs sent back with the reverse ``all_to_all_single``, put back in pair order, weighted by the routing
   weights and summed over each token's A experts.

The all-to-alls are autograd functions, so the backward sends the gradients the same way back. Not responsible for
sharding the non-expert weights (FSDP2, ``parallelize``) or for the routing itself (the model's router).
"""

import types

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from league.models.qwen3_5_moe import Transformer
from league.models.qwen3_5_moe.model import Experts
from league.ops.moe import swiglu_experts
from league.ops.numerics import FAST, Numerics


def apply_ep(model: Transformer, ep_mesh: DeviceMesh) -> None:
    """Shard every MoE layer's routed experts (trunk and MTP) over ``ep_mesh`` by expert (``Shard(0)`` DTensors:
    rank r holds experts ``[r * E / ep, (r + 1) * E / ep)``) and route their calls through :func:`ep_forward`.
    Parameter names and the model's code do not change."""
    ep = ep_mesh.size()
    num_experts = model.args.num_experts
    if num_experts % ep:
        raise ValueError(f"`--ep` {ep} does not divide the model's {num_experts} experts; choose a divisor of it")
    layers = [layer for layer in model.layers if layer is not None] + list(model.mtp.layers if model.mtp else ())
    for layer in layers:
        experts = layer.moe.experts
        for name, param in list(experts.named_parameters(recurse=False)):
            local = param.detach().chunk(ep, dim=0)[ep_mesh.get_local_rank()].clone()
            sharded = DTensor.from_local(local, ep_mesh, [Shard(0)], shape=param.shape, stride=param.stride())
            setattr(experts, name, torch.nn.Parameter(sharded, requires_grad=param.requires_grad))
        experts.forward = types.MethodType(ep_forward_method(ep_mesh.get_group()), experts)


def ep_forward_method(group: dist.ProcessGroup):
    def forward(
        self: Experts, x_TD: torch.Tensor, weights_TA: torch.Tensor, experts_TA: torch.Tensor, numerics: Numerics = FAST
    ) -> torch.Tensor:
        return ep_forward(x_TD, weights_TA, experts_TA, self.w_gate_up, self.w_down, group, numerics)

    return forward


def ep_forward(
    x_TD: torch.Tensor,
    weights_TA: torch.Tensor,
    experts_TA: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    group: dist.ProcessGroup,
    numerics: Numerics = FAST,
) -> torch.Tensor:
    """``Experts.forward`` with the experts spread over ``group`` (``w_gate_up`` and ``w_down`` sharded by expert;
    DTensors or this rank's blocks). Every rank of ``group`` must call it together."""
    w_gate_up_local = w_gate_up.to_local() if isinstance(w_gate_up, DTensor) else w_gate_up
    w_down_local = w_down.to_local() if isinstance(w_down, DTensor) else w_down
    ep, local_experts = dist.get_world_size(group), w_gate_up_local.shape[0]
    num_tokens, num_topk = experts_TA.shape
    # 1. pairs in expert order, hence in destination order
    experts_N = experts_TA.reshape(-1)
    order_N = experts_N.argsort(stable=True)
    sorted_experts_N = experts_N[order_N]
    send_counts = torch.bincount(sorted_experts_N // local_experts, minlength=ep)
    # 2. counts, then rows and local expert ids
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    send, recv = send_counts.tolist(), recv_counts.tolist()
    x_ND = x_TD.index_select(0, order_N // num_topk)
    x_recv = dist_fn.all_to_all_single(x_ND.new_empty(sum(recv), x_ND.shape[1]), x_ND, recv, send, group=group)
    ids_recv = sorted_experts_N.new_empty(sum(recv))
    dist.all_to_all_single(ids_recv, sorted_experts_N % local_experts, recv, send, group=group)
    # 3. this rank's experts, one expert per received row
    ones = x_recv.new_ones(x_recv.shape[0], 1)
    y_recv = swiglu_experts(x_recv, w_gate_up_local, w_down_local, ones, ids_recv[:, None], numerics)
    # 4. back to the senders, in pair order, weighted and summed per token
    y_ND = dist_fn.all_to_all_single(y_recv.new_empty(x_ND.shape), y_recv, send, recv, group=group)
    inverse_N = torch.empty_like(order_N).scatter_(0, order_N, torch.arange(order_N.numel(), device=order_N.device))
    y_TAD = y_ND.index_select(0, inverse_N).view(num_tokens, num_topk, -1)
    return (y_TAD * weights_TA[..., None].to(y_TAD.dtype)).sum(1).to(x_TD.dtype)
