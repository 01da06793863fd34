"""Rounding an fp32 value to a narrower float dtype inside a Triton kernel, as torch rounds an op's result.

Imported only when Triton is installed.
"""

import triton
import triton.language as tl


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """fp32 ``x`` rounded to ``dtype`` (to nearest, ties to even) and back to fp32. Done on the bits for bf16: on an
    H200 a plain ``.to(bf16).to(fp32)`` of ``div_rn``'s result did not round (a kernel then matched torch's ops on
    ~80% of the elements; rounding the bits, on nearly all), while the same pair after ``/`` rounds in
    ``ops.moe.triton``. fp32 passes through."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    elif dtype == tl.float16:
        return x.to(tl.float16, fp_downcast_rounding="rtne").to(tl.float32)
    else:
        return x
