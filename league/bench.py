"""``league bench``: the engine's rollout throughput on one device, beside the memory roofline of a decode step.

B prompts of random token ids, ``new_tokens`` generated for each with EOS ignored (an RL rollout's shape), on a
checkpoint or on a preset's architecture with random weights drawn directly on the device (no checkpoint on disk:
:func:`random_model`). Timing: one call to warm up (kernels compile, the decode graph of the batch's size is
captured on CUDA), the same call generating one token (the prefill), then the whole call; the decode rate is
``B * (new_tokens - 1) / (total - prefill)`` (NaN when the whole call took no longer than the prefill). The
roofline is the rate at which a decode step would run if it only moved the bytes it must at
``memory_bytes_per_s``: the weights it reads (all non-expert weights, and the experts its batch routes to under
uniform routing), each request's GDN state and conv window read and written, and its keys and values read at the
mean context.

Not responsible for choosing kernels (the ops do) nor for the benchmark records of ``benchmarks/``, which call it.
"""

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from league.checks import check_number
from league.engine.config import EngineConfig
from league.engine.engine import LLMEngine
from league.engine.request import SamplingParams
from league.models.qwen3_5_moe import ModelArgs, Transformer
from league.ops.rope import rope_inv_freq
from league.parallel.inference import EngineLayout

H200_BYTES_PER_S = 4.8e12  # the datasheet's HBM bandwidth of the reference job's GPU


@dataclass(kw_only=True, slots=True)
class BenchSettings:
    """One rollout measurement."""

    batch: int = 256
    """Requests decoded together (one engine slot each)."""
    prompt_len: int = 200
    """Tokens of each random prompt."""
    new_tokens: int = 1024
    """Tokens generated for each request, EOS ignored."""
    temperature: float = 1.0
    """Sampling temperature (0: greedy)."""
    spec_steps: int = 0
    """MTP draft steps per verify (0: no speculation; the model needs an MTP layer)."""
    mamba_ssm_dtype: str = "float32"
    """Cached GDN state dtype: float32 or bfloat16."""
    numerics: str = "fast"
    """The engine's numerics (``fast``, ``batch_invariant`` or ``decode_parity``: the trainer's log-probs then equal
    the engine's)."""
    overlap: bool = True
    """The engine's overlap schedule (a step's tokens read back after the next step is launched)."""
    memory_bytes_per_s: float = H200_BYTES_PER_S
    """The device's memory bandwidth, for the roofline."""
    seed: int = 0
    """Seed of the random prompts."""

    def check(self, args: ModelArgs) -> None:
        if min(self.batch, self.prompt_len) < 1 or self.new_tokens < 2:
            raise ValueError("batch and prompt_len must be at least 1, new_tokens at least 2")
        if self.spec_steps < 0 or (self.spec_steps and args.mtp_num_layers == 0):
            raise ValueError("spec_steps needs a model with an MTP layer (and must not be negative)")
        if self.mamba_ssm_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"mamba_ssm_dtype {self.mamba_ssm_dtype!r}: expected float32 or bfloat16")
        check_number("memory_bytes_per_s", self.memory_bytes_per_s, 0, low_open=True)


