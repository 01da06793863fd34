"""The memory plan of a training job: the bytes each rank holds for the policy's parameters, gradients and optimizer
state, the KL reference, the engine's replica and cache, and one micro-batch's activations, for a layout at a world
size, before anything is launched (``league train --dry-run``).

The shards are the real ones: the policy is built on the meta device (shapes, no storage), a fake process group of
the world size is initialised in this one process (this process is its rank 0), and ``parallelize_qwen3_5_moe``
places the policy as a run does (heads over the token group, experts over ``ep``, FSDP2); every rank's local shape of
each parameter then follows from the DTensor's placements (torch's own placement math), so ranks that hold different
experts or uneven shards are counted each as they are. Activations have no shards to read: they are an analytic
estimate from the model's dimensions (``activations.activation_estimate``). Not responsible for the job's checks
(``rl.preflight.check_job``) nor for reading the job's config (``rl.preflight.memory_plan``); it measures nothing.
"""

import itertools
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

from league.engine.cache import cache_bytes_per_slot, state_bytes_per_slot
from league.models.qwen3_5_moe import ModelArgs, Transformer
from league.parallel.activations import ActivationEstimate, activation_estimate
from league.parallel.dims import ParallelDims
from league.parallel.inference import EngineLayout
from league.parallel.launch import make_ranks
from league.parallel.parallelize import parallelize_qwen3_5_moe

GiB = 2**30
OPTIMIZER_BYTES_WITH_MASTERS = 16
"""Per element of a rank's shards: the fp32 master, its fp32 gradient buffer and Adam's two fp32 moments
(``rl.optim.Optimizer`` with low-precision parameters or offload)."""
OPTIMIZER_BYTES_WITHOUT_MASTERS = 8
"""Per element: Adam's two fp32 moments (fp32 parameters stepped in place, no offload)."""
GPUS = {"H100 80GB": 78 * GiB, "H200 141GB": 139 * GiB}
"""GPUs the plan is held against, by the memory a process can use: nvidia-smi's 81,559 MiB and 143,771 MiB less
about 1.5 GiB for the CUDA context and the communication buffers (a round figure, not a measurement)."""


@dataclass(kw_only=True, frozen=True, slots=True)
class PlanSettings:
    """What besides the architecture and the layout decides a rank's memory (from the job's config).

    Args:
        dtype (torch.dtype): the parameters' dtype in training.
        recompute (bool): full activation recompute, one layer per checkpoint (the estimate of any other recompute
            is that of none: an upper bound; ``recompute_label`` says which).
        max_tokens (int): tokens of the largest micro-batch (``--max-tokens-per-gpu``), shared by a token group.
        optimizer_cpu_offload (bool): the optimizer's state on the host.
        kl_reference (bool): a frozen reference, sharded like the policy (``--use-kl-loss``).
        engine_slots (int): cache slots the engine asks for (``--num-slots``, else ``--max-running-requests``).
        engine_slots_fixed (bool): the slots are allocated as asked (``--num-slots``), not fitted to the GPU.
        engine_min_slots (int): the fewest slots a rollout works with (the samples of one prompt, generated at once).
        engine_slot_len (int): tokens of one slot (the context length, plus the speculative steps).
        engine_state_dtype (torch.dtype): dtype of the GDN states in the cache (``--mamba-ssm-dtype``).
        mem_fraction_static (float): the share of the GPU the engine fills with its cache, counting what is in use.
        ranks_per_node (int): processes on one machine (for the host memory of a node).
        sharded_load (bool): the policy comes from a DCP checkpoint (``--load``) across ranks: it is placed on the
            meta device and each rank reads only its shards, so a start-up holds no whole policy but the engine's
            copy. Default: ``False`` (built whole on every rank, then sharded).
        engine_tp, engine_ep (int): how the rollout engine's weights and cache are split over its ranks
            (``parallel.inference``). Default: 1 (each rank's engine holds the whole policy).
        engine_snapshots (int): GDN state snapshots the engine's prefix cache holds (``--max-mamba-cache-size``),
            each the size of one slot's states. Default: 0.
    """

    dtype: torch.dtype
    recompute: bool
    recompute_label: str | None = None
    max_tokens: int
    optimizer_cpu_offload: bool
    kl_reference: bool
    engine_slots: int
    engine_slots_fixed: bool
    engine_min_slots: int
    engine_slot_len: int
    engine_state_dtype: torch.dtype
    mem_fraction_static: float
    ranks_per_node: int
    sharded_load: bool = False
    engine_tp: int = 1
    engine_ep: int = 1
    engine_snapshots: int = 0


