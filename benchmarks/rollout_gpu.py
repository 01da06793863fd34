"""Rollout throughput on one GPU: league's engine beside transformers' ``generate``, on random bf16 weights of the
Qwen3.6-35B-A3B shape (all 40 layers by default), with the memory roofline of every decode step.

For each batch size: B prompts of ``--prompt-len`` tokens, ``--new-tokens`` tokens each (EOS ignored), greedy or
sampled at ``--temperature`` (RL rollouts sample at 1; transformers is always timed greedy).
league's decode rate is ``B * (new - 1) / (t_generate - t_prefill)`` with ``t_prefill`` the time of the same call
generating one token; transformers' is measured the same way with ``--hf-new-tokens`` tokens. The roofline is the
bytes a decode step must move at the vendor's 4.8 TB/s: the weights it reads (all non-expert weights plus the
experts its batch routes to, uniform routing assumed), each request's GDN state and conv window read and written,
and its keys and values read, at the run's mean context. Writes ``benchmarks/results/rollout_gpu.json``.

    python benchmarks/rollout_gpu.py [--num-layers 40] [--batches 1,16,64,256] [--prompt-len 200]
        [--new-tokens 1024] [--spec-steps 0] [--mamba-ssm-dtype float32] [--temperature 0] [--hf-new-tokens 32]
        [--skip-hf] [--compare-overlap] [--compare-parity] [--compare-unjoined] [--moe-row-splits 4]

``--compare-unjoined`` adds, before each default run, one whose engine runs every projection as its own GEMM (the
engine joins each group of projections of one input into one GEMM on CUDA: ``Transformer.join_projections``).
"""

import argparse
import contextlib
import gc
import json
import platform
import time
from pathlib import Path

import torch
import transformers
from common import override_moe_tiles, random_model

import league
from league.bench import H200_BYTES_PER_S, BenchSettings, rollout_rates
from league.models.qwen3_5_moe import ModelArgs, Transformer
from league.models.qwen3_5_moe.presets import PRESETS, with_num_layers

HBM_BYTES_PER_S = H200_BYTES_PER_S


@contextlib.contextmanager
def unjoined(model: Transformer):
    """Within the block, engines leave ``model``'s projections one GEMM each: joined weights are first given their
    own storage again."""
    original = Transformer.join_projections
    Transformer.join_projections = lambda self: None
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.data = p.detach().clone()
    try:
        yield
    finally:
        Transformer.join_projections = original


def timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def hf_rates(args: ModelArgs, prompts: torch.Tensor, new_tokens: int) -> dict:
    text = {k: v for k, v in args.to_hf_config().items() if k not in ("architectures", "model_type")}
    config = transformers.Qwen3_5MoeTextConfig(**text)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # made in bf16 on the GPU: fp32 would not fit
    try:
        with torch.device("cuda"):
            hf = transformers.Qwen3_5MoeForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)

    def run(n: int):
        with torch.no_grad():
            hf.generate(
                prompts,
                attention_mask=torch.ones_like(prompts),
                do_sample=False,
                max_new_tokens=n,
                min_new_tokens=n,
                pad_token_id=0,
                eos_token_id=None,
            )

    run(2)
    prefill_s = timed(lambda: run(1))
    total_s = timed(lambda: run(new_tokens))
    batch = prompts.shape[0]
    return {
        "seconds": total_s,
        "prefill_seconds": prefill_s,
        "new_tokens": new_tokens,
        "decode_tokens_per_s": batch * (new_tokens - 1) / (total_s - prefill_s),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-layers", type=int, default=40)
    parser.add_argument("--batches", default="1,16,64,256")
    parser.add_argument("--prompt-len", type=int, default=200)
    parser.add_argument("--new-tokens", type=int, default=1024)
    parser.add_argument("--spec-steps", type=int, default=0, help="MTP draft steps (0: no speculation)")
    parser.add_argument("--mamba-ssm-dtype", default="float32", help="GDN state dtype of league's engine")
    parser.add_argument("--temperature", type=float, default=0.0, help="league's sampling temperature (0: greedy)")
    parser.add_argument("--hf-new-tokens", type=int, default=32)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument(
        "--compare-overlap",
        action="store_true",
        help="also run league without the overlap schedule (results league_b<N>_no_overlap)",
    )
    parser.add_argument(
        "--compare-unjoined", action="store_true", help="also time engines that run each projection as its own GEMM"
    )
    parser.add_argument("--moe-row-splits", type=int, help="programs sharing an expert's row tiles (triton_moe)")
    parser.add_argument(
        "--compare-parity",
        action="store_true",
        help="also run league with decode parity, whose GEMMs are the fixed-tiles Triton ones (league_b<N>_parity)",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "rollout_gpu.json")
    opts = parser.parse_args()
    batches = [int(b) for b in opts.batches.split(",")]
    override_moe_tiles(row_splits=opts.moe_row_splits)
    args = with_num_layers(PRESETS["qwen3.6-35b-a3b"], opts.num_layers)
    args = args.replace(mtp_num_layers=1 if opts.spec_steps else 0)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, 200_000, (max(batches), opts.prompt_len), generator=gen)  # transformers' prompts
    results = {}
    model = random_model(args).eval()
    variants = [("", True, False, True)]  # (result suffix, overlap schedule, decode parity, joined projections)
    variants = ([("_unjoined", True, False, False)] if opts.compare_unjoined else []) + variants
    variants += [("_no_overlap", False, False, True)] if opts.compare_overlap else []
    variants += [("_parity", True, True, True)] if opts.compare_parity else []
    for batch in batches:
        for suffix, overlap, parity, joined in variants:
            settings = BenchSettings(
                batch=batch,
                prompt_len=opts.prompt_len,
                new_tokens=opts.new_tokens,
                temperature=opts.temperature,
                spec_steps=opts.spec_steps,
                mamba_ssm_dtype=opts.mamba_ssm_dtype,
                numerics="decode_parity" if parity else "fast",
                overlap=overlap,
                memory_bytes_per_s=HBM_BYTES_PER_S,
            )
            with contextlib.nullcontext() if joined else unjoined(model):
                rec = rollout_rates(model, settings)
            gc.collect()
            torch.cuda.empty_cache()
            results[f"league_b{batch}{suffix}"] = rec
            print(f"{batch}{suffix}", json.dumps(rec), flush=True)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    if not opts.skip_hf:
        for batch in batches:
            rec = hf_rates(args.replace(mtp_num_layers=0), prompts[:batch].cuda(), opts.hf_new_tokens)
            gc.collect()
            torch.cuda.empty_cache()
            results[f"transformers_b{batch}"] = rec
            results[f"ratio_b{batch}"] = results[f"league_b{batch}"]["decode_tokens_per_s"] / rec["decode_tokens_per_s"]
            print(batch, json.dumps(rec), flush=True)
    record = {
        "benchmark": "rollout_gpu",
        "device": torch.cuda.get_device_name(),
        "versions": {
            "league": league.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "triton": _version("triton"),
            "fla": _version("fla"),
            "python": platform.python_version(),
        },
        "settings": {k: v for k, v in vars(opts).items() if k != "out"}
        | {
            "dtype": "bfloat16",
            "weights": "random (league init distributions); transformers' own random init of the same config",
            "greedy": opts.temperature == 0,
            "hbm_bytes_per_s": HBM_BYTES_PER_S,
        },
        "results": results,
    }
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(record, indent=2) + "\n")


def _version(name: str) -> str | None:
    try:
        return __import__(name).__version__
    except ImportError:
        return None


if __name__ == "__main__":
    main()
