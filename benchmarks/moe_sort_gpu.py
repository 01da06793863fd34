"""The MoE bookkeeping of a decode step, torch against ``ops.triton_route``, at Qwen3.6-35B-A3B's sizes (256
experts, top-8, hidden 2048, bf16 router logits): the routing (``moe.route_topk``), the sort of the pairs by expert
with its inverse (``moe.sort_pairs`` and the scatter of ``moe.grouped_swiglu_experts``), and the combine
(``moe._combine``).

Each part is timed per call two ways: eager, as ``--iters`` calls back to back between two CUDA events (the host's
launch cost included), and replayed from a CUDA graph holding ``--graph-calls`` calls, as a captured decode step
runs them (the launch gaps inside a graph included, the host's cost not); graph times are medians over ``--iters``
replays. Beside the times: how many results differ from torch, and probes of torch's own summation orders on this
GPU (the softmax's, the top-k sum's, the combine's) that say which differences are expected. Writes
``benchmarks/results/route_gpu.json``.

    python benchmarks/route_gpu.py [--tokens 1 16 64 256] [--iters 200] [--graph-calls 20]
"""

import argparse
import json
import platform
import statistics
from pathlib import Path

import torch
import triton

import league
from league.ops.moe import _combine, route_topk, sort_pairs
from league.ops.triton_route import combine_triton, route_topk_triton, sort_pairs_triton

D, E, TOPK = 2048, 256, 8


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


