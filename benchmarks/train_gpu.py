"""Training-step throughput and MFU: league's train step (GRPO policy loss + MTP loss, packed micro-batches, AdamW
with fp32 master weights) on a reduced-depth model of the full Qwen3.6-35B-A3B width, random bf16 weights, with
activation recompute off and on. Writes ``benchmarks/results/train_gpu.json``.

Each sample is ``--prompt-len`` prompt tokens and ``--response-len`` response tokens with random advantages; a
micro-batch packs ``--max-tokens-per-gpu`` tokens; one optimizer step takes ``--global-batch-size`` samples.
MFU counts the matmul FLOPs of the tokens (6 x the active matmul parameters per token: attention and GDN
projections, router, 8 routed + the shared expert, output head, and the MTP layer with its head) plus causal
attention scores (12 x L/2 x heads x head dim per attention layer per token, L the sample length), against the
H200's dense bf16 rate of 989 TFLOP/s; the GDN recurrence is not counted.

    python benchmarks/train_gpu.py [--num-layers 4] [--steps 3] [--prompt-len 256] [--response-len 768]
        [--max-tokens-per-gpu 8192] [--global-batch-size 32] [--modes no_recompute,recompute] [--gdn-backward fla]
        [--decode-parity] [--profile]
    python benchmarks/train_gpu.py --preset tiny --device cpu --steps 1   (a smoke test of the script)
"""

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from common import kernel_summary, random_model
from torch.profiler import ProfilerActivity, profile, schedule

import league
from league.models.qwen3_5_moe import ModelArgs
from league.models.qwen3_5_moe.presets import PRESETS, with_num_layers
from league.ops.gdn import fast
from league.ops.numerics import DECODE_PARITY, FAST
from league.parallel.parallelize import held_layers
from league.parallel.recompute import Recompute, apply_recompute
from league.rl.optim import OptimConfig
from league.rl.sample import Sample
from league.rl.trainer import AlgorithmConfig, TrainConfig, Trainer

PEAK_BF16_FLOPS = 989e12  # H100/H200 dense bf16, datasheet


def matmul_params_per_token(args: ModelArgs) -> int:
    """Parameters each token multiplies through (trunk, output head, and the MTP layer with the head again)."""
    attn = args.dim * (2 * args.num_heads * args.head_dim + 2 * args.num_kv_heads * args.head_dim)
    attn += args.num_heads * args.head_dim * args.dim
    gdn = args.dim * (args.gdn_conv_dim + args.gdn_value_dim + 2 * args.linear_num_value_heads)
    gdn += args.gdn_value_dim * args.dim
    moe = args.dim * args.num_experts + args.dim
    moe += 3 * args.dim * (args.num_experts_per_tok * args.moe_intermediate_size + args.shared_expert_intermediate_size)
    layers = sum(attn if kind == "full_attention" else gdn for kind in args.layer_types) + args.num_layers * moe
    head = args.dim * args.vocab_size
    mtp = args.mtp_num_layers * (2 * args.dim * args.dim + attn + moe + head)
    return layers + head + mtp


def flops_per_token(args: ModelArgs, sample_len: int) -> float:
    num_attention = sum(kind == "full_attention" for kind in args.layer_types) + args.mtp_num_layers
    scores = 12 * (sample_len / 2) * args.num_heads * args.head_dim * num_attention
    return 6 * matmul_params_per_token(args) + scores


