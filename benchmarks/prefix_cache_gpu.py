"""Paged KV and the prefix cache, measured: a multi-turn workload with and without the cache, the RL decode shape with
paged blocks against one fixed slot a request, and how many requests of mixed lengths run at once in a given KV pool.

An engine over random bf16 weights of the Qwen3.6-35B-A3B shape cut to ``--num-layers`` layers (MTP on):

1. ``multi_turn``: ``--conversations`` conversations of ``--turns`` turns; each turn sends the whole conversation so
   far plus ``--user-tokens`` new tokens and generates ``--answer-tokens`` (greedy, EOS ignored), all conversations of
   a turn at once. With the prefix cache (``extra_buffer``) and with ``--disable-radix-cache``: prefill tokens
   computed, the mean and median time to first token of each turn's requests, wall time and tokens/s.
2. ``rl_decode``: ``--batch`` prompts of ``--prompt-len`` tokens, ``--new-tokens`` generated each (the RL rollout's
   shape), with blocks of ``--page-size`` and with one block of the whole context a request (the fixed-slot layout),
   the prefix cache off in both: decode tokens/s of each.
3. ``capacity``: a KV pool of ``--pool-tokens`` positions and requests of mixed lengths (prompts of ``--prompt-len``,
   answers uniform in [``--min-new``, ``--new-tokens``]): the most requests running at once with paged blocks, and
   how many whole-context slots the same pool holds.

Writes ``benchmarks/results/prefix_cache_gpu.json``.

    python benchmarks/prefix_cache_gpu.py [--num-layers 8] [--conversations 64] [--turns 4] [--batch 256]
    python benchmarks/prefix_cache_gpu.py --device cpu --preset tiny --conversations 3 --turns 3 --user-tokens 20 \\
        --answer-tokens 12 --batch 4 --prompt-len 16 --new-tokens 24 --min-new 4 --context 128 \\
        --pool-tokens 256 --track-interval 16   (a smoke run)
"""

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch
from common import write_record

from league.bench import random_model
from league.engine.config import EngineConfig
from league.engine.engine import LLMEngine
from league.engine.request import SamplingParams
from league.models.qwen3_5_moe.presets import PRESETS, with_num_layers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_requests(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams]) -> dict:
    """Submit all, step until all finish; per request the seconds to its first token (seen after the step that drew
    it), and the outputs."""
    device = engine.device
    sync(device)
    start = time.perf_counter()
    rids = [engine.add_request(p, sp)[0] for p, sp in zip(prompts, params)]
    first: dict[str, float] = {}
    done: dict = {}
    while len(done) < len(rids):
        done |= {out.rid: out for out in engine.step()}
        now = time.perf_counter() - start
        started = [r.rid for r in engine.scheduler.running if r.output_ids] + list(done)
        first |= {rid: now for rid in started if rid not in first}
    sync(device)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "ttft": [first[r] for r in rids], "outputs": [done[r] for r in rids]}


def multi_turn(model, opts, cache: bool) -> dict:
    engine = LLMEngine(model, engine_config(opts, disable_radix_cache=not cache))
    engine.eos_ids = set()
    rng = random.Random(0)
    vocab = model.args.vocab_size
    histories = [[] for _ in range(opts.conversations)]
    params = SamplingParams(max_new_tokens=opts.answer_tokens, temperature=0.0, ignore_eos=True)
    turns = []
    for _ in range(opts.turns):
        prompts = [h + [rng.randrange(vocab) for _ in range(opts.user_tokens)] for h in histories]
        before = engine.stats.prefill_tokens
        result = run_requests(engine, prompts, [params] * len(prompts))
        histories = [p + o.output_ids for p, o in zip(prompts, result["outputs"])]
        generated = sum(len(o.output_ids) for o in result["outputs"])
        turns.append(
            {
                "prompt_tokens": sum(len(p) for p in prompts),
                "prefill_tokens_computed": engine.stats.prefill_tokens - before,
                "cached_tokens": sum(o.cached_tokens for o in result["outputs"]),
                "ttft_mean_s": statistics.fmean(result["ttft"]),
                "ttft_median_s": statistics.median(result["ttft"]),
                "seconds": result["seconds"],
                "output_tokens_per_s": generated / result["seconds"],
                "total_tokens_per_s": (generated + sum(len(p) for p in prompts)) / result["seconds"],
            }
        )
        print(json.dumps({"cache": cache, **turns[-1]}), flush=True)
    total = sum(t["seconds"] for t in turns)
    return {
        "radix_cache": cache,
        "turns": turns,
        "prefill_tokens_computed": sum(t["prefill_tokens_computed"] for t in turns),
        "prompt_tokens": sum(t["prompt_tokens"] for t in turns),
        "seconds": total,
        "ttft_mean_s": statistics.fmean(t["ttft_mean_s"] for t in turns),
        "cache": engine.cache_metrics(),
        "histories": [h[:8] for h in histories],
    }


