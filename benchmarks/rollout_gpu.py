"""Rollout throughput on one GPU: league's engine (reference ops, bf16) beside transformers' ``generate`` on the
same random weights, for a reduced-depth model of the full Qwen3.6-35B-A3B width. A baseline for the GPU work:
league's fast paths (kernels, CUDA graphs) are not written yet. Writes ``benchmarks/results/rollout_gpu.json``.

    python benchmarks/rollout_gpu.py [--num-layers 4] [--batch 16] [--prompt-len 128] [--new-tokens 64]
"""

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
import transformers

import league
from league.checkpoint.hf import save_hf
from league.engine.engine import EngineConfig, LLMEngine
from league.engine.request import SamplingParams
from league.models.qwen3_5_moe import Transformer
from league.models.qwen3_5_moe.presets import PRESETS, with_num_layers


def random_model(num_layers: int, seed: int) -> Transformer:
    args = with_num_layers(PRESETS["qwen3.6-35b-a3b"], num_layers).replace(mtp_num_layers=0)
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to_empty(device="cuda")
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.uniform_(0.0, 2.7)
            elif name.endswith(("dt_bias", "norm_weight")):
                p.fill_(1.0)
            elif p.ndim == 1:
                p.zero_()
            else:
                p.normal_(0.0, 0.02)
    from league.ops.rope import rope_inv_freq

    model.inv_freq = rope_inv_freq(args.rotary_dim, args.rope_theta).cuda()
    return model.to(torch.bfloat16).eval()


def timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "rollout_gpu.json")
    args = parser.parse_args()
    model = random_model(args.num_layers, seed=0)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, 200_000, (args.batch, args.prompt_len), generator=gen)
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    total = args.batch * args.new_tokens
    config = EngineConfig(
        max_running_requests=args.batch, context_length=args.prompt_len + args.new_tokens + 8, num_slots=args.batch
    )
    LLMEngine(model, config).generate(prompts[:2, :16].tolist(), SamplingParams(max_new_tokens=4, temperature=0))
    league_s = timed(lambda: LLMEngine(model, config).generate(prompts.tolist(), params))
    with tempfile.TemporaryDirectory() as folder:
        save_hf(model, Path(folder) / "ckpt")
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            Path(folder) / "ckpt", dtype=torch.bfloat16, device_map="cuda"
        ).eval()
    ids = prompts.cuda()

    def run_hf():
        with torch.no_grad():
            hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                pad_token_id=0,
                eos_token_id=None,
            )

    run_hf()
    hf_s = timed(run_hf)
    record = {
        "benchmark": "rollout_gpu",
        "device": torch.cuda.get_device_name(),
        "versions": {
            "league": league.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "settings": {k: v for k, v in vars(args).items() if k != "out"}
        | {"dtype": "bfloat16", "width": "Qwen3.6-35B-A3B (2048 hidden, 256 experts top-8)", "greedy": True},
        "results": {
            "league_engine": {"seconds": league_s, "tokens_per_s": total / league_s},
            "transformers_generate": {"seconds": hf_s, "tokens_per_s": total / hf_s},
            "ratio_league_to_transformers": hf_s / league_s,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record["results"], indent=2))


if __name__ == "__main__":
    main()
