"""How a forward computes its numbers: one setting, decided once (a command's ``--numerics``, an engine's or a
trainer's config), carried by the forward's batch and read by every op below it.

- ``fast``: the fastest forms (GPU kernels where they apply, BLAS matmuls, chunked GDN for long sequences).
- ``batch_invariant``: every token's numbers are computed independently of the other tokens and sequences in the
  forward (row-wise matmuls, step-by-step GDN, per-row attention, fixed-order elementwise sums), so prefill,
  decode, verify and training agree bitwise on any device. Slower; meant for exact checks and small models.
- ``decode_parity``: a whole-sequence forward (training, prefill) runs the token mixers as decode runs them (the
  recurrent GDN kernel, the decode attention kernel; gradients from the chunked GDN and flash attention), and every
  forward runs the dense projections by a GEMM whose rounding does not change with the row count (``ops.linear``'s
  fixed tiles, bf16/fp16 on CUDA); so a trainer's log-probs equal the ones the engine sampled with, at GPU speed.

Not responsible for which kernels exist (``ops.backends`` decides whether one runs).
"""

from dataclasses import dataclass

MODES = ("fast", "batch_invariant", "decode_parity")


@dataclass(frozen=True, slots=True)
class Numerics:
    """A numerics mode and what it asks of the ops.

    Args:
        mode (str): ``fast``, ``batch_invariant`` or ``decode_parity``. Default: ``fast``.
    """

    mode: str = "fast"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"`numerics` {self.mode!r}: expected one of {', '.join(MODES)}")

    @property
    def row_by_row(self) -> bool:
        """Each row's numbers independent of the other rows (the ``batch_invariant`` mode): the reference forms
        with fixed-order sums, no fast kernel whose result depends on the batch."""
        return self.mode == "batch_invariant"

    @property
    def as_decode(self) -> bool:
        """Whole sequences computed as decode computes them, and fixed-tiles GEMMs (the ``decode_parity`` mode)."""
        return self.mode == "decode_parity"

    def plain_gemm(self) -> "Numerics":
        """These numerics for a matmul that decode parity does not run by fixed tiles (the output head, the
        experts): row by row stays row by row, the rest is fast."""
        return FAST if self.as_decode else self

    @property
    def step_by_step(self) -> bool:
        """The GDN recurrence stepped token by token even over long sequences (no chunked form)."""
        return self.mode != "fast"


FAST = Numerics("fast")
BATCH_INVARIANT = Numerics("batch_invariant")
DECODE_PARITY = Numerics("decode_parity")
