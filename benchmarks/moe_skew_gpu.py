"""The Triton expert kernels of a whole decode step on the routing a decode batch really has, tile settings side by
side in one process: does a setting that shortens the profiled kernels shorten the step?

The 40-layer Qwen3.6-35B-A3B shape is drawn with random weights (``common.random_model``); a prefill of
``--prompts`` random prompts of ``--prompt-len`` tokens records each layer's expert choices, and each layer gets a
decode batch of ``--batch`` tokens drawn from them (on random weights the routing is uneven: a few experts take
tens of rows where the mean is 8, a fifth take none; ``--uniform`` adds the same step on uniform random routing).
For each setting the experts of all layers (sort, gate-up, down and the combine, on that layer's own expert
weights and random inputs) are captured in one CUDA graph and timed two ways: replays back to back between CUDA
events (``replay_ms``, the step's share), and under torch.profiler (``profiled_kernel_ms``, the sum of the kernels'
times). ``bound_fraction`` is the experts' weight bytes (those with rows) over ``replay_ms`` at 4.8 TB/s.

Settings are ``NAME=BM,SPLITS[,BM_DOWN,SPLITS_DOWN]`` (rows per tile and row splits of the gate-up kernel, then of
the down kernel; both the same if two numbers are given). Writes ``benchmarks/results/moe_skew_gpu.json``.

    python benchmarks/moe_skew_gpu.py [--num-layers 40] [--batch 256]
        [--settings "default=16,1 splits4=16,4 splits4_gate_up=16,4,16,1 bm32=32,1 bm64=64,1"]
"""

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
from common import capture_graph, random_model, replay_ms, versions
from profile_decode import record_routing
from torch.profiler import ProfilerActivity, profile

from league.models.qwen3_5_moe import ForwardBatch
from league.models.qwen3_5_moe.presets import PRESETS, with_num_layers
from league.ops.moe import triton as triton_moe

HBM_BYTES_PER_S = 4.8e12


def parse_settings(text: str) -> dict[str, tuple[int, int, int, int]]:
    """``"name=16,1 other=16,4,16,1"`` -> ``{name: (bm_gate_up, splits_gate_up, bm_down, splits_down)}``."""
    settings = {}
    for item in text.split():
        name, _, values = item.partition("=")
        numbers = [int(v) for v in values.split(",")]
        if len(numbers) == 2:
            numbers = numbers * 2
        if len(numbers) != 4 or not name:
            raise ValueError(f"setting {item!r}: expected NAME=BM,SPLITS or NAME=BM,SPLITS,BM_DOWN,SPLITS_DOWN")
        settings[name] = tuple(numbers)
    return settings


def with_tiles(base, bm_gate_up: int, splits_gate_up: int, bm_down: int, splits_down: int):
    """``ops.moe.triton.CONFIGS`` with these rows per tile and row splits in every gate-up and down config."""
    return tuple(
        (
            bound,
            dataclasses.replace(gate_up, block_m=bm_gate_up, row_splits=splits_gate_up),
            dataclasses.replace(down, block_m=bm_down, row_splits=splits_down),
        )
        for bound, gate_up, down in base
    )


def decode_routing(calls: list[torch.Tensor], num_layers: int, batch: int, seed: int = 0) -> list[torch.Tensor]:
    """One ``[batch, A]`` set of expert ids per layer, drawn from that layer's prefill choices (the first
    ``num_layers`` recorded calls are the layers of the first prefill forward, in order)."""
    gen = torch.Generator().manual_seed(seed)
    sets = []
    for experts_TA in calls[:num_layers]:
        pick = torch.randperm(experts_TA.shape[0], generator=gen)[:batch]
        sets.append(experts_TA[pick].contiguous())
    return sets


