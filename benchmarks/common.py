"""What the benchmark scripts share: a model of any shape with random weights drawn on its device, the forward
batches of a teacher-forced decode, a relative-error measure, the summary of a torch.profiler run by kernel
bucket, and overrides of the Triton expert kernels' tiles."""

import dataclasses
import platform

import torch

import league
from league.bench import random_model  # noqa: F401  (the benchmarks' random weights)
from league.models.qwen3_5_moe import ForwardBatch, Transformer
from league.ops.numerics import FAST, Numerics


def versions() -> dict[str, str | None]:
    """The versions a benchmark record names: league, torch, triton and fla (``None`` when not importable), Python."""
    return {
        "league": league.__version__,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "fla": _version("fla"),
        "python": platform.python_version(),
    }


def write_record(name: str, device: torch.device, opts, dtype: torch.dtype, results) -> None:
    """``opts.out`` as a benchmark record: the benchmark, the device, versions, the commit, the settings (the
    script's options and ``dtype``) and ``results``."""
    import json
    import subprocess

    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    record = {
        "benchmark": name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "versions": versions(),
        "commit": commit,
        "settings": vars(opts) | {"out": str(opts.out), "dtype": str(dtype)},
        "results": results,
    }
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(record, indent=1))


def _version(name: str) -> str | None:
    try:
        return getattr(__import__(name), "__version__", "unknown")
    except Exception:  # not installed, or fails to import without a GPU
        return None


def override_moe_tiles(**fields) -> None:
    """Set ``fields`` (``block_m``, ``row_splits``: see ``ops.moe.triton.TileConfig``; ``None`` values are skipped) in
    every tile config of the Triton expert kernels, for engines made after the call (graphs capture the configs)."""
    fields = {k: v for k, v in fields.items() if v is not None}
    if not fields:
        return
    from league.ops.moe import triton as triton_moe

    triton_moe.CONFIGS = tuple(
        (bound, *(dataclasses.replace(c, **fields) for c in configs)) for bound, *configs in triton_moe.CONFIGS
    )


@torch.no_grad()
def widen(model: Transformer, init_std: float) -> None:
    """Scale every matrix of a :func:`random_model` (drawn with std 0.02) to std ``init_std``, in place: peaked
    next-token distributions, as a trained model has."""
    for p in model.parameters():
        if p.ndim >= 2:
            p.mul_(init_std / 0.02)


def teacher_forced_batches(
    num_seqs: int, prompt_len: int, end: int, device, numerics: Numerics = FAST
) -> tuple[ForwardBatch, object]:
    """The forward batches of a teacher-forced decode in cache slots ``0..num_seqs-1``, as ``LLMEngine._decode``
    builds them (without CUDA graphs): the prompts' prefill (``prompt_len`` tokens each, fresh slots), then a
    generator of ``(position, batch)``, one token per sequence a step at positions ``prompt_len .. end - 1``; all
    with ``numerics``, as the engine runs them."""
    slots = list(range(num_seqs))
    prefill = ForwardBatch.packed(
        numerics=numerics,
        seq_lens=[prompt_len] * num_seqs,
        device=device,
        cache_lens=[0] * num_seqs,
        slots=slots,
    )
    steps = (
        (
            p,
            ForwardBatch.packed(
                numerics=numerics,
                seq_lens=[1] * num_seqs,
                device=device,
                cache_lens=[p] * num_seqs,
                slots=slots,
            ),
        )
        for p in range(prompt_len, end)
    )
    return prefill, steps


def capture_graph(step) -> "torch.cuda.CUDAGraph":
    """``step`` run twice (compiling and autotuning outside the capture), then captured in a CUDA graph and
    replayed three times."""
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(3):
        graph.replay()
    return graph


def replay_ms(graph: "torch.cuda.CUDAGraph", iters: int) -> float:
    """ms per replay of ``graph``, ``iters`` replays back to back between CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def rel_err(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype = torch.float32) -> float:
    """Mean over rows of ``|a - b| / |b|`` (L2 over the last dim), computed in ``dtype``."""
    a, b = a.to(dtype), b.to(dtype)
    return ((a - b).norm(dim=-1) / b.norm(dim=-1)).mean().item()


# kernel-name fragments -> bucket, first match wins
BUCKETS = (
    ("moe_triton", ("_gate_up_swiglu_kernel", "_down_kernel", "_sort_pairs_kernel")),
    ("moe_grouped_gemm", ("grouped", "cutlass", "Grouped")),
    ("gdn_recurrent", ("recurrent_gated_delta",)),
    ("gdn_chunk", ("chunk_", "chunk_gated", "solve_tril", "wy_fast", "kkt", "cumsum")),
    ("conv", ("conv",)),
    ("attention", ("cached_attention", "flash", "attention", "fmha")),
    ("rms_norm", ("rms_norm",)),
    ("router", ("_route_topk_kernel",)),
    ("moe_tail", ("_silu_mul_kernel", "_add_gated_kernel")),
    ("logprob_head", ("_logprob", "logsumexp", "log_softmax")),
    ("gemm", ("gemm", "Gemm", "sm90_xmma", "nvjet", "addmm", "mm")),
    ("softmax_sampling", ("softmax", "exponential", "argmax", "topk", "sort", "_race_kernel")),
    ("optimizer", ("multi_tensor", "foreach", "adam")),
)


def bucket_of(name: str) -> str:
    for bucket, fragments in BUCKETS:
        if any(fragment in name for fragment in fragments):
            return bucket
    return "other"


def top_kernels(events, ms, top: int, width: int = 120) -> dict[str, float]:
    """The ``top`` longest kernels by name cut to ``width`` characters (kernels whose cut names agree summed)."""
    totals: dict[str, float] = {}
    for event in events:
        totals[event.key[:width]] = totals.get(event.key[:width], 0.0) + ms(event)
    return dict(sorted(totals.items(), key=lambda kv: -kv[1])[:top])


def kernel_summary(prof, steps: int, cuda: bool, top: int = 40, marker: tuple[str, int] | None = None) -> dict:
    """Device (or, without CUDA, CPU self) milliseconds per step: the total, by bucket, and the top kernels.

    ``marker`` = (kernel name, launches per step): count the steps from that kernel's launches rather than trust
    ``steps`` (on an H200 the profiler's records of decode steps lacked one step's kernels).
    """
    if marker is not None:
        launches = sum(e.count for e in prof.key_averages() if e.key == marker[0])
        steps = launches / marker[1] if launches else steps

    def ms(event) -> float:
        return (event.device_time_total if cuda else event.self_cpu_time_total) / 1e3 / steps

    events = [
        e
        for e in prof.key_averages()
        if ms(e) > 0
        and (not cuda or e.device_type == torch.autograd.DeviceType.CUDA)
        and not e.key.startswith("ProfilerStep")  # the schedule's step annotation, not a kernel
    ]
    buckets: dict[str, float] = {}
    for event in events:
        buckets[bucket_of(event.key)] = buckets.get(bucket_of(event.key), 0.0) + ms(event)
    return {
        "steps_recorded": steps,
        "kernel_ms_per_step": sum(buckets.values()),
        "kernel_ms_per_step_by_bucket": dict(sorted(buckets.items(), key=lambda kv: -kv[1])),
        "top_kernels_ms_per_step": top_kernels(events, ms, top),
    }
