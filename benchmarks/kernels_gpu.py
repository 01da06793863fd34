"""Decode-step kernels at the real model's sizes, each beside the bytes it must move (the memory bound at the
H200's 4.8 TB/s): the Gated DeltaNet recurrent step over states in their slots (for each block width and warp
count of the kernel, fp32 and bf16 states), the slot conv, and the two grouped GEMMs of the MoE experts at a
decode batch. Times are CUDA-event medians over ``--iters`` runs. Writes ``benchmarks/results/kernels_gpu.json``.

    python benchmarks/kernels_gpu.py [--batch 256] [--iters 50]
"""

import argparse
import json
import platform
import statistics
from pathlib import Path

import torch
import triton

import league
from league.ops.conv import causal_conv1d_slots
from league.ops.gdn import triton_recurrent
from league.ops.moe import grouped_swiglu_experts

HBM_BYTES_PER_S = 4.8e12
HK, HV, K, V, C, W = 16, 32, 128, 128, 8192, 4  # Qwen3.6-35B-A3B's GDN
D, E, FF, TOPK = 2048, 256, 512, 8  # and its MoE


def median_ms(fn, iters: int) -> float:
    fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def record(ms: float, num_bytes: float) -> dict:
    rate = num_bytes / ms * 1e3
    return {"ms": ms, "bytes": num_bytes, "tb_per_s": rate / 1e12, "bound_fraction": rate / HBM_BYTES_PER_S}


def gdn(batch: int, iters: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(0)
    mixed = torch.randn(batch, 1, 2 * HK * K + HV * V, generator=gen, device="cuda").bfloat16()
    q, k, v = mixed.split([HK * K, HK * K, HV * V], dim=-1)
    q, k, v = q.unflatten(-1, (HK, K)), k.unflatten(-1, (HK, K)), v.unflatten(-1, (HV, V))
    g = torch.nn.functional.logsigmoid(torch.randn(batch, 1, HV, generator=gen, device="cuda"))
    beta = torch.rand(batch, 1, HV, generator=gen, device="cuda").bfloat16()
    slots = torch.randperm(batch + 8, device="cuda")[:batch]
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        cache = torch.randn(batch + 8, HV, K, V, generator=gen, device="cuda").to(dtype) * 0.01
        num_bytes = 2 * batch * HV * K * V * dtype.itemsize
        for block_v in (8, 16, 32, 64):
            for warps in (1, 2, 4, 8):
                triton_recurrent._BLOCK_V, triton_recurrent._NUM_WARPS = block_v, warps

                def step(cache=cache):
                    triton_recurrent.recurrent_gated_delta_rule_slots_fwd(q, k, v, g, beta, cache, slots)

                name = f"{str(dtype).split('.')[-1]}_bv{block_v}_w{warps}"
                results[name] = record(median_ms(step, iters), num_bytes)
                print("gdn", name, json.dumps(results[name]), flush=True)
    return results


def conv(batch: int, iters: int) -> dict:
    x = torch.randn(batch, 1, C, device="cuda").bfloat16()
    weight = torch.randn(C, W, device="cuda").bfloat16()
    cache = torch.randn(batch + 8, C, W - 1, device="cuda").bfloat16()
    slots = torch.arange(batch, device="cuda")
    ms = median_ms(lambda: causal_conv1d_slots(x, weight, cache, slots), iters)
    return record(ms, batch * C * (2 + 2 + 2 * 2 * (W - 1)))


def moe(batch: int, iters: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(batch, D, generator=gen, device="cuda").bfloat16()
    w_gate_up = (torch.randn(E, 2 * FF, D, generator=gen, device="cuda") * 0.02).bfloat16()
    w_down = (torch.randn(E, D, FF, generator=gen, device="cuda") * 0.02).bfloat16()
    experts = torch.rand(batch, E, generator=gen, device="cuda").topk(TOPK).indices
    weights = torch.rand(batch, TOPK, generator=gen, device="cuda")
    touched = experts.unique().numel()
    ms = median_ms(lambda: grouped_swiglu_experts(x, w_gate_up, w_down, weights, experts), iters)
    rows, offs = x.repeat_interleave(TOPK, 0), _offsets(experts, E)
    gate_up_ms = median_ms(lambda: torch._grouped_mm(rows, w_gate_up.transpose(-2, -1), offs=offs), iters)
    expert_bytes = touched * 3 * D * FF * 2
    return {
        "experts_touched": touched,
        "grouped_swiglu_experts": record(ms, expert_bytes),
        "gate_up_grouped_mm_only": record(gate_up_ms, touched * 2 * D * FF * 2),
    }


def _offsets(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    counts = torch.bincount(experts.flatten(), minlength=num_experts)
    return counts.cumsum(0).to(torch.int32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "kernels_gpu.json")
    opts = parser.parse_args()
    default = triton_recurrent._BLOCK_V, triton_recurrent._NUM_WARPS
    results = {"gdn_recurrent_slots": gdn(opts.batch, opts.iters)}
    triton_recurrent._BLOCK_V, triton_recurrent._NUM_WARPS = default
    results["gdn_default"] = {"block_v": default[0], "num_warps": default[1]}
    results["conv_slots"] = conv(opts.batch, opts.iters)
    print("conv", json.dumps(results["conv_slots"]), flush=True)
    results["moe"] = moe(opts.batch, opts.iters)
    print("moe", json.dumps(results["moe"]), flush=True)
    out = {
        "benchmark": "kernels_gpu",
        "device": torch.cuda.get_device_name(),
        "versions": {
            "league": league.__version__,
            "torch": torch.__version__,
            "triton": triton.__version__,
            "python": platform.python_version(),
        },
        "settings": {k: v for k, v in vars(opts).items() if k != "out"} | {"hbm_bytes_per_s": HBM_BYTES_PER_S},
        "results": results,
    }
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
