"""The GDN recurrent step of a whole decode step against the copy of the same bytes: how close does the kernel that
reads and rewrites every request's fp32 state come to what the GPU can move?

A decode step of Qwen3.6-35B-A3B at batch 256 runs the recurrent kernel once in each of its 30 GDN layers; each
reads and writes its layer's states in their slots (``[slots, 32, 128, 128]`` fp32, 2 MiB a request), about 1 GiB
each way a layer. Here each layer gets its own state cache (as the engine's are: 30 GiB, so no layer finds its
states in the 50 MB L2), random inputs with the raw gate projections (the engine's call: gates made in the kernel,
``fresh`` flags all 0), and the 30 launches are captured in one CUDA graph, timed by replays back to back between
CUDA events. Beside it, in the same process and graph form: ``copy``, each layer's cache copied to a scratch buffer
(``Tensor.copy_``: the same bytes read and written, the practical ceiling), and the kernel at each block width and
warp count of ``--configs`` and with the state streamed past the L2 (``_STREAM_STATE``). ``tb_per_s`` is bytes
read + written over the replay time. Writes ``benchmarks/results/gdn_state_gpu.json``.

    python benchmarks/gdn_state_gpu.py [--layers 30] [--batch 256] [--configs "32,1 16,1 64,2 128,4"]
"""

import argparse
import json
import time
from pathlib import Path

import torch
from common import capture_graph, replay_ms, versions

from league.ops.gdn import triton_recurrent

HK, HV, K, V = 16, 32, 128, 128  # Qwen3.6-35B-A3B's GDN heads and dims


def graph_ms(step, iters: int) -> float:
    """``step`` captured in a CUDA graph: ms per replay, back to back between CUDA events."""
    return replay_ms(capture_graph(step), iters)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=30, help="GDN layers (each its own state cache)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--configs", default="32,1 16,1 32,2 64,2 64,4 128,4 128,8", help="BLOCK_V,WARPS pairs")
    parser.add_argument("--dtype", default="float32", help="state dtype")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gdn_state_gpu.json")
    opts = parser.parse_args()
    configs = [tuple(int(v) for v in item.split(",")) for item in opts.configs.split()]
    dtype = getattr(torch, opts.dtype)
    gen = torch.Generator(device="cuda").manual_seed(0)
    batch, layers = opts.batch, opts.layers
    caches = [torch.randn(batch, HV, K, V, generator=gen, device="cuda").to(dtype) * 0.01 for _ in range(layers)]
    scratch = torch.empty_like(caches[0])
    slots = torch.randperm(batch, generator=gen, device="cuda")
    fresh = torch.zeros(batch, dtype=torch.bool, device="cuda")
    a_log = torch.rand(HV, generator=gen, device="cuda").mul(15.99).add(0.01).log()
    dt_bias = torch.ones(HV, device="cuda")
    inputs = []
    for _ in range(layers):  # the joined projection's columns, as the engine slices them
        mixed = torch.randn(batch, 1, 2 * HK * K + HV * V + 2 * HV, generator=gen, device="cuda").bfloat16()
        q, k, v, a, b = mixed.split([HK * K, HK * K, HV * V, HV, HV], dim=-1)
        inputs.append((q.unflatten(-1, (HK, K)), k.unflatten(-1, (HK, K)), v.unflatten(-1, (HV, V)), a, b))
    num_bytes = 2 * layers * caches[0].nbytes

    def kernel_step():
        for (q, k, v, a, b), cache in zip(inputs, caches):
            triton_recurrent.recurrent_gated_delta_rule_slots_fwd(
                q, k, v, a, b, cache, slots, fresh_B=fresh, gate_params=(a_log, dt_bias)
            )

    def copy_step():
        for cache in caches:
            scratch.copy_(cache)

    def record(ms: float) -> dict:
        return {"ms": ms, "ms_per_layer": ms / layers, "tb_per_s": num_bytes / ms / 1e9}

    results = {"copy": record(graph_ms(copy_step, opts.iters))}
    print("copy", json.dumps(results["copy"]), flush=True)
    default = triton_recurrent._BLOCK_V, triton_recurrent._NUM_WARPS, triton_recurrent._STREAM_STATE
    try:
        for stream in (False, True):
            for block_v, warps in configs:
                triton_recurrent._BLOCK_V, triton_recurrent._NUM_WARPS = block_v, warps
                triton_recurrent._STREAM_STATE = stream
                name = f"bv{block_v}_w{warps}" + ("_stream" if stream else "")
                results[name] = record(graph_ms(kernel_step, opts.iters))
                results[name]["of_copy"] = results["copy"]["ms"] / results[name]["ms"]
                print(name, json.dumps(results[name]), flush=True)
    finally:
        triton_recurrent._BLOCK_V, triton_recurrent._NUM_WARPS, triton_recurrent._STREAM_STATE = default
    record_ = {
        "benchmark": "gdn_state_gpu",
        "device": torch.cuda.get_device_name(),
        "versions": versions(),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(opts).items()},
        "default": {"block_v": default[0], "num_warps": default[1], "stream_state": default[2]},
        "bytes_per_step": num_bytes,
        "results": results,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(record_, indent=2) + "\n")


if __name__ == "__main__":
    main()
