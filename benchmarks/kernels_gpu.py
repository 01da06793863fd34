"""Decode-step kernels at the real model's sizes, each beside the bytes it must move (the memory bound at the
H200's 4.8 TB/s): the Gated DeltaNet recurrent step over states in their slots (for each block width and warp
count of the kernel, fp32 and bf16 states), the slot conv, and the MoE experts: the two grouped GEMMs at a decode
batch, and at each of ``--moe-batches`` the grouped GEMMs against the Triton kernels of ``ops.moe.triton`` (the
whole call, and each kernel alone for a list of tile configs; replayed from a CUDA graph as decode runs them, over
8 layers' weights in turn so that no layer finds its experts in L2; the bytes are the weights of the experts that
received a token); the router's softmax and top-k (torch against the Triton kernel at each rows-per-program and
warp count) and the token log-probs over the 248,320-column logits (torch against the Triton pass), each replayed
40 times in a CUDA graph as the 40 MoE layers run it; and each dense projection of a decode step by cuBLAS
against the fixed-tiles Triton GEMM (``ops.linear.triton``). Times are CUDA-event medians over ``--iters`` runs. Writes
``benchmarks/results/kernels_gpu.json`` (``kernels_gpu_<only>.json`` with ``--only``).

    python benchmarks/kernels_gpu.py [--batch 256] [--iters 50] [--only moe]
"""

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

import torch
from common import versions

from league.ops.conv import causal_conv1d_slots
from league.ops.gdn import triton_recurrent
from league.ops.logprob import token_logprobs, token_logprobs_reference
from league.ops.moe import (
    TRITON_MAX_ROWS_PER_EXPERT,
    grouped_swiglu_experts,
    route_topk_reference,
    sort_pairs,
    triton_router,
)
from league.ops.moe.triton import TileConfig, down_fwd, gate_up_swiglu_fwd, grouped_swiglu_experts_triton, tile_configs

HBM_BYTES_PER_S = 4.8e12
HK, HV, K, V, C, W = 16, 32, 128, 128, 8192, 4  # Qwen3.6-35B-A3B's GDN
D, E, FF, TOPK = 2048, 256, 512, 8  # and its MoE
# (block_m, block_n, block_k, num_warps, num_stages) tried for each Triton MoE kernel
GATE_UP_CONFIGS = [
    TileConfig(16, 16, 128, 4, 4),
    TileConfig(16, 32, 128, 4, 4),
    TileConfig(16, 32, 256, 4, 3),
    TileConfig(16, 64, 64, 4, 6),
    TileConfig(16, 64, 128, 4, 4),
    TileConfig(16, 64, 128, 8, 4),
    TileConfig(16, 128, 128, 8, 2),
    TileConfig(32, 64, 128, 4, 4),
    TileConfig(64, 64, 128, 4, 3),
]
DOWN_CONFIGS = [
    TileConfig(16, 32, 128, 4, 4),
    TileConfig(16, 64, 128, 4, 4),
    TileConfig(16, 64, 256, 4, 2),
    TileConfig(16, 128, 64, 4, 4),
    TileConfig(16, 128, 128, 4, 4),
    TileConfig(16, 256, 64, 8, 4),
    TileConfig(32, 64, 128, 4, 4),
    TileConfig(64, 128, 64, 4, 3),
]
MOE_LAYERS = 8  # weight copies the MoE timings cycle through: 40 layers of a decode step do not share L2 (50 MB)


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


def graph_ms(fn, iters: int) -> float:
    """Median time of ``fn`` replayed from a CUDA graph (as the decode step runs: no launch gaps)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return median_ms(graph.replay, iters)


def router(batch: int, iters: int, repeats: int = 40) -> dict:
    """The router's softmax and top-8 over 256 experts, ``repeats`` calls in one graph: ms a call."""
    logits = torch.randn(batch, E + 1032, device="cuda").bfloat16()[:, :E]  # a slice of the joined projection
    results = {"torch": graph_ms(lambda: [route_topk_reference(logits, TOPK) for _ in range(repeats)], iters) / repeats}
    default = triton_router._BLOCK_T, triton_router._NUM_WARPS
    try:
        for rows, warps in ((4, 4), (1, 1), (2, 1), (4, 1), (4, 2), (8, 4), (16, 4)):
            triton_router._BLOCK_T, triton_router._NUM_WARPS = rows, warps
            step = lambda: [triton_router.route_topk_fwd(logits, TOPK) for _ in range(repeats)]  # noqa: E731
            results[f"triton_t{rows}_w{warps}"] = graph_ms(step, iters) / repeats
    finally:
        triton_router._BLOCK_T, triton_router._NUM_WARPS = default
    results["default"] = {"block_t": default[0], "num_warps": default[1]}
    return results