@contextmanager
def fake_process_group(world: int) -> Iterator[None]:
    """A process group of ``world`` ranks inside this one process, which is its rank 0: torch's ``fake`` backend,
    whose collectives do nothing, so meshes and DTensors of any size are made without other processes. Destroyed
    after the block; the process must have no process group of its own."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    assert not dist.is_initialized(), "a memory plan is made in a process without a process group"
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def world_of(dims: ParallelDims) -> int:
    return dims.dp * dims.tp * dims.cp * dims.pp


def placed_policy(args: ModelArgs, dims: ParallelDims, dtype: torch.dtype, recompute: bool) -> Transformer:
    """The policy on the meta device, placed on ``dims`` as rank 0 of a run places it (``parallelize_qwen3_5_moe``
    over the meshes of ``launch.make_ranks``). Above one rank, call it inside :func:`fake_process_group` of the
    world size."""
    from league.checkpoint.hf import meta_model

    model = meta_model(args, dtype)
    world = world_of(dims)
    if world == 1:
        return parallelize_qwen3_5_moe(model, dims, recompute)
    ranks = make_ranks("cpu", world, dims.ep, dims.tp * dims.cp, 1, dims.etp)
    return parallelize_qwen3_5_moe(model, dims, recompute, ranks.mesh, ranks.expert_mesh, ranks.token_group)


def local_numels(param: torch.Tensor, world: int) -> list[int]:
    """Elements of ``param`` that each rank ``0 .. world - 1`` holds: its local shard, from the DTensor's global
    shape and placements at the rank's coordinate in the mesh (the computation of torch's
    ``compute_local_shape_and_global_offset``, for any rank rather than this process's own), or all of it for a
    plain tensor."""
    if not isinstance(param, DTensor):
        return [param.numel()] * world
    mesh, counts = param.device_mesh, [0] * world
    # torch's private form of the computation takes any coordinate; the public one, this process's own
    for coordinate in itertools.product(*(range(size) for size in mesh.shape)):
        shape, _ = _compute_local_shape_and_global_offset(
            param.shape, mesh.shape, list(coordinate), param.placements, skip_offset=True
        )
        counts[int(mesh.mesh[coordinate])] = math.prod(shape)
    return counts


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The modules ``fully_shard`` was applied to, the root first (``model.modules()`` order)."""
    return [module for module in model.modules() if isinstance(module, FSDPModule)]


def unit_parameters(unit: nn.Module) -> list[nn.Parameter]:
    """The parameters an FSDP2 unit gathers itself: those of its subtree outside the units nested in it."""
    params = list(unit.parameters(recurse=False))
    for child in unit.children():
        if not isinstance(child, FSDPModule):
            params += unit_parameters(child)
    return params


def gathered_numel(unit: nn.Module, world: int) -> int:
    """Elements of the unit's all-gather output: each parameter's padded shard (FSDP2 pads dim 0 to a multiple of
    the shard count, so every rank's shard is as large as rank 0's, the largest) times the ranks it is sharded over
    (FSDP2's dim of the mesh, the first)."""
    return sum(max(local_numels(p, world)) * p.device_mesh.size(0) for p in unit_parameters(unit))


def nested_units(unit: nn.Module) -> list[nn.Module]:
    """The FSDP2 units inside ``unit`` (the experts of a decoder layer, under expert parallelism)."""
    return [m for m in unit.modules() if m is not unit and isinstance(m, FSDPModule)]


