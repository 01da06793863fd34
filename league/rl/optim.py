"""Optimizer and learning-rate schedule for the policy: AdamW with decoupled weight decay on matrices
only (norm weights and other vectors are not decayed), global-norm gradient clipping, and optional CPU
offload (fp32 master weights, Adam moments and the update on the host, parameters copied back); fp32 master
weights beside bf16 parameters.

Not responsible for which parameters train (the caller passes them) nor for the loss.
"""

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta

from league.checks import check_int, check_number


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    """Optimizer settings (flag names as the reference system's)."""

    optimizer: str = "adam"
    """``adam`` (AdamW: decoupled weight decay)."""
    lr: float = 1e-6
    """Peak learning rate."""
    lr_decay_style: str = "constant"
    """``constant``, ``linear`` or ``cosine`` decay after warm-up."""
    lr_warmup_iters: int = 0
    """Optimizer steps of linear warm-up from 0."""
    lr_decay_iters: int | None = None
    """Steps over which the rate decays to min_lr (default: the run's total steps)."""
    min_lr: float = 0.0
    """Floor of the decayed learning rate."""
    weight_decay: float = 0.1
    """Decoupled weight decay of matrices."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.98
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Global L2 gradient-norm clip (0 disables)."""
    optimizer_cpu_offload: bool = False
    """Keep fp32 master weights and Adam states on the CPU and step there."""
    overlap_cpu_optimizer_d2h_h2d: bool = False
    """With the CPU-offloaded optimizer, step in buckets of parameters pipelined with their copies (the reference's
    name): every bucket's gradients stream to pinned host buffers on a side stream at once, each bucket is updated on
    the host as soon as its gradients have arrived, and its parameters stream back on another side stream while the
    next bucket updates. Same numbers as without it."""
    use_precision_aware_optimizer: bool = False
    """Megatron's precision-aware optimizer: low-precision (bf16) parameters stepped through fp32 master weights,
    gradients and Adam moments, at the precisions the four dtype options below name. league's optimizer always keeps
    fp32 masters, gradients and moments for bf16 parameters (on the host with offload), which is this flag with its
    defaults; it lets the dtype options be given, as in the reference."""
    main_grads_dtype: str = "fp32"
    """dtype of the gradients the optimizer reads (Megatron's name): fp32 (the only one league offers)."""
    main_params_dtype: str = "fp32"
    """dtype of the master weights: fp32 (the only one league offers)."""
    exp_avg_dtype: str = "fp32"
    """dtype of Adam's first moment: fp32 (the only one league offers)."""
    exp_avg_sq_dtype: str = "fp32"
    """dtype of Adam's second moment: fp32 (the only one league offers)."""

    def __post_init__(self) -> None:
        if self.optimizer != "adam":
            raise ValueError(f"`--optimizer` {self.optimizer!r} is not supported (expected 'adam')")
        if self.lr_decay_style not in ("constant", "linear", "cosine"):
            raise ValueError(f"`--lr-decay-style` {self.lr_decay_style!r}: expected constant, linear or cosine")
        for name in ("lr", "min_lr", "weight_decay", "clip_grad"):
            check_number(f"--{name.replace('_', '-')}", getattr(self, name), 0)
        for name in ("adam_beta1", "adam_beta2"):
            check_number(f"--{name.replace('_', '-')}", getattr(self, name), 0, 1, high_open=True)
        check_number("--adam-eps", self.adam_eps, 0, low_open=True)
        check_int("--lr-warmup-iters", self.lr_warmup_iters, 0)
        if self.overlap_cpu_optimizer_d2h_h2d and not self.optimizer_cpu_offload:
            raise ValueError(
                "`--overlap-cpu-optimizer-d2h-h2d` overlaps the copies of the CPU-offloaded optimizer: it needs "
                "`--optimizer-cpu-offload` (as in the reference)"
            )
        if self.lr_decay_iters is not None:
            check_int("--lr-decay-iters", self.lr_decay_iters, 1)
        for name in ("main_grads_dtype", "main_params_dtype", "exp_avg_dtype", "exp_avg_sq_dtype"):
            value, flag = getattr(self, name), f"--{name.replace('_', '-')}"
            if value == "fp32":
                continue
            if not self.use_precision_aware_optimizer:
                raise ValueError(f"`{flag}` {value} needs `--use-precision-aware-optimizer` (as in the reference)")
            raise ValueError(
                f"`{flag}` {value}: league's optimizer keeps fp32 masters, gradients and moments; lower-precision "
                "optimizer state is not available (leave it at fp32)"
            )