def logprob(batch: int, iters: int, vocab: int = 248_320) -> dict:
    """Token log-probs of ``[batch, vocab]`` bf16 logits: ms a call, torch and the Triton pass."""
    logits = torch.randn(batch, vocab, device="cuda").bfloat16()
    tokens = torch.randint(0, vocab, (batch,), device="cuda")
    num_bytes = logits.nbytes
    return {
        "torch": record(graph_ms(lambda: token_logprobs_reference(logits, tokens), iters), num_bytes),
        "triton": record(graph_ms(lambda: token_logprobs(logits, tokens), iters), num_bytes),
    }


# the decode step's dense projections (N, K) at Qwen3.6-35B-A3B's sizes: GDN in (joined), attention in (joined),
# router + shared gate/up (joined), out-projections, shared down, output head
DENSE_SHAPES = ((12352, 2048), (9216, 2048), (1288, 2048), (2048, 4096), (2048, 512), (248320, 2048))


def dense(batch: int, iters: int, repeats: int = 10) -> dict:
    """Each decode projection: cuBLAS (``F.linear``) against the fixed-tiles Triton GEMM, ``repeats`` calls on as
    many weight copies (no call finds its weights in L2) in one graph; ms a call and the weights' TB/s."""
    from league.ops.linear.triton import fixed_tiles_matmul

    results = {}
    x_by_k = {k: torch.randn(batch, k, device="cuda").bfloat16() for _, k in DENSE_SHAPES}
    for n, k in DENSE_SHAPES:
        copies = 2 if n * k > 1e8 else repeats
        weights = [torch.randn(n, k, device="cuda").bfloat16() * 0.02 for _ in range(copies)]
        x, num_bytes = x_by_k[k], weights[0].nbytes
        cublas = graph_ms(lambda x=x, ws=weights: [torch.nn.functional.linear(x, w) for w in ws], iters) / copies
        fixed = graph_ms(lambda x=x, ws=weights: [fixed_tiles_matmul(x, w) for w in ws], iters) / copies
        results[f"n{n}_k{k}"] = {"cublas": record(cublas, num_bytes), "fixed_tiles": record(fixed, num_bytes)}
        print("  dense", n, k, json.dumps(results[f"n{n}_k{k}"]), flush=True)
    return results


def per_layer_ms(fn, iters: int) -> float:
    """Median time of ``fn(layer)`` per layer, run over the :data:`MOE_LAYERS` layers in turn in one CUDA graph."""

    def step():
        for layer in range(MOE_LAYERS):
            fn(layer)

    return graph_ms(step, iters) / MOE_LAYERS


def config_name(config: TileConfig) -> str:
    return "bm{}_bn{}_bk{}_w{}_s{}".format(*dataclasses.astuple(config))


def sweep(kernel, configs: list[TileConfig], num_bytes: float, iters: int) -> dict:
    """``kernel(layer, config)`` timed for each config; a config the GPU cannot run records its error."""
    results = {}
    for config in configs:
        try:
            ms = per_layer_ms(lambda layer, config=config: kernel(layer, config), iters)
            results[config_name(config)] = record(ms, num_bytes)
        except Exception as error:  # a config out of shared memory is a result, not a failure of the run
            results[config_name(config)] = {"error": f"{type(error).__name__}: {error}"[:300]}
        print("  ", config_name(config), json.dumps(results[config_name(config)]), flush=True)
    return results


def fastest(results: dict) -> str:
    return min((name for name in results if "ms" in results[name]), key=lambda name: results[name]["ms"])


def expert_layers() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(w_gate_up, w_down)`` of :data:`MOE_LAYERS` layers, bf16 (1.5 GB a layer)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    draw = lambda *shape: torch.randn(*shape, generator=gen, device="cuda", dtype=torch.bfloat16) * 0.02
    return [(draw(E, 2 * FF, D), draw(E, D, FF)) for _ in range(MOE_LAYERS)]