@dataclass(kw_only=True, frozen=True, slots=True)
class ShardCounts:
    """Elements of the placed policy, whole and on each rank.

    Args:
        numel (int): the whole policy.
        expert_numel (int): the routed experts of every MoE layer (trunk and MTP), whole.
        local (list[int]): each rank's elements of its shards as the optimizer steps them (no padding).
        local_experts (list[int]): the same, of the routed experts.
        padded (int): elements each rank allocates for its shards: FSDP2 pads every shard to rank 0's size, so
            this is the same on every rank (``local`` itself in one process).
        root_gathered (int): the root unit's parameters whole (embedding, final norm, output head).
        layer_gathered (int): the largest other unit with the units nested in it (a decoder layer and its
            experts, or the MTP head), as gathered.
    """

    numel: int
    expert_numel: int
    local: list[int]
    local_experts: list[int]
    padded: int
    root_gathered: int
    layer_gathered: int


def count_shards(model: Transformer, world: int) -> ShardCounts:
    """:class:`ShardCounts` of a policy placed by :func:`placed_policy` over ``world`` ranks."""
    local, local_experts = [0] * world, [0] * world
    numel = expert_numel = padded = 0
    for name, param in model.named_parameters():
        per_rank = local_numels(param, world)
        is_expert = ".moe.experts." in name
        numel += param.numel()
        expert_numel += param.numel() if is_expert else 0
        padded += max(per_rank)
        for rank, n in enumerate(per_rank):
            local[rank] += n
            local_experts[rank] += n if is_expert else 0
    units = fsdp_units(model)
    root_gathered = gathered_numel(units[0], world) if units else 0
    groups = [u for u in units[1:] if not any(u in nested_units(v) for v in units[1:])]
    layer_gathered = max(
        (gathered_numel(u, world) + sum(gathered_numel(n, world) for n in nested_units(u)) for u in groups), default=0
    )
    return ShardCounts(
        numel=numel,
        expert_numel=expert_numel,
        local=local,
        local_experts=local_experts,
        padded=padded,
        root_gathered=root_gathered,
        layer_gathered=layer_gathered,
    )


@dataclass(frozen=True, slots=True)
class Fit:
    """The plan held against one GPU: the engine's cache slots and the peaks (bytes)."""

    gpu: str
    capacity: int
    slots: int
    peak: int
    startup: int
    min_slots: int

    @property
    def fits(self) -> bool:
        return self.slots >= self.min_slots and self.peak <= self.capacity and self.startup <= self.capacity