def torch_sort(experts_TA: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    order_N, offs_E = sort_pairs(experts_TA, E)
    inverse_N = torch.empty_like(order_N).scatter_(0, order_N, torch.arange(order_N.numel(), device="cuda"))
    return order_N, offs_E, inverse_N


def inputs(num_tokens: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(num_tokens)
    logits = torch.randn(num_tokens, E, generator=gen, device="cuda").bfloat16()
    experts = route_topk(logits, TOPK)[1]
    return {
        "logits": logits,
        "experts": experts,
        "inverse": torch_sort(experts)[2],
        "y": torch.randn(num_tokens * TOPK, D, generator=gen, device="cuda").bfloat16(),
    }


def agreement(x: dict) -> dict:
    """How many Triton results differ from torch's (bf16 and fp32 routing, sort, combine)."""
    weights, experts = route_topk_triton(x["logits"], TOPK)
    ref_weights, ref_experts = route_topk(x["logits"], TOPK)
    weights32, experts32 = route_topk_triton(x["logits"].float(), TOPK)
    ref_weights32, ref_experts32 = route_topk(x["logits"].float(), TOPK)
    sorted_equal = all(torch.equal(a, b) for a, b in zip(sort_pairs_triton(x["experts"], E), torch_sort(x["experts"])))
    out, ref_out = combine_triton(x["y"], x["inverse"], TOPK), _combine(x["y"], x["inverse"], TOPK)
    return {
        "route_bf16_experts_differing": (experts != ref_experts).sum().item(),
        "route_bf16_weights_differing": (weights != ref_weights).sum().item(),
        "route_fp32_experts_differing": (experts32 != ref_experts32).sum().item(),
        "route_fp32_weights_differing": (weights32 != ref_weights32).sum().item(),
        "sort_equal": sorted_equal,
        "combine_differing": (out != ref_out).sum().item(),
        "combine_max_abs_diff": (out.float() - ref_out.float()).abs().max().item(),
        "numel": {"weights": weights.numel(), "combine": out.numel()},
    }


def in_order(x_TKD: torch.Tensor) -> torch.Tensor:
    acc = x_TKD[:, 0]
    for k in range(1, x_TKD.shape[1]):
        acc = acc + x_TKD[:, k]
    return acc


def pairwise(x_TKD: torch.Tensor) -> torch.Tensor:
    while x_TKD.shape[1] > 1:
        half = x_TKD.shape[1] // 2
        x_TKD = x_TKD[:, :half] + x_TKD[:, half:]
    return x_TKD[:, 0]


def warp_softmax(x_TE: torch.Tensor) -> torch.Tensor:
    """torch's CUDA softmax for rows of 256 as its warp kernel sums (32 lanes of 8 elements, then a butterfly)."""
    e_TE = torch.exp(x_TE - x_TE.max(-1, keepdim=True).values)
    s_TW = in_order(e_TE.view(-1, E // 32, 32))
    while s_TW.shape[-1] > 1:
        s_TW = s_TW[:, : s_TW.shape[-1] // 2] + s_TW[:, s_TW.shape[-1] // 2 :]
    return e_TE / s_TW


def torch_orders(num_tokens: int) -> dict:
    """Mismatch counts of torch's own sums against in-order and pairwise sums: which order it uses here."""
    gen = torch.Generator(device="cuda").manual_seed(7)
    x_TE = torch.randn(num_tokens, E, generator=gen, device="cuda") * 2
    w_TA = x_TE.softmax(-1).topk(TOPK).values
    y_TAD = torch.randn(num_tokens, TOPK, D, generator=gen, device="cuda")
    count = lambda a, b: (a != b).sum().item()
    return {
        "softmax_vs_warp_order": count(x_TE.softmax(-1), warp_softmax(x_TE)),
        "topk_sum_vs_in_order": count(w_TA.sum(-1), in_order(w_TA[..., None])[:, 0]),
        "topk_sum_vs_pairwise": count(w_TA.sum(-1), pairwise(w_TA[..., None])[:, 0]),
        "combine_fp32_vs_in_order": count(y_TAD.sum(1), in_order(y_TAD)),
        "combine_fp32_vs_pairwise": count(y_TAD.sum(1), pairwise(y_TAD)),
    }


def parts(x: dict) -> dict:
    """``{part: (torch call, Triton call)}`` on the inputs ``x``."""
    return {
        "route": (lambda: route_topk(x["logits"], TOPK), lambda: route_topk_triton(x["logits"], TOPK)),
        "sort": (lambda: torch_sort(x["experts"]), lambda: sort_pairs_triton(x["experts"], E)),
        "combine": (
            lambda: _combine(x["y"], x["inverse"], TOPK),
            lambda: combine_triton(x["y"], x["inverse"], TOPK),
        ),
    }


@torch.no_grad()
def bench_route(tokens: list[int], iters: int, graph_calls: int) -> dict:
    """For each token count: per-call microseconds of the three parts, torch and Triton, eager and in a graph;
    the agreement of the results; and the probes of torch's summation orders."""
    results = {}
    for num_tokens in tokens:
        x = inputs(num_tokens)
        timings = {}
        for part, (torch_fn, triton_fn) in parts(x).items():
            timings[part] = {
                f"{name}_{mode}_us": timer(fn)
                for name, fn in (("torch", torch_fn), ("triton", triton_fn))
                for mode, timer in (
                    ("eager", lambda fn: eager_us(fn, iters)),
                    ("graph", lambda fn: graph_us(fn, graph_calls, iters)),
                )
            }
        results[f"tokens{num_tokens}"] = {
            "times": timings,
            "agreement": agreement(x),
            "torch_orders": torch_orders(num_tokens),
        }
        print(num_tokens, json.dumps(results[f"tokens{num_tokens}"]), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--graph-calls", type=int, default=20)
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/route_gpu.json")
    opts = parser.parse_args()
    versions = {m.__name__: m.__version__ for m in (league, torch, triton)}
    out = {
        "benchmark": "route_gpu",
        "device": torch.cuda.get_device_name(),
        "versions": versions | {"python": platform.python_version()},
        "settings": {k: v for k, v in vars(opts).items() if k != "out"} | {"dim": D, "experts": E, "top_k": TOPK},
        "results": bench_route(opts.tokens, opts.iters, opts.graph_calls),
    }
    path = opts.out or Path(__file__).parent / "results" / "route_gpu.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
