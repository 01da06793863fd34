"""Processes of a run: the ranks torchrun started (or the one process), their process group and device mesh, and
``league train --nproc-per-node N``, which starts torchrun itself.

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE and the rendezvous in each process's environment; a process run without
it is a world of one. Ranks use gloo on CPU and NCCL on CUDA (one GPU per local rank). Not responsible for what the
ranks compute (``parallelize``, the trainer and the loop decide that).
"""

import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

T = TypeVar("T")


def world_size() -> int:
    """Ranks of this run as torchrun set them (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


@dataclass(frozen=True, slots=True)
class Ranks:
    """This process's place among the run's ranks, and the few collectives the loop needs.

    Args:
        rank (int): this process's rank (0 logs, evaluates for the console, writes the run folder).
        world (int): number of ranks.
        mesh (DeviceMesh, Optional): the mesh over every rank (None in a one-process run).
        expert_mesh (DeviceMesh, Optional): with expert (tensor) parallelism, this stage's ranks as
            ``(edp, ep, etp)``: the ``etp`` ranks of a group hold the same experts, each a share of their intermediate
            dim; the ``ep`` groups of a row hold all experts between them; the ``edp`` ranks of a column hold the same
            shards.
        token_mesh (DeviceMesh, Optional): with head parallelism (tp x cp > 1), this stage's ranks as
            ``(dp, token)``: the ranks of a ``token`` row share each micro-batch (``heads``), the rows hold different
            samples.
        pipe_mesh (DeviceMesh, Optional): with pipeline parallelism, every rank as ``(pp, stage)``: a ``pp`` column
            is one pipeline (its ranks hold consecutive stages and share every sample), a ``stage`` row holds the
            ranks of one stage (FSDP2 shards that stage's weights over them).
    """

    rank: int = 0
    world: int = 1
    mesh: DeviceMesh | None = None
    expert_mesh: DeviceMesh | None = None
    token_mesh: DeviceMesh | None = None
    pipe_mesh: DeviceMesh | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def group(self) -> dist.ProcessGroup | None:
        """Every rank."""
        return None if self.mesh is None else self.mesh.get_group()

    @property
    def stage_mesh(self) -> DeviceMesh | None:
        """The ranks of this rank's pipeline stage (every rank without pipeline parallelism): FSDP2 shards over
        them."""
        return self.mesh if self.pipe_mesh is None else self.pipe_mesh["stage"]

    @property
    def pp_size(self) -> int:
        return 1 if self.pipe_mesh is None else self.pipe_mesh["pp"].size()

    @property
    def stage(self) -> int:
        """This rank's pipeline stage (0 without pipeline parallelism)."""
        return 0 if self.pipe_mesh is None else self.pipe_mesh["pp"].get_local_rank()

    @property
    def pp_group(self) -> dist.ProcessGroup | None:
        """The ranks of this rank's pipeline, one per stage (None without pipeline parallelism)."""
        return None if self.pipe_mesh is None else self.pipe_mesh["pp"].get_group()

    @property
    def data_group(self) -> dist.ProcessGroup | None:
        """The ranks of this stage holding different samples of each optimizer step (one per token group)."""
        if self.token_mesh is not None:
            return self.token_mesh["dp"].get_group()
        mesh = self.stage_mesh
        return None if mesh is None else mesh.get_group()

    @property
    def token_group(self) -> dist.ProcessGroup | None:
        """The ranks sharing this rank's micro-batches (None without head parallelism)."""
        return None if self.token_mesh is None else self.token_mesh["token"].get_group()

    @property
    def token_size(self) -> int:
        return 1 if self.token_mesh is None else self.token_mesh["token"].size()

    @property
    def dp_rank(self) -> int:
        """This rank's data-parallel rank: the block of each optimizer step's samples it trains on (the same for
        the ranks of a token group and for the stages of a pipeline)."""
        return self.rank % (self.world // self.pp_size) // self.token_size

    @property
    def dp_size(self) -> int:
        return self.world // self.pp_size // self.token_size

    def broadcast(self, value: T) -> T:
        """Rank 0's ``value`` on every rank (any picklable object)."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def block(self, items: Sequence[T]) -> list[T]:
        """This rank's contiguous block of ``items`` (the blocks of ranks 0, 1, ... in turn make up ``items``; sizes
        differ by at most one)."""
        start, stop = block_bounds(len(items), self.rank, self.world)
        return list(items[start:stop])

    def gather_blocks(self, block: list[T]) -> list[T]:
        """The concatenation, in rank order, of every rank's ``block`` (the inverse of :meth:`block`)."""
        if self.world == 1:
            return list(block)
        blocks: list[Any] = [None] * self.world
        dist.all_gather_object(blocks, block, group=self.group)
        return [item for b in blocks for item in b]

    def step_share(self, items: Sequence[T], global_batch_size: int) -> list[T]:
        """This rank's part of each optimizer step: ``items`` is cut into windows of ``global_batch_size`` (one
        optimizer step each, as one process trains) and each window into ``dp_size`` equal blocks; the ranks of
        data-parallel rank r (a token group) train on the r-th block of every window."""
        if global_batch_size % self.dp_size:
            raise ValueError(
                f"`--global-batch-size` {global_batch_size} does not split over {self.dp_size} data-parallel ranks"
            )
        per_rank, r = global_batch_size // self.dp_size, self.dp_rank
        return [
            item
            for start in range(0, len(items), global_batch_size)
            for item in items[start + r * per_rank : start + (r + 1) * per_rank]
        ]


def block_bounds(num: int, rank: int, world: int) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s block when ``num`` items are split into ``world`` contiguous blocks."""
    base, extra = divmod(num, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


@contextmanager
def distributed(device_type: str, ep: int = 1, token: int = 1, pp: int = 1, etp: int = 1) -> Iterator[Ranks]:
    """The process group of a torchrun launch for the block (destroyed after it), or a one-process ``Ranks``.

    On CUDA each process takes the GPU of its local rank and NCCL; on CPU, gloo."""
    if not under_torchrun() or world_size() == 1:
        yield Ranks()
        return
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    try:
        yield make_ranks(device_type, dist.get_world_size(), ep, token, pp, etp)
    finally:
        dist.destroy_process_group()


def make_ranks(device_type: str, world: int, ep: int = 1, token: int = 1, pp: int = 1, etp: int = 1) -> Ranks:
    """``Ranks`` of this process in an initialised process group of ``world`` ranks: the mesh over all; with ``pp``
    > 1 the pipeline mesh ``(pp, stage)``; within a stage's ranks, with ``ep`` or ``etp`` > 1 the expert mesh
    ``(edp, ep, etp)`` and with ``token`` (tp x cp) > 1 the token mesh ``(dp, token)``. Consecutive ranks form a
    token group, and an expert tensor-parallel group inside an expert group (``etp`` innermost, then ``ep``); the
    stages are the outermost dimension (as Megatron and torchtitan lay them out: the groups that talk most sit on
    neighbouring GPUs)."""
    mesh = init_device_mesh(device_type, (world,), mesh_dim_names=("world",))
    stage = world // pp
    pipe_mesh = expert_mesh = token_mesh = None
    if pp > 1:
        pipe_mesh = init_device_mesh(device_type, (pp, stage), mesh_dim_names=("pp", "stage"))
    if ep * etp > 1:
        shape = (pp, stage // (ep * etp), ep, etp)
        experts = init_device_mesh(device_type, shape, mesh_dim_names=("pp", "edp", "ep", "etp"))
        expert_mesh = experts["edp", "ep", "etp"]
    if token > 1:
        tokens = init_device_mesh(device_type, (pp, stage // token, token), mesh_dim_names=("pp", "dp", "token"))
        token_mesh = tokens["dp", "token"]
    return Ranks(
        rank=dist.get_rank(),
        world=world,
        mesh=mesh,
        expert_mesh=expert_mesh,
        token_mesh=token_mesh,
        pipe_mesh=pipe_mesh,
    )


def torchrun_command(nproc_per_node: int, args: list[str]) -> list[str]:
    """The command that runs ``league <args>`` in ``nproc_per_node`` processes on this machine (torchrun,
    standalone: a local rendezvous on a free port)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc_per_node}",
        "-m",
        "league",
        "--",  # the rest is league's: torchrun's parser would take `--n` for an abbreviation of one of its options
        *args,
    ]