def lr_at(config: OptimConfig, step: int, total_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based)."""
    if config.lr_warmup_iters and step < config.lr_warmup_iters:
        return config.lr * (step + 1) / config.lr_warmup_iters
    if config.lr_decay_style == "constant":
        return config.lr
    span = max(1, (config.lr_decay_iters or total_steps) - config.lr_warmup_iters)
    progress = min(1.0, (step - config.lr_warmup_iters) / span)
    if config.lr_decay_style == "linear":
        factor = 1.0 - progress
    else:
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.min_lr + (config.lr - config.min_lr) * factor


BUCKET_ELEMENTS = 1 << 25
"""Elements (128 MiB of fp32 masters) a bucket of the overlapped offloaded step holds at most (one parameter larger
than that is a bucket of its own)."""


class Optimizer:
    """AdamW over the given parameters, stepping on their device or on the CPU (offload).

    Parameters in a low-precision dtype (bf16 training) get fp32 master copies, on their device or on the CPU with
    offload: the update is computed and accumulated in fp32 and rounded into the parameters after each step, so
    updates smaller than the parameters' precision are not lost. Gradients go into the masters' fp32 gradient
    buffers, and the masters back into the parameters, with one ``torch._foreach_copy_`` per (device, dtype) group.

    AdamW is torch's fused kernel (one pass over parameter, gradient and moments) when every master is on a CUDA
    device, or offloaded from CUDA parameters (torch's fused CPU kernel, multi-threaded: 6.2x the default's
    parameters/s on 2 cores, ``benchmarks/cpu_adam.py``), and torch's default otherwise. On the CPU the fused kernel
    differs from the default in the last fp32 bit, so CPU-only runs keep the default's numbers.

    Sharded parameters (FSDP2's DTensors) are updated through their local shards: the masters, moments and the
    update are each rank's own part, and the gradient norm is the global one (the shards' squares summed over
    ``group``).

    With offload and ``overlap_cpu_optimizer_d2h_h2d`` the parameters are stepped in buckets of at most
    ``bucket_elements`` elements, one AdamW each (the same per-element arithmetic as one AdamW over all of them, so
    the same numbers), their copies pipelined with the host's work (:meth:`_overlapped_step`); the masters and
    gradient buffers are then pinned when CUDA is present.

    Args:
        params (list[tuple[str, torch.nn.Parameter]]): named trainable parameters.
        config (OptimConfig): settings.
        fused (bool, Optional): force torch's fused AdamW on or off.
            Default: ``None`` (fused when every master is on CUDA).
        group (ProcessGroup, Optional): the ranks the parameters are sharded over. Default: ``None`` (one process).
        bucket_elements (int): the most elements a bucket of the overlapped step holds. Default:
            :data:`BUCKET_ELEMENTS`.
    """

    def __init__(
        self,
        params: list[tuple[str, torch.nn.Parameter]],
        config: OptimConfig,
        fused: bool | None = None,
        group: dist.ProcessGroup | None = None,
        bucket_elements: int = BUCKET_ELEMENTS,
    ):
        self.config, self.params, self.group = config, params, group
        self.offload = config.optimizer_cpu_offload
        self.overlap = self.offload and config.overlap_cpu_optimizer_d2h_h2d
        pin = self.overlap and torch.cuda.is_available()
        low_precision = any(p.dtype in (torch.bfloat16, torch.float16) for _, p in params)
        self.use_masters = self.offload or low_precision
        self.masters = [
            _local(p).detach().to("cpu" if self.offload else p.device, torch.float32, copy=True)
            if self.use_masters
            else _local(p)
            for _, p in params
        ]
        if pin:
            self.masters = [m.pin_memory() for m in self.masters]
        self.master_grads = [torch.empty_like(m, pin_memory=pin) for m in self.masters] if self.use_masters else []
        self.copy_groups = _copy_groups([p for _, p in params], self.masters)
        if fused is None:
            from_cuda = self.offload and any(_local(p).is_cuda for _, p in params)
            fused = bool(self.masters) and (all(m.is_cuda for m in self.masters) or from_cuda)
        sizes = [m.numel() for m in self.masters]
        self.buckets = _buckets(sizes, bucket_elements) if self.overlap else [list(range(len(params)))]
        self.inners = []
        for bucket in self.buckets:
            decay = [self.masters[i] for i in bucket if params[i][1].ndim >= 2]
            no_decay = [self.masters[i] for i in bucket if params[i][1].ndim < 2]
            groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
            self.inners.append(
                torch.optim.AdamW(
                    [g for g in groups if g["params"]] or groups[:1],
                    lr=config.lr,
                    betas=(config.adam_beta1, config.adam_beta2),
                    eps=config.adam_eps,
                    fused=fused,
                )
            )
        self._inner_of = {id(self.masters[i]): inn for bucket, inn in zip(self.buckets, self.inners) for i in bucket}
        self._streams = None

    def zero_grad(self) -> None:
        for _, p in self.params:
            p.grad = None

    def step(self, lr: float) -> float:
        """Clip, update, and return the gradient norm before clipping."""
        grads = [_local(p.grad) for _, p in self.params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.tensor(0.0)
        if self.group is not None:  # the shards' squares summed over the ranks
            squares = norm.detach().double().square()
            dist.all_reduce(squares, group=self.group)
            norm = squares.sqrt().to(norm.dtype)
        if self.config.clip_grad > 0 and grads:
            torch.nn.utils.clip_grads_with_norm_(grads, self.config.clip_grad, norm)
        for inner in self.inners:
            for group in inner.param_groups:
                group["lr"] = lr
        if self.overlap:
            self._overlapped_step()
            return float(norm)
        self._grads_to_masters()
        self.inners[0].step()
        if self.use_masters:
            with torch.no_grad():
                for indices in self.copy_groups:
                    params = [_local(self.params[i][1]) for i in indices]
                    torch._foreach_copy_(params, [self.masters[i] for i in indices], non_blocking=True)
        return float(norm)

    def _overlapped_step(self) -> None:
        """The offloaded step in buckets: every bucket's gradient copies to the host queued at once on a side stream
        (each bucket's end marked by an event), then bucket by bucket: wait for its gradients, update it on the host,
        queue its parameters' copies back on a second side stream, so that the device copies the next buckets'
        gradients and this bucket's parameters while the host updates. The compute stream waits for the copies back
        before anything reads the parameters. Without CUDA the same steps run one after another."""
        on_cuda = any(p.is_cuda for _, p in self.params)
        if on_cuda and self._streams is None:
            self._streams = torch.cuda.Stream(), torch.cuda.Stream()
        to_host, to_device = self._streams if on_cuda else (None, None)
        if on_cuda:
            to_host.wait_stream(torch.cuda.current_stream())
        arrived = []
        with torch.no_grad():
            for bucket in self.buckets:
                with torch.cuda.stream(to_host) if on_cuda else contextlib.nullcontext():
                    with_grad = [i for i in bucket if self.params[i][1].grad is not None]
                    grads = [_local(self.params[i][1].grad) for i in with_grad]
                    for i in bucket:
                        self.masters[i].grad = self.master_grads[i] if self.params[i][1].grad is not None else None
                    if with_grad:
                        torch._foreach_copy_([self.master_grads[i] for i in with_grad], grads, non_blocking=True)
                    if on_cuda:
                        for grad in grads:  # not reused by the compute stream before the copy has read it
                            grad.record_stream(to_host)
                        arrived.append(torch.cuda.Event())
                        arrived[-1].record(to_host)
            for k, (bucket, inner) in enumerate(zip(self.buckets, self.inners)):
                if on_cuda:
                    arrived[k].synchronize()
                inner.step()
                with torch.cuda.stream(to_device) if on_cuda else contextlib.nullcontext():
                    params = [_local(self.params[i][1]) for i in bucket]
                    torch._foreach_copy_(params, [self.masters[i] for i in bucket], non_blocking=True)
        if on_cuda:
            torch.cuda.current_stream().wait_stream(to_device)

    def _grads_to_masters(self) -> None:
        """Each master's ``.grad``: its fp32 buffer holding its parameter's (local) gradient, the local gradient itself
        without masters, or None as the parameter's."""
        if not self.use_masters:
            for master, (_, p) in zip(self.masters, self.params):
                if master is not p:  # a sharded parameter: the optimizer steps its local shard
                    master.grad = None if p.grad is None else _local(p.grad)
            return
        for indices in self.copy_groups:
            with_grad = [i for i in indices if self.params[i][1].grad is not None]
            for i in indices:
                self.masters[i].grad = self.master_grads[i] if self.params[i][1].grad is not None else None
            if with_grad:
                torch._foreach_copy_(
                    [self.master_grads[i] for i in with_grad], [_local(self.params[i][1].grad) for i in with_grad]
                )

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The optimizer's state by parameter name, for a checkpoint: ``master.<name>`` (the fp32 master, or the
        parameter itself where there are none), ``exp_avg.<name>``, ``exp_avg_sq.<name>`` and ``step.<name>``
        (Adam's moments and step count; zeros for a parameter not stepped yet, which is what Adam starts from).
        The state of a sharded parameter is a DTensor over this rank's local part with the parameter's mesh,
        placements and global shape, so a checkpoint of it loads at another number of ranks. The tensors are the
        optimizer's own (no copies): :meth:`load_state_dict` after filling them in place loads them."""
        state = {}
        for (name, p), master in zip(self.params, self.masters):
            adam = self._inner_of[id(master)].state.get(master) or _fresh_adam_state(master)
            state[f"master.{name}"] = _like(p, master)
            state[f"exp_avg.{name}"] = _like(p, adam["exp_avg"])
            state[f"exp_avg_sq.{name}"] = _like(p, adam["exp_avg_sq"])
            state[f"step.{name}"] = adam["step"]
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Continue from ``state`` (laid out as :meth:`state_dict`'s): the masters (and the parameters, rounded from
        them) are copied; Adam's moments and step counts are taken as they are (no copy: a resume fills
        :meth:`state_dict`'s fresh tensors and hands them back)."""
        index = {
            id(m): i for inner in self.inners for i, m in enumerate(m for g in inner.param_groups for m in g["params"])
        }
        adam = {id(inner): {} for inner in self.inners}
        with torch.no_grad():
            for (name, p), master in zip(self.params, self.masters):
                master.copy_(_local(state[f"master.{name}"]))
                if self.use_masters:
                    _local(p).copy_(master)
                adam[id(self._inner_of[id(master)])][index[id(master)]] = {
                    "step": state[f"step.{name}"],
                    "exp_avg": _local(state[f"exp_avg.{name}"]),
                    "exp_avg_sq": _local(state[f"exp_avg_sq.{name}"]),
                }
        for inner in self.inners:
            inner.load_state_dict({"state": adam[id(inner)], "param_groups": inner.state_dict()["param_groups"]})


def _buckets(sizes: list[int], most: int) -> list[list[int]]:
    """Consecutive indices grouped into buckets of at most ``most`` elements (a larger one alone)."""
    buckets, total = [[]], 0
    for i, size in enumerate(sizes):
        if buckets[-1] and total + size > most:
            buckets.append([])
            total = 0
        buckets[-1].append(i)
        total += size
    return buckets if buckets[0] else []


def _fresh_adam_state(master: torch.Tensor) -> dict[str, torch.Tensor]:
    """AdamW's state before its first step (torch creates the same lazily)."""
    zeros = torch.zeros_like(master, memory_format=torch.preserve_format)
    return {"step": torch.tensor(0.0), "exp_avg": zeros, "exp_avg_sq": zeros.clone()}


def _copy_groups(params: list[torch.Tensor], masters: list[torch.Tensor]) -> list[list[int]]:
    """Indices of the parameters grouped by (parameter device and dtype, master device): each group is one
    ``torch._foreach_copy_`` (CUDA's converts the dtype in one launch for one device and one source dtype)."""
    groups: dict[tuple, list[int]] = {}
    for i, (p, m) in enumerate(zip(params, masters)):
        groups.setdefault((p.device, p.dtype, m.device), []).append(i)
    return list(groups.values())


def _local(t: torch.Tensor) -> torch.Tensor:
    """A sharded tensor's local part (FSDP2's DTensor; a leaf sharing its memory), or the tensor itself."""
    return t.to_local().detach() if isinstance(t, DTensor) else t


def _like(param: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """``local`` (this rank's part of ``param``, any dtype and device) as a DTensor laid out as ``param`` is (mesh,
    placements, global shape), sharing its memory; ``local`` itself when ``param`` is not sharded. Made directly
    rather than by ``DTensor.from_local``, which would move a CPU-offloaded state to the mesh's device (FSDP2 makes
    its CPU-offloaded shards the same way)."""
    if not isinstance(param, DTensor):
        return local
    meta = TensorMeta(param.shape, param.stride(), local.dtype)
    spec = DTensorSpec(param.device_mesh, param.placements, tensor_meta=meta)
    return DTensor(local, spec, requires_grad=False)