@dataclass(kw_only=True, frozen=True, slots=True)
class MemoryPlan:
    """Bytes a rank holds in training (the largest over the ranks where they differ; every entry is per rank).

    Args:
        args (ModelArgs), dims (ParallelDims), settings (PlanSettings): what was planned.
        counts (ShardCounts): the placed policy's elements.
        activations (ActivationEstimate): one micro-batch's.
        params (int): the policy's parameters, FSDP2's padded shards.
        params_gathered (int): parameters gathered at once: the root (gathered from the forward to the end of the
            backward) and twice the largest other unit (the unit running and the next, prefetched: FSDP2's
            default of one unit ahead).
        grads (int): the sharded gradients, in the parameters' dtype (FSDP2 reduce-scatters in fp32 and casts back).
        grads_in_flight (int): whole gradients before their reduce-scatter, in the parameters' dtype, with the fp32
            reduce-scatter input: the root's (its output head's from the start of the backward to the root's
            reduce-scatter at its end) and the largest other unit's.
        reference (int): the frozen KL reference (sharded like the policy; 0 without ``--use-kl-loss``).
        optimizer (int): the optimizer's state of the rank's shards (on the host with offload).
        replica (int): the rank's part of its engine's copy of the policy (laid out by ``engine_tp`` /
            ``engine_ep``; none in one process, where the engine reads the policy).
        engine_slot (int): one cache slot of the engine on this rank (its heads' part).
        engine_snapshots (int): the engine's prefix-cache GDN snapshots on this rank.
        startup (int): the start of a run: the policy is built whole on every rank and copied whole for the
            reference before it is sharded, beside the engine's part.
    """

    args: ModelArgs
    dims: ParallelDims
    settings: PlanSettings
    counts: ShardCounts
    activations: ActivationEstimate
    params: int
    params_gathered: int
    grads: int
    grads_in_flight: int
    reference: int
    optimizer: int
    replica: int
    engine_slot: int
    startup: int
    engine_snapshots: int = 0

    @property
    def world(self) -> int:
        return world_of(self.dims)

    @property
    def gpu_optimizer(self) -> int:
        return 0 if self.settings.optimizer_cpu_offload else self.optimizer

    @property
    def before_engine(self) -> int:
        """What a rank's GPU holds when the engine is built and sizes its cache (shards, state, replica)."""
        return self.params + self.reference + self.gpu_optimizer + self.replica

    @property
    def in_training(self) -> int:
        """What a training step adds at its peak (every part at its own peak: an upper bound)."""
        return self.params_gathered + self.grads + self.grads_in_flight + self.activations.total

    @property
    def gpu_total(self) -> int:
        """A rank's GPU bytes at the peak of a training step, the engine's cache aside."""
        return self.before_engine + self.in_training

    def fit(self, gpu: str, capacity: int) -> Fit:
        """The plan on a GPU of ``capacity`` bytes: the engine takes cache slots up to ``mem_fraction_static`` of it,
        counting what is in use when it is built (``engine.model_runner``), at most the slots it asks for (all of
        them with ``--num-slots``)."""
        settings = self.settings
        budget = settings.mem_fraction_static * capacity - self.before_engine - self.engine_snapshots
        slots = settings.engine_slots
        if not settings.engine_slots_fixed:
            slots = max(0, min(slots, int(budget // self.engine_slot)))
        peak = self.gpu_total + self.engine_snapshots + slots * self.engine_slot
        return Fit(gpu, capacity, slots, peak, self.startup, settings.engine_min_slots)


def plan_memory(args: ModelArgs, dims: ParallelDims, settings: PlanSettings) -> MemoryPlan:
    """The :class:`MemoryPlan` of training ``args`` on ``dims`` (module docstring): the policy placed on the meta
    device over a fake process group of the world size, its shards counted on every rank."""
    world, s = world_of(dims), settings.dtype.itemsize
    if world == 1:
        counts = count_shards(placed_policy(args, dims, settings.dtype, settings.recompute), 1)
    else:
        with fake_process_group(world):
            counts = count_shards(placed_policy(args, dims, settings.dtype, settings.recompute), world)
    masters = settings.optimizer_cpu_offload or settings.dtype in (torch.bfloat16, torch.float16)
    per_element = OPTIMIZER_BYTES_WITH_MASTERS if masters else OPTIMIZER_BYTES_WITHOUT_MASTERS
    # in one process the trainer keeps the reference as a whole copy and the engine reads the policy
    whole = counts.numel * s
    reference = (counts.padded * s if world > 1 else whole) if settings.kl_reference else 0
    layout = EngineLayout(tp=settings.engine_tp, ep=settings.engine_ep)
    # expert blocks laid out alike on both sides are the trainer's own tensors (inference.shared_expert_blocks)
    shared = engine_shares_experts(dims, settings)
    replica = engine_part_numel(args, layout, with_experts=not shared) * s if world > 1 else 0
    slot = cache_bytes_per_slot(
        layout.cache_args(args), settings.engine_slot_len, settings.dtype, settings.engine_state_dtype
    )
    snapshots = settings.engine_snapshots * state_bytes_per_slot(
        layout.cache_args(args), settings.dtype, settings.engine_state_dtype
    )
    group = dims.tp * dims.cp
    return MemoryPlan(
        args=args,
        dims=dims,
        settings=settings,
        counts=counts,
        activations=activation_estimate(args, settings.max_tokens, group, settings.recompute, s),
        params=counts.padded * s,
        params_gathered=(counts.root_gathered + 2 * counts.layer_gathered) * s,
        grads=counts.padded * s,
        grads_in_flight=(counts.root_gathered + counts.layer_gathered) * (s + 4) if world > 1 else 0,
        reference=reference,
        optimizer=max(counts.local) * per_element,
        replica=replica,
        engine_slot=slot,
        engine_snapshots=snapshots,
        startup=replica + counts.padded * s + reference
        if settings.sharded_load and world > 1
        else whole + replica + (whole if settings.kl_reference else 0),
    )


def engine_part_numel(args: ModelArgs, layout: EngineLayout, with_experts: bool = True) -> int:
    """Elements of one rank's part of an engine laid out as ``layout`` (rank 0's; every rank's is the same size),
    its routed experts' included or not."""
    with torch.device("meta"):
        model = Transformer(args)
    params = [(n, p) for n, p in model.named_parameters() if with_experts or ".experts." not in n]
    return sum(layout.local_part(args, name, p).numel() for name, p in params)


def engine_shares_experts(dims: ParallelDims, settings: PlanSettings) -> bool:
    """Whether the engine reads its expert blocks from the trainer's shards (``inference.shared_expert_blocks``):
    the same ep over the ranks, each expert shard whole on its rank (no FSDP2 split over ``edp``, no ``etp``), no
    pipeline stages."""
    return dims.ep > 1 and settings.engine_ep == dims.ep and dims.edp == dims.etp == dims.pp == 1


def format_plan(plan: MemoryPlan, source: str) -> str:
    """The plan as aligned lines (GiB, or MiB for a model under 1 GiB), ``source`` naming where the architecture came
    from."""
    dims, settings, counts, acts = plan.dims, plan.settings, plan.counts, plan.activations
    world, dtype, s = plan.world, str(settings.dtype).removeprefix("torch."), settings.dtype.itemsize
    unit, scale = ("GiB", GiB) if plan.gpu_total >= GiB else ("MiB", 2**20)
    local = max(counts.local)
    rank = counts.local.index(local)
    spread = local - min(counts.local)
    alike = f"rank {rank}, the largest: uneven shards differ by up to {spread} elements" if spread else "ranks alike"
    lines = [
        f"memory plan: {world} ranks, tp {dims.tp} cp {dims.cp} ep {dims.ep} (dp {dims.dp}, edp {dims.edp}); policy "
        f"{source}, {elements(counts.numel)} parameters ({elements(counts.expert_numel)} in routed experts), {dtype}",
        f"per rank ({unit}), {alike}",
    ]
    offload = settings.optimizer_cpu_offload
    per_element = plan.optimizer // local if local else 0
    state = "float32 master, its gradient, Adam's 2 moments" if per_element == 16 else "Adam's 2 float32 moments"
    rows = [
        (
            "GPU",
            "parameters, FSDP2 shards",
            plan.params,
            f"{elements(local)} elements: {elements(counts.local_experts[rank])} of routed experts "
            f"({plan.args.num_experts // dims.ep} of {plan.args.num_experts} a layer) + "
            f"{elements(local - counts.local_experts[rank])} dense",
        ),
        (
            "GPU",
            "parameters gathered at once",
            plan.params_gathered,
            f"the root {counts.root_gathered * s / scale:.2f} (embedding, output head: gathered from forward to "
            f"backward) + 2 x {counts.layer_gathered * s / scale:.2f} (the largest layer, and the next prefetched)",
        ),
        ("GPU", "gradients, FSDP2 shards", plan.grads, f"{dtype} (reduce-scattered in float32)"),
        (
            "GPU",
            "gradients in flight",
            plan.grads_in_flight,
            "the root's and the largest layer's whole gradients and their float32 reduce-scatter input",
        ),
        (
            "GPU",
            "KL reference",
            plan.reference,
            "sharded like the policy (--use-kl-loss)" if settings.kl_reference else "none (no --use-kl-loss)",
        ),
        (
            "GPU",
            "engine weights",
            plan.replica,
            engine_note(plan) if world > 1 else "none: the engine reads the policy",
        ),
        (
            "GPU",
            "activations (an estimate)",
            acts.total,
            f"a micro-batch of {settings.max_tokens} tokens (--max-tokens-per-gpu), {acts.rows} rows a rank, "
            + (settings.recompute_label or ("recompute" if settings.recompute else "no recompute"))
            + f": kept {acts.kept / scale:.2f} + a layer 2 x {acts.layer / scale:.2f} + output head "
            f"{acts.head / scale:.2f}",
        ),
        (
            "host" if offload else "GPU",
            "optimizer",
            plan.optimizer,
            f"{per_element} B an element of the rank's shards: {state}"
            + (" (--optimizer-cpu-offload)" if offload else ""),
        ),
        ("GPU", "total, the engine's cache aside", plan.gpu_total, "every part at its peak"),
    ]
    width = max(len(name) for _, name, _, _ in rows)
    lines += [f"  {where:<4} {name:<{width}} {value / scale:8.2f}  {note}" for where, name, value, note in rows]
    slot, wanted = plan.engine_slot, settings.engine_slots
    taken = (
        "it allocates them (--num-slots)"
        if settings.engine_slots_fixed
        else f"it takes what fits under mem_fraction_static {settings.mem_fraction_static} of the GPU, counting "
        "what is in use"
    )
    lines.append(
        f"  engine cache: {slot / 2**20:.1f} MiB a slot ({settings.engine_slot_len} tokens), {wanted} slots "
        f"{wanted * slot / scale:.2f} {unit}; {taken}; a rollout needs {settings.engine_min_slots} (a prompt's samples)"
    )
    if settings.engine_snapshots:
        lines.append(
            f"  engine prefix cache: {settings.engine_snapshots} GDN state snapshots "
            f"{plan.engine_snapshots / scale:.2f} {unit} (--max-mamba-cache-size), taken before the slots"
        )
    if offload:
        node = settings.ranks_per_node
        lines.append(f"  host: the optimizer of a node of {node} ranks: {node * plan.optimizer / scale:.2f} {unit}")
    for gpu, capacity in GPUS.items():
        lines.append("  " + describe_fit(plan, plan.fit(gpu, capacity)))
    return "\n".join(lines)


def elements(count: int) -> str:
    """``4.438B``, ``12.3M``, ``512k``: a count of elements to 4 figures."""
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if count >= size:
            return f"{count / size:.4g}{suffix}"
    return str(count)


def engine_note(plan: "MemoryPlan") -> str:
    tp, ep = plan.settings.engine_tp, plan.settings.engine_ep
    if tp == ep == 1:
        return "each rank's engine holds a whole copy of the policy"
    note = f"this rank's part of an engine over {max(tp, ep)} ranks (heads over tp {tp}, experts over ep {ep})"
    if engine_shares_experts(plan.dims, plan.settings):
        note += "; its experts are the trainer's shards, read in place"
    return note


def describe_fit(plan: MemoryPlan, fit: Fit) -> str:
    """One line: whether training and the start of the run fit the GPU, and why not."""
    training = "fits" if fit.slots >= fit.min_slots and fit.peak <= fit.capacity else "does not fit"
    why = f"peak {fit.peak / GiB:.2f} GiB with {fit.slots} cache slots"
    if fit.slots < fit.min_slots:
        why += (
            f": {plan.before_engine / GiB:.2f} GiB in use when the engine is built, of the "
            f"{plan.settings.mem_fraction_static} x {fit.capacity / GiB:.0f} GiB it fills, and a rollout needs "
            f"{fit.min_slots} slots"
        )
    built = "the whole policy built on each rank" + (", copied for the reference" if plan.settings.kl_reference else "")
    built += ", then sharded" + (", beside the engine's part" if plan.replica else "")
    if plan.settings.sharded_load and plan.replica:
        built = "--load: each rank reads its shards of the policy and the reference, beside the engine's part"
    startup = "fits" if fit.startup <= fit.capacity else "does not fit"
    return (
        f"{fit.gpu}, {fit.capacity / GiB:.0f} GiB usable: training {training} ({why}); start-up "
        f"{fit.startup / GiB:.2f} GiB ({built}) {startup}"
    )