def make_samples(num: int, prompt_len: int, response_len: int, vocab: int, seed: int) -> list[Sample]:
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(num):
        tokens = torch.randint(0, vocab, (prompt_len + response_len,), generator=gen).tolist()
        samples.append(
            Sample(
                prompt_ids=tokens[:prompt_len],
                response_ids=tokens[prompt_len:],
                rollout_logprobs=[-1.0] * response_len,
                advantage=float(torch.randn(1, generator=gen)),
                index=i,
            )
        )
    return samples


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(opts, args: ModelArgs, recompute: bool) -> dict:
    model = random_model(args, opts.device, getattr(torch, opts.dtype)).train()
    if recompute:
        apply_recompute(held_layers(model), Recompute())
    trainer = Trainer(
        model,
        TrainConfig(global_batch_size=opts.global_batch_size, max_tokens_per_gpu=opts.max_tokens_per_gpu),
        AlgorithmConfig(enable_mtp_training=True, mtp_loss_scaling_factor=0.2),
        OptimConfig(lr=1e-6, optimizer_cpu_offload=opts.optimizer_cpu_offload),
        total_steps=opts.steps + 1,
        numerics=DECODE_PARITY if opts.decode_parity else FAST,
    )
    samples = make_samples(opts.global_batch_size, opts.prompt_len, opts.response_len, args.vocab_size, seed=1)
    trainer.train(samples)  # warm-up: kernels compiled and autotuned, allocator settled
    if opts.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(opts.device)
    start = time.perf_counter()
    for step in range(opts.steps):
        trainer.train(make_samples(opts.global_batch_size, opts.prompt_len, opts.response_len, args.vocab_size, step))
    sync(opts.device)
    seconds = (time.perf_counter() - start) / opts.steps
    profiled = None
    if opts.profile:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if opts.device == "cuda" else [])
        trace = opts.out.with_name(opts.out.stem + ("_recompute" if recompute else "") + ".trace.json.gz")
        trace.parent.mkdir(parents=True, exist_ok=True)
        with profile(
            activities=activities,
            schedule=schedule(wait=0, warmup=1, active=1),
            acc_events=True,
            on_trace_ready=lambda done: done.export_chrome_trace(str(trace)),
        ) as prof:
            for seed in (98, 99):  # the first step warms the profiler up
                trainer.train(
                    make_samples(opts.global_batch_size, opts.prompt_len, opts.response_len, args.vocab_size, seed)
                )
                sync(opts.device)
                prof.step()
        profiled = kernel_summary(prof, 1, opts.device == "cuda")
    sample_len = opts.prompt_len + opts.response_len
    tokens = opts.global_batch_size * sample_len
    flops = tokens * flops_per_token(args, sample_len)
    record = {
        "seconds_per_step": seconds,
        "tokens_per_s": tokens / seconds,
        "tflops_per_s": flops / seconds / 1e12,
        "mfu": flops / seconds / PEAK_BF16_FLOPS,
    }
    if profiled is not None:
        record["profile_one_step"] = profiled
    if opts.device == "cuda":
        record["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="qwen3.6-35b-a3b")
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--response-len", type=int, default=768)
    parser.add_argument("--max-tokens-per-gpu", type=int, default=8192)
    parser.add_argument("--global-batch-size", type=int, default=32)
    parser.add_argument("--optimizer-cpu-offload", action="store_true")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--modes", default="no_recompute,recompute", help="activation recompute off, on, or both")
    parser.add_argument("--gdn-backward", default="fla", help="GDN chunk backward: fla (default) or torch")
    parser.add_argument(
        "--decode-parity",
        action="store_true",
        help="forwards compute as decode does (the parity GDN, attention and fixed-tiles GEMMs: their cost)",
    )
    parser.add_argument("--profile", action="store_true", help="also profile one step: kernel time by bucket, trace")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "train_gpu.json")
    opts = parser.parse_args()
    fast.DEFAULT_BACKWARD = opts.gdn_backward
    args = with_num_layers(PRESETS[opts.preset], opts.num_layers).replace(mtp_num_layers=1)
    results = {}
    for recompute in [mode == "recompute" for mode in opts.modes.split(",")]:
        results["recompute" if recompute else "no_recompute"] = rec = measure(opts, args, recompute)
        print(("recompute" if recompute else "no recompute"), json.dumps(rec), flush=True)
        if opts.device == "cuda":
            torch.cuda.empty_cache()
    record = {
        "benchmark": "train_gpu",
        "device": torch.cuda.get_device_name() if opts.device == "cuda" else platform.processor() or "cpu",
        "versions": {"league": league.__version__, "torch": torch.__version__, "python": platform.python_version()},
        "settings": {k: v for k, v in vars(opts).items() if k != "out"}
        | {"matmul_params_per_token": matmul_params_per_token(args), "peak_flops": PEAK_BF16_FLOPS},
        "results": results,
    }
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
