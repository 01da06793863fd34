"""ParallelDims: the (TP, EP, CP, PP, ETP) layout of a job, validated against the world size.

Megatron's rules: the dense part uses world = dp * cp * tp * pp; the expert part is carved from the same
ranks as ep * etp * edp. Not responsible for building meshes or sharding modules (``launch``, ``parallelize``).
"""

import math
from dataclasses import dataclass


@dataclass(kw_only=True, slots=True)
class ParallelConfig:
    """Parallel layout (flag names as the reference system's launcher)."""

    tp: int = 1
    """Tensor-parallel size of the dense layers."""
    ep: int = 1
    """Expert-parallel size of the routed experts."""
    cp: int = 1
    """Context-parallel size (sequence split across ranks)."""
    pp: int = 1
    """Pipeline-parallel stages."""
    etp: int = 1
    """Expert tensor-parallel size: each routed expert's intermediate dim split over groups of this many ranks
    (carved with --ep from the same ranks: world = edp x ep x etp); must divide the experts' intermediate size."""
    nproc_per_node: int = 1
    """Processes to start on this machine: above 1, league starts them with torchrun (standalone) and they train
    data-parallel (FSDP2), one GPU each on CUDA. Under a torchrun of your own, leave it at 1: the world size is
    torchrun's."""

    def __post_init__(self) -> None:
        for name in ("tp", "ep", "cp", "pp", "etp", "nproc_per_node"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`--{name.replace('_', '-')}` must be a positive integer, got {value!r}")

    def resolve(self, world_size: int) -> "ParallelDims":
        """The full layout for ``world_size`` ranks; a clear error when the sizes do not divide."""
        dense = self.tp * self.cp * self.pp
        if world_size % dense:
            raise ValueError(
                f"world size {world_size} (the ranks of --nproc-per-node or torchrun) is not divisible by tp*cp*pp = "
                f"{self.tp}*{self.cp}*{self.pp}; start a multiple of {self.min_world_size} processes"
            )
        expert = self.ep * self.etp * self.pp
        if world_size % expert:
            raise ValueError(
                f"world size {world_size} (the ranks of --nproc-per-node or torchrun) is not divisible by ep*etp*pp = "
                f"{self.ep}*{self.etp}*{self.pp}; start a multiple of {self.min_world_size} processes"
            )
        dims = ParallelDims(
            dp=world_size // dense,
            tp=self.tp,
            cp=self.cp,
            pp=self.pp,
            ep=self.ep,
            etp=self.etp,
            edp=world_size // expert,
        )
        if self.pp > 1 and self.tp * self.cp > 1:
            raise ValueError(
                f"`--pp` {self.pp} with `--tp` {self.tp} `--cp` {self.cp} is not available in this version: a pipeline "
                "stage runs whole micro-batches; use pipeline stages with --ep (and data parallelism), or --tp/--cp "
                "without --pp"
            )
        return dims

    @property
    def sizes(self) -> tuple[int, int, int, int, int]:
        return self.tp, self.ep, self.cp, self.pp, self.etp

    @property
    def min_world_size(self) -> int:
        """The smallest world size the layout divides (lcm of the dense and the expert part)."""
        return math.lcm(self.tp * self.cp * self.pp, self.ep * self.etp * self.pp)


@dataclass(frozen=True, slots=True)
class ParallelDims:
    dp: int
    tp: int
    cp: int
    pp: int
    ep: int
    etp: int
    edp: int
