"""Train/rollout log-prob agreement: the engine's log-prob of each token it samples against the trainer's log-prob of
the same token in the same sequence, on one model, in the run's dtype. The gap between the two is what GRPO's
importance ratio sees as off-policy noise; the goal on the GPU in bf16 is a mean absolute difference <= 1e-3.

The model is the Qwen3.6-35B-A3B width cut to ``--num-layers`` layers (MTP off), random weights drawn with
``--init-std`` (larger than ``league init``'s 0.02 so that the next-token distributions are not nearly uniform).
The engine samples ``--new-tokens`` tokens at temperature 1 for ``--batch`` random prompts of ``--prompt-len``
tokens (CUDA graphs, Triton decode kernels, fp32 or bf16 GDN states per ``--mamba-ssm-dtype``); the trainer then
computes the response log-probs of the same samples with its forward (packed micro-batches, chunked GDN, fused
output head). Reported over all response tokens: mean and max absolute difference, and the mean by position
quarter. Writes ``benchmarks/results/logprob_agreement_gpu.json``.

    python benchmarks/logprob_agreement_gpu.py [--num-layers 4] [--batch 64] [--prompt-len 200] [--new-tokens 512]
    python benchmarks/logprob_agreement_gpu.py --preset tiny --device cpu --dtype float32 --batch 4 --new-tokens 16
        (a smoke test of the script)
"""

import argparse
import json
import platform
from pathlib import Path

import torch
from common import random_model

import league
from league.engine.engine import EngineConfig, LLMEngine
from league.engine.request import SamplingParams
from league.models.qwen3_5_moe.presets import PRESETS, with_num_layers
from league.rl.optim import OptimConfig
from league.rl.sample import Sample
from league.rl.trainer import AlgorithmConfig, TrainConfig, Trainer


def rollout(model, prompts: list[list[int]], opts) -> list[Sample]:
    config = EngineConfig(
        max_running_requests=len(prompts),
        num_slots=len(prompts),
        context_length=len(prompts[0]) + opts.new_tokens + 8,
        mamba_ssm_dtype=opts.mamba_ssm_dtype,
    )
    engine = LLMEngine(model, config)
    params = SamplingParams(max_new_tokens=opts.new_tokens, temperature=1.0, ignore_eos=True, seed=0)
    outputs = engine.generate(prompts, params)
    return [
        Sample(prompt_ids=prompt, response_ids=o.output_ids, rollout_logprobs=o.output_logprobs, advantage=0.0, index=i)
        for i, (prompt, o) in enumerate(zip(prompts, outputs))
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="qwen3.6-35b-a3b")
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=200)
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--init-std", type=float, default=0.05)
    parser.add_argument("--mamba-ssm-dtype", default="float32")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "logprob_agreement_gpu.json")
    opts = parser.parse_args()
    args = with_num_layers(PRESETS[opts.preset], opts.num_layers).replace(mtp_num_layers=0)
    model = random_model(args, opts.device, getattr(torch, opts.dtype)).eval()
    with torch.no_grad():  # widen the matrices' distribution: peaked next-token distributions, as a trained model has
        for p in model.parameters():
            if p.ndim >= 2:
                p.mul_(opts.init_std / 0.02)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, args.vocab_size, (opts.batch, opts.prompt_len), generator=gen).tolist()
    samples = rollout(model, prompts, opts)
    trainer = Trainer(
        model,
        TrainConfig(global_batch_size=opts.batch, max_tokens_per_gpu=8192),
        AlgorithmConfig(),
        OptimConfig(lr=0.0),
        total_steps=1,
    )
    train_logprobs = trainer.compute_logprobs(samples)
    diffs = torch.stack([lp.float().cpu() - torch.tensor(s.rollout_logprobs) for lp, s in zip(train_logprobs, samples)])
    quarters = diffs.abs().chunk(4, dim=1)
    results = {
        "tokens": diffs.numel(),
        "mean_abs_diff": diffs.abs().mean().item(),
        "max_abs_diff": diffs.abs().max().item(),
        "mean_diff": diffs.mean().item(),
        "mean_abs_diff_by_position_quarter": [q.mean().item() for q in quarters],
        "mean_rollout_logprob": float(sum(sum(s.rollout_logprobs) for s in samples) / diffs.numel()),
    }
    print(json.dumps(results), flush=True)
    record = {
        "benchmark": "logprob_agreement_gpu",
        "device": torch.cuda.get_device_name() if opts.device == "cuda" else platform.processor() or "cpu",
        "versions": {"league": league.__version__, "torch": torch.__version__, "python": platform.python_version()},
        "settings": {k: v for k, v in vars(opts).items() if k != "out"} | {"temperature": 1.0},
        "results": results,
    }
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