@torch.no_grad()
def moe_triton(layers: list[tuple[torch.Tensor, torch.Tensor]], batch: int, iters: int) -> dict:
    """The grouped GEMMs against the Triton kernels at one batch (top-8 of 256 experts, random routing), each
    timed per layer over layers that do not share weights, so no layer finds its experts in L2."""
    gen = torch.Generator(device="cuda").manual_seed(batch)
    x = torch.randn(batch, D, generator=gen, device="cuda").bfloat16()
    experts = torch.rand(batch, E, generator=gen, device="cuda").topk(TOPK).indices
    weights = torch.rand(batch, TOPK, generator=gen, device="cuda").bfloat16()
    touched = experts.unique().numel()
    gate_up_bytes, down_bytes = touched * 2 * D * FF * 2, touched * D * FF * 2
    order, offs = sort_pairs(experts, E)
    x_sorted = x[order // TOPK]
    default_gate_up, default_down = tile_configs(order.numel(), E)
    h = gate_up_swiglu_fwd(x, order, offs, layers[0][0], TOPK, default_gate_up)
    args = lambda layer: (x, *layers[layer], weights, experts)
    triton_out, grouped_out = grouped_swiglu_experts_triton(*args(0)), grouped_swiglu_experts(*args(0))
    whole_bytes = gate_up_bytes + down_bytes
    results = {
        "experts_touched": touched,
        "mean_rows_per_expert": order.numel() / E,
        "triton_selected": order.numel() <= TRITON_MAX_ROWS_PER_EXPERT * E,
        "default_configs": {"gate_up": config_name(default_gate_up), "down": config_name(default_down)},
        "fraction_differing_from_grouped": (triton_out != grouped_out).float().mean().item(),
        "grouped_swiglu_experts": record(per_layer_ms(lambda i: grouped_swiglu_experts(*args(i)), iters), whole_bytes),
        "grouped_swiglu_experts_triton": record(
            per_layer_ms(lambda i: grouped_swiglu_experts_triton(*args(i)), iters), whole_bytes
        ),
        "grouped_mm_gate_up": record(
            per_layer_ms(lambda i: torch._grouped_mm(x_sorted, layers[i][0].transpose(-2, -1), offs=offs), iters),
            gate_up_bytes,
        ),
        "grouped_mm_down": record(
            per_layer_ms(lambda i: torch._grouped_mm(h, layers[i][1].transpose(-2, -1), offs=offs), iters), down_bytes
        ),
    }
    print(f"moe_triton batch{batch}", json.dumps(results), flush=True)
    results["triton_gate_up"] = sweep(
        lambda i, config: gate_up_swiglu_fwd(x, order, offs, layers[i][0], TOPK, config),
        GATE_UP_CONFIGS,
        gate_up_bytes,
        iters,
    )
    results["triton_down"] = sweep(
        lambda i, config: down_fwd(h, order, offs, layers[i][1], weights.reshape(-1), config),
        DOWN_CONFIGS,
        down_bytes,
        iters,
    )
    results["fastest"] = {"gate_up": fastest(results["triton_gate_up"]), "down": fastest(results["triton_down"])}
    print(f"moe_triton batch{batch} fastest", json.dumps(results["fastest"]), flush=True)
    return results


def _offsets(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    counts = torch.bincount(experts.flatten(), minlength=num_experts)
    return counts.cumsum(0).to(torch.int32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--moe-batches", type=int, nargs="+", default=[1, 16, 64, 256, 1024])
    parser.add_argument(
        "--only", choices=["gdn", "conv", "moe", "router", "logprob", "dense"], help="run one section (default: all)"
    )
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/kernels_gpu[_<only>].json")
    opts = parser.parse_args()
    results = {}
    if opts.only in (None, "gdn"):
        default = triton_recurrent._BLOCK_V, triton_recurrent._NUM_WARPS
        results["gdn_recurrent_slots"] = gdn(opts.batch, opts.iters)
        triton_recurrent._BLOCK_V, triton_recurrent._NUM_WARPS = default
        results["gdn_default"] = {
            "block_v": default[0],
            "num_warps": default[1],
            "stream_state": triton_recurrent._STREAM_STATE,  # every setting of the sweep runs with it
        }
    if opts.only in (None, "conv"):
        results["conv_slots"] = conv(opts.batch, opts.iters)
        print("conv", json.dumps(results["conv_slots"]), flush=True)
    if opts.only in (None, "router"):
        results["router"] = router(opts.batch, opts.iters)
        print("router", json.dumps(results["router"]), flush=True)
    if opts.only in (None, "logprob"):
        results["logprob"] = logprob(opts.batch, opts.iters)
        print("logprob", json.dumps(results["logprob"]), flush=True)
    if opts.only in (None, "dense"):
        results["dense"] = dense(opts.batch, opts.iters)
    if opts.only in (None, "moe"):
        results["moe"] = moe(opts.batch, opts.iters)
        print("moe", json.dumps(results["moe"]), flush=True)
        layers = expert_layers()
        results["moe_triton"] = {f"batch{b}": moe_triton(layers, b, opts.iters) for b in opts.moe_batches}
    out = {
        "benchmark": "kernels_gpu",
        "device": torch.cuda.get_device_name(),
        "versions": versions(),
        "settings": {k: v for k, v in vars(opts).items() if k != "out"} | {"hbm_bytes_per_s": HBM_BYTES_PER_S},
        "results": results,
    }
    name = "kernels_gpu.json" if opts.only is None else f"kernels_gpu_{opts.only}.json"
    path = opts.out or Path(__file__).parent / "results" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
