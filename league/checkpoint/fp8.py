"""Block-quantised FP8 weights, as the model's FP8 release stores them: a projection's weight in ``float8_e4m3fn``
beside ``<name>_scale_inv``, one fp32 scale per 128 x 128 block of its last two dims (the dequantised weight is
``fp8 * scale_inv`` blockwise). Pure functions; loading dequantises (``checkpoint.hf``), ``league init --dtype fp8``
quantises (``checkpoint.init``). Not responsible for FP8 compute.
"""

import math

import torch

BLOCK = 128
SCALE_SUFFIX = "_scale_inv"
FP8_DTYPE = torch.float8_e4m3fn
FP8_NAMES = ("F8_E4M3",)
"""safetensors dtypes read as block-quantised FP8 (with their scales)."""
QUANTIZATION_CONFIG = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [BLOCK, BLOCK],
}
"""config.json's ``quantization_config`` of such a checkpoint."""


def is_quantized(hf_name: str) -> bool:
    """Whether the FP8 release stores this tensor quantised: the projections of attention, GDN (but its one-row-a-head
    ``in_proj_a`` / ``in_proj_b``) and the experts (``*_proj*.weight``, fused ``gate_up_proj`` / ``down_proj``); not
    embeddings, head, norms, router, gates, conv."""
    if hf_name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
        return True
    module = hf_name.removesuffix(".weight").rsplit(".", 1)[-1]
    return hf_name.endswith(".weight") and "_proj" in module and module not in ("in_proj_a", "in_proj_b")


def _blocks(scale_inv: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Each block's scale repeated over its elements, cropped to ``[..., rows, cols]``."""
    full = scale_inv.repeat_interleave(BLOCK, dim=-2).repeat_interleave(BLOCK, dim=-1)
    return full[..., :rows, :cols]


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fp8 weight, fp32 scale_inv)``: each 128 x 128 block of the last two dims scaled so its largest magnitude
    is FP8's largest (448), then rounded to FP8."""
    rows, cols = weight.shape[-2:]
    w = weight.float()
    pad = (0, math.ceil(cols / BLOCK) * BLOCK - cols, 0, math.ceil(rows / BLOCK) * BLOCK - rows)
    padded = torch.nn.functional.pad(w, pad)
    lead = padded.shape[:-2]
    tiles = padded.reshape(*lead, padded.shape[-2] // BLOCK, BLOCK, padded.shape[-1] // BLOCK, BLOCK)
    amax = tiles.abs().amax(dim=(-3, -1)).clamp(min=1e-12)
    scale_inv = amax / torch.finfo(FP8_DTYPE).max
    q = (w / _blocks(scale_inv, rows, cols)).to(FP8_DTYPE)
    return q, scale_inv


def dequantize(q: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """The fp32 weight of an FP8 weight and its block scales."""
    rows, cols = q.shape[-2:]
    expected = (*q.shape[:-2], math.ceil(rows / BLOCK), math.ceil(cols / BLOCK))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"block scales of shape {list(scale_inv.shape)} for a weight of shape {list(q.shape)}; "
            f"expected {list(expected)} (128 x 128 blocks)"
        )
    return q.float() * _blocks(scale_inv.float(), rows, cols)