def random_model(args: ModelArgs, device: str = "cuda", dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """``args``'s model with the distributions of ``league init`` (normal(0, 0.02) matrices, zero (1+w) norms, ones
    for the gated norm and dt_bias, ``A_log = log(U(0.01, 16))``, uniform conv kernels), drawn directly on ``device``
    in ``dtype`` (a 35 B model is made in seconds on a GPU, without a checkpoint on disk)."""
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to(dtype).to_empty(device=device)  # cast on meta: no full-size fp32 copy on the device
    return fill_random(model, seed)


def fill_random(model: Transformer, seed: int = 0) -> Transformer:
    """:func:`random_model`'s values drawn into ``model``'s allocated parameters, in place (an engine's part of the
    model too: the ranks of an engine, drawing from the same seed, hold the same values where they hold the same
    parameters)."""
    args, device = model.args, next(model.parameters()).device
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.uniform_(0.01, 16.0).log_()
            elif name.endswith(("dt_bias", "norm_weight")):
                p.fill_(1.0)
            elif name.endswith("conv_weight"):
                bound = p.shape[-1] ** -0.5
                p.uniform_(-bound, bound)
            elif p.ndim == 1:
                p.zero_()
            else:
                p.normal_(0.0, 0.02)
    model.inv_freq = rope_inv_freq(args.rotary_dim, args.rope_theta).to(device)
    return model


def bench_model(
    model_dir: Path | None = None,
    preset: str | None = None,
    num_layers: int | None = None,
    mtp_num_layers: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    tp: int = 1,
    ep: int = 1,
    world: int = 1,
) -> tuple[Transformer, EngineLayout]:
    """The model to time and its engine layout: a checkpoint folder, or a preset's architecture (``num_layers`` and
    ``mtp_num_layers`` overriding its own) with :func:`random_model` weights; on ``device`` (default cuda when
    available) in ``dtype`` (default bfloat16 on a GPU, float32 on the CPU). ``world`` > 1: this process's part of
    one engine over that many processes (``tp`` heads, ``ep`` experts; a preset's part is made on the device
    directly, never whole)."""
    from league.checkpoint.hf import meta_model, resolve_device_dtype
    from league.models.qwen3_5_moe.presets import PRESETS, with_num_layers
    from league.parallel.inference import (
        SERVE_FLAGS,
        laid_out_model,
        make_engine_layout,
        place_engine_model,
        resolve_engine_sizes,
    )

    if (model_dir is None) == (preset is None):
        raise ValueError("give exactly one of --model (a checkpoint folder) and --preset (random weights)")
    torch_device, torch_dtype = resolve_device_dtype(device, dtype)
    if model_dir is not None:
        if num_layers is not None or mtp_num_layers is not None:
            raise ValueError("--num-layers and --mtp-num-layers apply to --preset only")
        model, layout, _ = laid_out_model(model_dir, torch_device, torch_dtype, tp, ep, world)
        return model, layout
    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r}: expected one of {', '.join(PRESETS)}")
    args = PRESETS[preset]
    if num_layers is not None:
        if num_layers < 1:
            raise ValueError("--num-layers must be at least 1")
        args = with_num_layers(args, num_layers)
    if mtp_num_layers is not None:
        args = args.replace(mtp_num_layers=mtp_num_layers)
    if world == 1:
        check_fits(args, torch_device, torch_dtype)
        return random_model(args, str(torch_device), torch_dtype).eval(), EngineLayout()
    tp, ep = resolve_engine_sizes(None, tp, ep, world, SERVE_FLAGS)
    layout = make_engine_layout(args, tp, ep, torch_device.type)
    model = place_engine_model(meta_model(args, torch_dtype), layout).to_empty(device=torch_device)
    return fill_random(model).eval(), layout


def check_fits(args: ModelArgs, device: torch.device, dtype: torch.dtype) -> None:
    """Raise a ``ValueError`` naming the sizes when ``args``'s weights in ``dtype`` exceed ``device``'s free
    memory (on the CPU: its physical memory), rather than failing inside an allocation."""
    with torch.device("meta"):
        num_params = sum(p.numel() for p in Transformer(args).parameters())
    need = num_params * dtype.itemsize
    if device.type == "cuda":
        have = torch.cuda.mem_get_info(device)[0]
    else:
        have = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if need > have:
        raise ValueError(
            f"the weights alone need {need / 2**30:.1f} GiB in {str(dtype).removeprefix('torch.')}, and {device.type} "
            f"has {have / 2**30:.1f} GiB; use fewer layers (--num-layers) or another dtype or device"
        )


def param_counts(args: ModelArgs) -> dict[str, int]:
    """Parameters of the trunk (no MTP) by kind: ``experts`` (the routed experts), ``embedding``, ``other``."""
    with torch.device("meta"):
        model = Transformer(args.replace(mtp_num_layers=0))
    counts = {"experts": 0, "embedding": 0, "other": 0}
    for name, p in model.named_parameters():
        key = "experts" if ".experts." in name else "embedding" if name.startswith("tok_embeddings") else "other"
        counts[key] += p.numel()
    return counts


