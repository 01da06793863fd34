"""Partial rotary position embedding (NeoX "rotate half" style on the first ``rotary_dim`` dims).

For text, the model's interleaved mRoPE has all three position rows equal, which is plain 1-D RoPE;
images and video are not handled here.

Legend: T tokens, H heads, K head dim, R rotary dim.
"""

import torch


def rope_inv_freq(rotary_dim: int, theta: float) -> torch.Tensor:
    """``theta ** (-2i / R)`` for i in [0, R/2), fp32."""
    return 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))


def rope_cos_sin(positions_T: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables ``[T, R]`` in fp32 for integer positions."""
    freqs_TR = positions_T.float()[:, None] * inv_freq.to(positions_T.device)[None, :]
    emb_TR = torch.cat([freqs_TR, freqs_TR], dim=-1)
    return emb_TR.cos(), emb_TR.sin()


def apply_rope(x_THK: torch.Tensor, cos_TR: torch.Tensor, sin_TR: torch.Tensor) -> torch.Tensor:
    """Rotate the first R dims of every head; the rest pass through.

    Args:
        x_THK (torch.Tensor): ``[T, H, K]``.
        cos_TR, sin_TR (torch.Tensor): ``[T, R]`` from :func:`rope_cos_sin`, R <= K, R even.
    """
    rotary_dim = cos_TR.shape[-1]
    cos = cos_TR.to(x_THK.dtype)[:, None, :]
    sin = sin_TR.to(x_THK.dtype)[:, None, :]
    x_rot, x_pass = x_THK[..., :rotary_dim], x_THK[..., rotary_dim:]
    half = rotary_dim // 2
    rotated = torch.cat([-x_rot[..., half:], x_rot[..., :half]], dim=-1)
    return torch.cat([x_rot * cos + rotated * sin, x_pass], dim=-1)
