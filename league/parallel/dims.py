"""ParallelDims: the (TP, EP, CP, PP, ETP) layout of a job, validated against the world size.

Megatron's rules: the dense part uses world = dp * cp * tp * pp; the expert part is carved from the same
ranks as ep * etp * edp. Not responsible for building meshes or sharding modules.
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
    """Tensor-parallel size inside each expert."""

    def __post_init__(self) -> None:
        for name in ("tp", "ep", "cp", "pp", "etp"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`--{name}` must be a positive integer, got {value!r}")

    def resolve(self, world_size: int) -> "ParallelDims":
        """The full layout for ``world_size`` ranks; a clear error when the sizes do not divide."""
        dense = self.tp * self.cp * self.pp
        if world_size % dense:
            raise ValueError(f"world size {world_size} is not divisible by tp*cp*pp = {self.tp}*{self.cp}*{self.pp}")
        expert = self.ep * self.etp * self.pp
        if world_size % expert:
            raise ValueError(f"world size {world_size} is not divisible by ep*etp*pp = {self.ep}*{self.etp}*{self.pp}")
        dims = ParallelDims(
            dp=world_size // dense,
            tp=self.tp,
            cp=self.cp,
            pp=self.pp,
            ep=self.ep,
            etp=self.etp,
            edp=world_size // expert,
        )
        if world_size == 1:
            return dims
        raise ValueError(
            f"parallel layout tp={self.tp} ep={self.ep} cp={self.cp} pp={self.pp} etp={self.etp} over {world_size} "
            "ranks is not available in this version: league runs on one process (every size 1); multi-GPU layouts "
            "come with the parallel-layouts work (league.parallel)"
        )

    def check_single_process(self) -> "ParallelDims":
        """Validate for a one-process run: every size must be 1, or a clear error says why not."""
        return self.resolve(1 if self.sizes == (1, 1, 1, 1, 1) else self.min_world_size)

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
