"""``league init``: a randomly initialised checkpoint of a preset architecture, written in Hugging Face format
tensor by tensor, without building the model (the 35B preset needs memory for its largest tensor only).

Not responsible for the naming or the file format (``checkpoint.hf``, ``checkpoint.safetensors``).
"""

import math
from collections.abc import Iterator
from pathlib import Path

import torch

from league.checkpoint.fp8 import BLOCK, FP8_DTYPE, QUANTIZATION_CONFIG, SCALE_SUFFIX, is_quantized, quantize
from league.checkpoint.hf import hf_config, hf_tensor_specs, meta_model, parse_dtype, write_config
from league.checkpoint.qwen3_5_moe import to_hf_tensor
from league.checkpoint.safetensors import DEFAULT_MAX_SHARD_BYTES, TensorSpec, staged_folder, write_tensors
from league.checks import check_seed, check_writable
from league.models.qwen3_5_moe.args import ModelArgs
from league.models.qwen3_5_moe.model import Transformer, init_parameter


def preset_args(
    preset: str,
    num_layers: int | None = None,
    mtp_num_layers: int | None = None,
    dtype: str | None = None,
) -> ModelArgs:
    """A preset's architecture with the ``league init`` overrides applied (see :func:`init_checkpoint`)."""
    from league.models.qwen3_5_moe.presets import PRESETS, with_num_layers

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    args = PRESETS[preset]
    if num_layers is not None:
        args = with_num_layers(args, num_layers)
    if mtp_num_layers is not None:
        if mtp_num_layers < 0:
            raise ValueError(f"`mtp_num_layers` must be >= 0, got {mtp_num_layers}")
        args = args.replace(mtp_num_layers=mtp_num_layers)
    if dtype is not None:
        dense = "bfloat16" if dtype == "fp8" else dtype  # FP8: bf16 but for the quantised projections
        args = args.replace(dtype=str(parse_dtype(dense)).removeprefix("torch."))
    return args


def iter_init_tensors(model: Transformer, seed: int = 0, std: float = 0.02) -> Iterator[tuple[str, torch.Tensor]]:
    """(league name, initial value) of each parameter of a (meta-device) model, one tensor at a time,
    equal to what :meth:`Transformer.init_weights` with ``seed`` puts in a model of that dtype.

    Args:
        model (Transformer): gives names, shapes and dtypes; on the meta device it costs no memory.
        seed (int): the generator's seed. Default: ``0``.
        std (float): standard deviation of the matrices. Default: ``0.02``.
    """
    generator = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        yield name, init_parameter(name, p.shape, generator, std).to(p.dtype)


def init_checkpoint(
    preset: str,
    out: str | Path,
    *,
    num_layers: int | None = None,
    mtp_num_layers: int | None = None,
    seed: int = 0,
    dtype: str | None = None,
    force: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write a randomly initialised checkpoint of a preset in Hugging Face format, streaming.

    The model is never built: each parameter is drawn by :func:`init_parameter` (the rule of
    :meth:`Transformer.init_weights`, same order, same generator) and written before the next is drawn,
    so the 35B preset needs memory for its largest tensor only. The ``tiny`` preset also gets the tiny
    tokenizer.

    Args:
        preset (str): a name in :data:`league.models.qwen3_5_moe.presets.PRESETS`.
        out (str | Path): the folder to create.
        num_layers (int, Optional): decoder layers, repeating the preset's layer pattern. Default: the preset's.
        mtp_num_layers (int, Optional): MTP layers (0: none). Default: the preset's.
        seed (int): initialisation seed. Default: ``0``.
        dtype (str, Optional): ``float32`` / ``bfloat16`` / ``float16``, or ``fp8``: the FP8 release's layout, bf16
            but for the projections (``checkpoint.fp8.is_quantized``), stored as FP8 with 128 x 128 block scales.
            Default: the preset's.
        force (bool): replace a non-empty ``out``. Default: ``False``.
        max_shard_bytes (int): tensor bytes per shard at most. Default: 5 GB.
    """
    check_seed("--seed", seed)
    check_writable("--out", Path(out))
    args = preset_args(preset, num_layers, mtp_num_layers, dtype)
    model = meta_model(args, parse_dtype(args.dtype))
    specs = [spec for _, spec in hf_tensor_specs(model)]
    values = (to_hf_tensor(name, value) for name, value in iter_init_tensors(model, seed))
    config = hf_config(args)
    if dtype == "fp8":
        specs, values = fp8_specs(specs), fp8_values(specs, values)
        config["quantization_config"] = dict(QUANTIZATION_CONFIG)
    with staged_folder(out, force) as stage:
        write_config(stage, config)
        write_tensors(stage, specs, values, max_shard_bytes)
        if preset == "tiny":
            from league.tokenizer import build_tiny_tokenizer

            build_tiny_tokenizer().save_pretrained(stage)
    return Path(out)


def fp8_specs(specs: list[TensorSpec]) -> list[TensorSpec]:
    """The specs of an FP8 checkpoint: each projection in FP8, followed by its block scales."""
    out = []
    for spec in specs:
        if not is_quantized(spec.name):
            out.append(spec)
            continue
        *lead, rows, cols = spec.shape
        out.append(TensorSpec(name=spec.name, shape=spec.shape, dtype=FP8_DTYPE))
        scale_shape = (*lead, math.ceil(rows / BLOCK), math.ceil(cols / BLOCK))
        out.append(TensorSpec(name=spec.name + SCALE_SUFFIX, shape=scale_shape, dtype=torch.float32))
    return out


def fp8_values(specs: list[TensorSpec], values: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
    """``values`` (one per spec of the plain checkpoint) as the FP8 checkpoint's: projections quantised, each followed
    by its scales."""
    for spec, value in zip(specs, values):
        if is_quantized(spec.name):
            q, scale_inv = quantize(value)
            yield q
            yield scale_inv
        else:
            yield value
