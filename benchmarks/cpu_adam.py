"""The offloaded optimizer's host work: torch's CPU AdamW in its default (for-each) form and its fused kernel, in
parameters per second, over fp32 masters with gradients, at the process's thread count (and at 1 thread). Writes
``benchmarks/results/cpu_adam.json``.

    python benchmarks/cpu_adam.py [--params 50000000] [--tensors 16] [--repeats 3]
"""

import argparse
import statistics
import time
from pathlib import Path

import torch
from common import write_record


def params_per_s(numel: int, tensors: int, fused: bool, repeats: int) -> float:
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(numel // tensors, generator=gen)) for _ in range(tensors)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt = torch.optim.AdamW(params, lr=1e-6, weight_decay=0.1, fused=fused, foreach=None if fused else True)
    opt.step()  # the moments allocated
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    return numel / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=int, default=50_000_000)
    parser.add_argument("--tensors", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cpu_adam.json")
    opts = parser.parse_args()
    results = []
    for threads in sorted({1, torch.get_num_threads()}):
        torch.set_num_threads(threads)
        row = {"threads": threads}
        for name, fused in (("foreach", False), ("fused", True)):
            row[f"{name}_params_per_s"] = params_per_s(opts.params, opts.tensors, fused, opts.repeats)
        row["fused_over_foreach"] = row["fused_params_per_s"] / row["foreach_params_per_s"]
        results.append(row)
        print(row, flush=True)
    write_record("cpu_adam", torch.device("cpu"), opts, torch.float32, results)


if __name__ == "__main__":
    main()