def rl_decode(model, opts, paged: bool) -> dict:
    context = opts.prompt_len + opts.new_tokens + 8
    page = opts.page_size if paged else context + 8  # one block holds a whole slot (num_spec_steps + 1 more)
    engine = LLMEngine(
        model,
        engine_config(
            opts,
            disable_radix_cache=True,
            page_size=page,
            mamba_track_interval=page,
            context_length=context,
            max_running_requests=opts.batch,
            max_total_tokens=None,
        ),
    )
    engine.eos_ids = set()
    rng = random.Random(1)
    prompts = [[rng.randrange(model.args.vocab_size) for _ in range(opts.prompt_len)] for _ in range(opts.batch)]
    params = SamplingParams(max_new_tokens=opts.new_tokens, temperature=1.0, ignore_eos=True)
    engine.generate(prompts[: min(8, len(prompts))], SamplingParams(max_new_tokens=4, ignore_eos=True))  # warm-up
    result = run_requests(engine, prompts, [params] * len(prompts))
    generated = sum(len(o.output_ids) for o in result["outputs"])
    return {
        "layout": f"blocks of {page}" if paged else "fixed slots (one block a request)",
        "page_size": page,
        "seconds": result["seconds"],
        "decode_tokens_per_s": generated / result["seconds"],
        "tokens": [o.output_ids[:4] for o in result["outputs"][:2]],
    }


def capacity(model, opts) -> dict:
    context = opts.prompt_len + opts.new_tokens + 8
    engine = LLMEngine(
        model,
        engine_config(
            opts,
            disable_radix_cache=True,
            context_length=context,
            max_running_requests=opts.batch,
            max_total_tokens=opts.pool_tokens,
        ),
    )
    engine.eos_ids = set()
    rng = random.Random(2)
    vocab = model.args.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(opts.prompt_len)] for _ in range(opts.batch)]
    params = [
        SamplingParams(max_new_tokens=rng.randint(opts.min_new, opts.new_tokens), temperature=1.0, ignore_eos=True)
        for _ in prompts
    ]
    for p, sp in zip(prompts, params):
        engine.add_request(p, sp)
    peak, outputs = 0, []
    while engine.has_unfinished():
        outputs.extend(engine.step())
        peak = max(peak, sum(r.prefill_done for r in engine.scheduler.running))
    slot = engine.runner.slot_len
    return {
        "pool_tokens": engine.paging.num_blocks * engine.paging.page_size,
        "requests": len(prompts),
        "mean_request_tokens": statistics.fmean(len(o.prompt_ids) + len(o.output_ids) for o in outputs),
        "peak_running_paged": peak,
        "fixed_slots_that_fit": engine.paging.num_blocks * engine.paging.page_size // slot,
        "preemptions": engine.scheduler.preemptions,
    }


def engine_config(opts, **overrides) -> EngineConfig:
    config = dict(
        max_running_requests=opts.conversations,
        context_length=opts.context,
        page_size=opts.page_size,
        mamba_track_interval=opts.track_interval,
        max_mamba_cache_size=opts.snapshots,
        max_num_batched_tokens=opts.chunk,
    )
    return EngineConfig(**(config | overrides))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="qwen3.6-35b-a3b")
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--conversations", type=int, default=64)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--user-tokens", type=int, default=250)
    parser.add_argument("--answer-tokens", type=int, default=250)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--track-interval", type=int, default=256)
    parser.add_argument("--snapshots", type=int, default=64, help="--max-mamba-cache-size of the multi-turn engine")
    parser.add_argument("--chunk", type=int, default=8192, help="--max-num-batched-tokens")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=1024)
    parser.add_argument("--min-new", type=int, default=64)
    parser.add_argument("--pool-tokens", type=int, default=131072)
    parser.add_argument("--parts", default="multi_turn,rl_decode,capacity")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "prefix_cache_gpu.json")
    opts = parser.parse_args()
    device = torch.device(opts.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args = with_num_layers(PRESETS[opts.preset], opts.num_layers) if opts.num_layers else PRESETS[opts.preset]
    model = random_model(args, opts.device, dtype).eval()
    parts = opts.parts.split(",")
    results: dict = {}
    if "multi_turn" in parts:
        results["multi_turn"] = [multi_turn(model, opts, cache) for cache in (True, False)]
        with_cache, without = results["multi_turn"]
        results["multi_turn_same_outputs"] = with_cache.pop("histories") == without.pop("histories")
    if "rl_decode" in parts:
        results["rl_decode"] = [rl_decode(model, opts, paged) for paged in (True, False)]
        paged, fixed = results["rl_decode"]
        results["rl_decode_paged_over_fixed"] = paged["decode_tokens_per_s"] / fixed["decode_tokens_per_s"]
    if "capacity" in parts:
        results["capacity"] = capacity(model, opts)
    print(json.dumps({k: v for k, v in results.items() if k != "multi_turn"}), flush=True)
    write_record("prefix_cache_gpu", device, opts, dtype, results)


if __name__ == "__main__":
    main()
