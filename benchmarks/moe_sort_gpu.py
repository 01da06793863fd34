"""The sort of a decode step's token-expert pairs by expert, torch (``moe.sort_pairs``) against the one launch of
``ops.moe.triton.sort_pairs_triton`` that ``grouped_swiglu_experts_triton`` runs, at Qwen3.6-35B-A3B's sizes (256
experts, top-8, the experts routed from bf16 logits).

Each is timed per call two ways: eager, as ``--iters`` calls back to back between two CUDA events (the host's
launch cost included), and replayed from a CUDA graph holding ``--graph-calls`` calls, as a captured decode step
runs them (the launch gaps inside a graph included, the host's cost not); graph times are medians over ``--iters``
replays. Beside the times: whether the results are equal (the order and group ends, and the Triton inverse against
torch's scatter). Writes ``benchmarks/results/moe_sort_gpu.json``.

    python benchmarks/moe_sort_gpu.py [--tokens 1 16 64 256] [--iters 200] [--graph-calls 20]
"""

import argparse
import json
import platform
import statistics
from pathlib import Path

import torch
import triton

import league
from league.ops.moe import route_topk, sort_pairs
from league.ops.moe.triton import sort_pairs_triton

E, TOPK = 256, 8


def eager_us(fn, iters: int) -> float:
    """Microseconds per call of ``iters`` calls issued back to back."""
    fn()
    torch.cuda.synchronize()
    return timed_us(lambda: [fn() for _ in range(iters)]) / iters


def graph_us(fn, calls: int, iters: int) -> float:
    """Microseconds per call of ``calls`` calls captured in one CUDA graph (median over ``iters`` replays)."""
    fn()  # compiles and initialises outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return statistics.median(timed_us(graph.replay) for _ in range(iters)) / calls


def timed_us(fn) -> float:
    """Microseconds between CUDA events recorded before and after ``fn()``."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3


def agreement(experts_TA: torch.Tensor) -> dict:
    """Whether the Triton sort's results equal torch's, without and with the inverse permutation."""
    ref_order, ref_offs = sort_pairs(experts_TA, E)
    positions_N = torch.arange(ref_order.numel(), device=experts_TA.device)
    ref_inverse = torch.empty_like(ref_order).scatter_(0, ref_order, positions_N)
    order, offs, _ = sort_pairs_triton(experts_TA, E)
    with_inverse = sort_pairs_triton(experts_TA, E, with_inverse=True)
    return {
        "equal": torch.equal(order, ref_order) and torch.equal(offs, ref_offs),
        "with_inverse_equal": all(map(torch.equal, with_inverse, (ref_order, ref_offs, ref_inverse))),
    }


def times_us(experts_TA: torch.Tensor, iters: int, graph_calls: int) -> dict:
    """Per-call microseconds of torch's sort and the Triton sort of ``experts_TA``, eager and in a graph."""
    calls = {"torch": lambda: sort_pairs(experts_TA, E), "triton": lambda: sort_pairs_triton(experts_TA, E)}
    return {
        f"{name}_{mode}_us": timer(fn)
        for name, fn in calls.items()
        for mode, timer in (
            ("eager", lambda fn: eager_us(fn, iters)),
            ("graph", lambda fn: graph_us(fn, graph_calls, iters)),
        )
    }


@torch.no_grad()
def bench_sort(tokens: list[int], iters: int, graph_calls: int) -> dict:
    """For each token count: the times of :func:`times_us` and the agreement of the results."""
    results = {}
    for num_tokens in tokens:
        gen = torch.Generator(device="cuda").manual_seed(num_tokens)
        experts = route_topk(torch.randn(num_tokens, E, generator=gen, device="cuda").bfloat16(), TOPK)[1]
        results[f"tokens{num_tokens}"] = {
            "pairs": experts.numel(),
            "times": times_us(experts, iters, graph_calls),
            "agreement": agreement(experts),
        }
        print(num_tokens, json.dumps(results[f"tokens{num_tokens}"]), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--graph-calls", type=int, default=20)
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/moe_sort_gpu.json")
    opts = parser.parse_args()
    versions = {m.__name__: m.__version__ for m in (league, torch, triton)}
    out = {
        "benchmark": "moe_sort_gpu",
        "device": torch.cuda.get_device_name(),
        "versions": versions | {"python": platform.python_version()},
        "settings": {k: v for k, v in vars(opts).items() if k != "out"} | {"experts": E, "top_k": TOPK},
        "results": bench_sort(opts.tokens, opts.iters, opts.graph_calls),
    }
    path = opts.out or Path(__file__).parent / "results" / "moe_sort_gpu.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