def step_bytes(args: ModelArgs, batch: int, context: float, state_bytes: int = 4, weight_bytes: int = 2) -> float:
    """Bytes one decode step of ``batch`` requests at mean ``context`` must move: the non-expert weights (the
    embedding is a lookup), the experts that ``batch`` tokens route to under uniform routing, each request's GDN
    state (``state_bytes`` an element) and conv window read and written, and its keys and values read."""
    expert = 3 * args.dim * args.moe_intermediate_size * weight_bytes
    experts_per_layer = args.num_experts * (1 - (1 - args.num_experts_per_tok / args.num_experts) ** batch)
    expert_bytes = args.num_layers * experts_per_layer * expert
    dense_bytes = param_counts(args)["other"] * weight_bytes
    num_gdn = sum(kind == "linear_attention" for kind in args.layer_types)
    num_full = args.num_layers - num_gdn
    state = num_gdn * args.linear_num_value_heads * args.linear_key_head_dim * args.linear_value_head_dim * state_bytes
    conv = num_gdn * args.gdn_conv_dim * (args.linear_conv_kernel_dim - 1) * weight_bytes
    kv = num_full * 2 * args.num_kv_heads * args.head_dim * weight_bytes * context
    return expert_bytes + dense_bytes + batch * (2 * state + 2 * conv + kv)


def roofline_tokens_per_s(args: ModelArgs, settings: BenchSettings, weight_bytes: int = 2) -> float:
    """Decode tokens/s if each step moved only :func:`step_bytes` at the settings' bandwidth, at the mean context
    of the rollout (the prompt and half the new tokens)."""
    context = settings.prompt_len + settings.new_tokens / 2
    state_bytes = getattr(torch, settings.mamba_ssm_dtype).itemsize
    moved = step_bytes(args, settings.batch, context, state_bytes, weight_bytes)
    return settings.batch / (moved / settings.memory_bytes_per_s)


def rollout_rates(model: Transformer, settings: BenchSettings, layout: EngineLayout | None = None) -> dict[str, float]:
    """Time a rollout of ``settings`` on ``model`` (see the module doc; ``layout``: this rank's part of an engine
    over several, every rank calling this together): seconds, prefill seconds, tokens/s (all new tokens over the
    whole call), decode tokens/s, the roofline of the whole model's step and the decode rate's fraction of it, and
    the tokens per verify step under speculation."""
    layout = layout or EngineLayout()
    args = model.args
    settings.check(args)
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(settings.seed)
    prompts = torch.randint(0, args.vocab_size, (settings.batch, settings.prompt_len), generator=gen).tolist()
    config = EngineConfig(
        max_running_requests=settings.batch,
        num_slots=settings.batch,
        context_length=settings.prompt_len + settings.new_tokens + 8,
        max_num_batched_tokens=8192,
        cuda_graph_bs=[settings.batch] if device.type == "cuda" else None,
        speculative_algorithm="EAGLE" if settings.spec_steps else None,
        speculative_num_steps=max(settings.spec_steps, 1),
        mamba_ssm_dtype=settings.mamba_ssm_dtype,
        disable_overlap_schedule=not settings.overlap,
        numerics=settings.numerics,
        tp_size=layout.tp,
        ep_size=layout.ep,
    )
    engine = LLMEngine(model, config, layout=layout)
    temperature = settings.temperature

    def run(new_tokens: int) -> float:
        params = SamplingParams(max_new_tokens=new_tokens, temperature=temperature, ignore_eos=True)
        _synchronize(device)
        start = time.perf_counter()
        engine.generate(prompts, params)
        _synchronize(device)
        return time.perf_counter() - start

    run(min(8, settings.new_tokens))  # compile and capture
    prefill_s = run(1)
    verify_steps, verified = engine.stats.spec.verify_steps, engine.stats.spec.verified_output_tokens
    total_s = run(settings.new_tokens)
    decode_s = total_s - prefill_s  # NaN rate below: too few new tokens to time apart from the prefill
    record = {
        "seconds": total_s,
        "prefill_seconds": prefill_s,
        "tokens_per_s": settings.batch * settings.new_tokens / total_s,
        "decode_tokens_per_s": settings.batch * (settings.new_tokens - 1) / decode_s if decode_s > 0 else float("nan"),
    }
    weight_bytes = next(model.parameters()).element_size()
    record["roofline_tokens_per_s"] = roofline_tokens_per_s(args, settings, weight_bytes)
    record["roofline_fraction"] = record["decode_tokens_per_s"] / record["roofline_tokens_per_s"]
    if settings.spec_steps:
        steps = engine.stats.spec.verify_steps - verify_steps
        record["spec_accept_length"] = (engine.stats.spec.verified_output_tokens - verified) / max(steps, 1)
    return record


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
