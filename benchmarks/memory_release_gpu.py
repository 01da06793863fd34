"""Memory given back by ``/release_memory_occupation`` and the time it and ``/resume_memory_occupation`` take, per
tag, on the engine a colocated trainer shares its GPU with.

An engine over random bf16 weights of the Qwen3.6-35B-A3B shape cut to ``--num-layers`` layers (MTP on), with
``--slots`` cache slots of ``--context`` tokens, decodes a short batch (so its CUDA graphs are captured), then for each
tag set in turn (``kv_cache`` + ``cuda_graph``, ``weights`` + ``weights_drafter``, all) releases and resumes the
memory through the model runner (what the routes call between two engine steps). Reported per set: the device memory
allocated before, after release and after resume (``torch.cuda.memory_allocated``, and the driver's used memory from
``torch.cuda.mem_get_info``), seconds of each call, and whether a greedy generation after the resume gives the same
tokens as before. Writes ``benchmarks/results/memory_release_gpu.json``.

    python benchmarks/memory_release_gpu.py [--num-layers 8] [--slots 64] [--context 4096]
    python benchmarks/memory_release_gpu.py --device cpu --preset tiny --slots 4 --context 256   (a smoke run)
"""

import argparse
import json
import time
from pathlib import Path

import torch
from common import write_record

from league.bench import random_model
from league.engine.config import EngineConfig
from league.engine.engine import LLMEngine
from league.engine.request import SamplingParams
from league.models.qwen3_5_moe.presets import PRESETS, with_num_layers

TAG_SETS = (("kv_cache", "cuda_graph"), ("weights", "weights_drafter"), ("kv_cache", "weights", "weights_drafter"))


def memory(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    torch.cuda.synchronize(device)
    free, total = torch.cuda.mem_get_info(device)
    return {"allocated_gib": torch.cuda.memory_allocated(device) / 2**30, "driver_used_gib": (total - free) / 2**30}


def timed(fn, device: torch.device) -> tuple[object, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="qwen3.6-35b-a3b")
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "memory_release_gpu.json")
    opts = parser.parse_args()
    device = torch.device(opts.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args = with_num_layers(PRESETS[opts.preset], opts.num_layers) if opts.num_layers else PRESETS[opts.preset]
    model = random_model(args, opts.device, dtype).eval()
    config = EngineConfig(
        max_running_requests=opts.slots, num_slots=opts.slots, context_length=opts.context, cuda_graph_bs=[1, 8]
    )
    engine = LLMEngine(model, config)
    prompts = [[5 + i, 6, 7, 8] for i in range(8)]
    params = SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True)
    before_tokens = [o.output_ids for o in engine.generate(prompts, params)]
    results = []
    for tags in TAG_SETS:
        start = memory(device)
        freed, release_s = timed(lambda t=tags: engine.runner.release_memory(set(t)), device)
        released = memory(device)
        _, resume_s = timed(lambda t=tags: engine.runner.resume_memory(set(t)), device)
        resumed = memory(device)
        same = [o.output_ids for o in engine.generate(prompts, params)] == before_tokens
        results.append(
            {
                "tags": list(tags),
                "bytes_freed_gib": freed / 2**30,
                "release_s": release_s,
                "resume_s": resume_s,
                "memory_before": start,
                "memory_released": released,
                "memory_resumed": resumed,
                "same_tokens_after_resume": same,
            }
        )
        print(json.dumps(results[-1]), flush=True)
    write_record("memory_release_gpu", device, opts, dtype, results)


if __name__ == "__main__":
    main()