def time_step(step, iters: int) -> tuple[float, float]:
    """``step`` captured in a CUDA graph: (ms per replay between events, profiled kernel ms per replay)."""
    graph = capture_graph(step)
    ms = replay_ms(graph, iters)
    profiled = 5
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(profiled):
            graph.replay()
        torch.cuda.synchronize()
    kernel_us = sum(e.device_time_total for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA)
    return ms, kernel_us / 1e3 / profiled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="qwen3.6-35b-a3b")
    parser.add_argument("--num-layers", type=int, default=40)
    parser.add_argument("--batch", type=int, default=256, help="decode batch (tokens per layer)")
    parser.add_argument("--prompts", type=int, default=32, help="prompts of the prefill that records the routing")
    parser.add_argument("--prompt-len", type=int, default=200)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--settings", default="default=16,1 splits4=16,4 splits4_gate_up=16,4,16,1 bm32=32,1 bm64=64,1")
    parser.add_argument("--uniform", action="store_true", help="also time the default on uniform random routing")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "moe_skew_gpu.json")
    opts = parser.parse_args()
    settings = parse_settings(opts.settings)
    args = with_num_layers(PRESETS[opts.preset], opts.num_layers).replace(mtp_num_layers=0)
    model = random_model(args).eval()
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (opts.prompts * opts.prompt_len,), generator=gen).cuda()
    batch = ForwardBatch.packed(seq_lens=[opts.prompt_len] * opts.prompts, device="cuda")
    calls: list[torch.Tensor] = []
    unwrap = record_routing(calls)
    with torch.no_grad():
        model(tokens, batch)
    unwrap()
    routing = decode_routing(calls, opts.num_layers, opts.batch)
    experts = [layer.moe.experts for layer in model.layers]
    top_k = args.num_experts_per_tok
    weights = torch.full((opts.batch, top_k), 1.0 / top_k, dtype=torch.bfloat16, device="cuda")
    xs = [torch.randn(opts.batch, args.dim, generator=gen).to("cuda", torch.bfloat16) for _ in experts]

    def runner(sets: list[torch.Tensor]):
        def step() -> None:
            with torch.no_grad():
                for x, e, ids in zip(xs, experts, sets):
                    triton_moe.grouped_swiglu_experts_triton(x, e.w_gate_up, e.w_down, weights, ids)

        return step

    def bytes_moved(sets: list[torch.Tensor]) -> int:
        per_expert = experts[0].w_gate_up[0].nbytes + experts[0].w_down[0].nbytes
        return sum(int(torch.unique(ids).numel()) * per_expert for ids in sets)

    cuda_sets = [ids.cuda() for ids in routing]
    counts = torch.stack([torch.bincount(ids.flatten(), minlength=args.num_experts) for ids in routing]).float()
    base = triton_moe.CONFIGS
    results = {}
    variants = [(name, tiles, cuda_sets) for name, tiles in settings.items()]
    if opts.uniform:
        uniform = [
            torch.stack([torch.randperm(args.num_experts, generator=gen)[:top_k] for _ in range(opts.batch)]).cuda()
            for _ in experts
        ]
        variants.append(("default_uniform_routing", settings.get("default", (16, 1, 16, 1)), uniform))
    for name, tiles, sets in variants:
        triton_moe.CONFIGS = with_tiles(base, *tiles)
        step_ms, kernel_ms = time_step(runner(sets), opts.iters)
        moved = bytes_moved(sets)
        results[name] = {
            "tiles": dict(zip(("bm_gate_up", "splits_gate_up", "bm_down", "splits_down"), tiles)),
            "replay_ms": step_ms,
            "profiled_kernel_ms": kernel_ms,
            "bytes": moved,
            "bound_fraction": moved / HBM_BYTES_PER_S / (step_ms / 1e3),
        }
        print(name, json.dumps(results[name]), flush=True)
    triton_moe.CONFIGS = base
    record = {
        "benchmark": "moe_skew_gpu",
        "device": torch.cuda.get_device_name(),
        "versions": versions(),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(opts).items()},
        "routing": {
            "mean_rows": counts.mean().item(),
            "max_rows_mean_over_layers": counts.max(dim=1).values.mean().item(),
            "idle_experts_share": (counts == 0).float().mean().item(),
        },
        "results": results,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
