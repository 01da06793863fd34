"""Where a decode step's time goes: the engine decodes a batch on random weights under torch.profiler, and the
kernel time is summed by what it belongs to (MoE expert GEMMs, GDN recurrence, attention, norms, other matmuls,
sampling and log-probs, the rest), beside the step's wall time. Writes ``benchmarks/results/profile_decode.json``
and a Chrome trace beside it.

    python benchmarks/profile_decode.py [--num-layers 40] [--batch 256] [--prompt-len 200] [--steps 8]
    python benchmarks/profile_decode.py --preset tiny --device cpu --num-layers 4 --batch 8   (a smoke test)
"""

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from common import random_model
from torch.profiler import ProfilerActivity, profile

import league
from league.engine.engine import EngineConfig, LLMEngine
from league.engine.request import SamplingParams
from league.models.qwen3_5_moe.presets import PRESETS, with_num_layers

# kernel-name fragments -> bucket, first match wins
BUCKETS = (
    ("moe_grouped_gemm", ("grouped", "cutlass", "Grouped")),
    ("gdn_recurrent", ("recurrent_gated_delta",)),
    ("attention", ("cached_attention", "flash", "attention")),
    ("rms_norm", ("rms_norm",)),
    ("gemm", ("gemm", "Gemm", "sm90_xmma", "nvjet", "addmm", "mm")),
    ("softmax_sampling_logprob", ("softmax", "exponential", "argmax", "logsumexp", "topk", "sort")),
)


def bucket_of(name: str) -> str:
    for bucket, fragments in BUCKETS:
        if any(fragment in name for fragment in fragments):
            return bucket
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="qwen3.6-35b-a3b")
    parser.add_argument("--num-layers", type=int, default=40)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=200)
    parser.add_argument("--steps", type=int, default=8, help="decode steps profiled")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "profile_decode.json")
    opts = parser.parse_args()
    cuda = opts.device == "cuda"
    args = with_num_layers(PRESETS[opts.preset], opts.num_layers).replace(mtp_num_layers=0)
    model = random_model(args, opts.device, torch.bfloat16 if cuda else torch.float32).eval()
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, args.vocab_size, (opts.batch, opts.prompt_len), generator=gen).tolist()
    warm = 4
    config = EngineConfig(
        max_running_requests=opts.batch,
        num_slots=opts.batch,
        context_length=opts.prompt_len + warm + opts.steps + 8,
        max_num_batched_tokens=8192,
        cuda_graph_bs=[opts.batch],
    )
    engine = LLMEngine(model, config)
    params = SamplingParams(max_new_tokens=warm + opts.steps + 1, temperature=opts.temperature, ignore_eos=True)
    for prompt in prompts:
        engine.add_request(prompt, params)
    while any(r.num_prefilled < len(r.prompt_ids) for r in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()  # prefill everything first
    for _ in range(warm):
        engine.step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(opts.steps):
            engine.step()
        if cuda:
            torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / opts.steps
    buckets: dict[str, float] = {}
    for event in prof.key_averages():
        device_us = event.device_time_total if cuda else event.self_cpu_time_total
        if device_us <= 0 or (cuda and event.device_type != torch.autograd.DeviceType.CUDA):
            continue
        key = bucket_of(event.key)
        buckets[key] = buckets.get(key, 0.0) + device_us / 1e3 / opts.steps
    kernel_ms = sum(buckets.values())
    trace = opts.out.with_suffix(".trace.json")
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(trace))
    record = {
        "benchmark": "profile_decode",
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "versions": {"league": league.__version__, "torch": torch.__version__, "python": platform.python_version()},
        "settings": {k: v for k, v in vars(opts).items() if k != "out"},
        "results": {
            "step_wall_ms": wall * 1e3,
            "tokens_per_s": opts.batch / wall,
            "kernel_ms_per_step": kernel_ms,
            "kernel_ms_per_step_by_bucket": dict(sorted(buckets.items(), key=lambda kv: -kv[1])),
            "top_kernels_ms_per_step": {
                e.key[:120]: (e.device_time_total if cuda else e.self_cpu_time_total) / 1e3 / opts.steps
                for e in sorted(
                    prof.key_averages(),
                    key=lambda e: -(e.device_time_total if cuda else e.self_cpu_time_total),
                )[:15]
            },
        },
    }
    opts.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record["results"], indent=2))


if __name__ == "__main__":
    main()