def relaunch(nproc_per_node: int, args: list[str]) -> int:
    """Run ``league <args>`` under torchrun with ``nproc_per_node`` processes; returns its exit code. Unless
    OMP_NUM_THREADS is set, the machine's cores are shared out among the processes (torch's CPU threads)."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc_per_node)))
    return subprocess.run(torchrun_command(nproc_per_node, args), env=env, check=False).returncode


def become_torchrun(nproc_per_node: int, args: list[str]) -> None:
    """Replace this process by torchrun running ``league <args>`` in ``nproc_per_node`` processes (so that a signal
    to this process, a server's SIGTERM, reaches torchrun, which passes it to the ranks). CPU threads shared out as
    :func:`relaunch` does. Does not return."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc_per_node)))
    sys.stdout.flush()
    sys.stderr.flush()
    command = torchrun_command(nproc_per_node, args)
    os.execve(command[0], command, env)


def run_world_size(nproc_per_node: int) -> int:
    """The ranks a run has: torchrun's world under torchrun (where ``nproc_per_node`` must be 1 or torchrun's own
    count per node, as when ``league train --nproc-per-node N`` started it), else ``nproc_per_node``."""
    if not under_torchrun():
        return nproc_per_node
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))
    if nproc_per_node not in (1, local):
        raise ValueError(
            f"`--nproc-per-node` {nproc_per_node} under a torchrun of {local} processes per node: torchrun decides "
            "the processes; leave league's --nproc-per-node at 1"
        )
    return world_size()
