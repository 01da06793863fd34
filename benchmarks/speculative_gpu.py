"""Speculative decoding with a trained MTP layer: league's engine with and without MTP speculation on one model,
side by side in one run. The model (the Qwen3.6-35B-A3B width at ``--num-layers`` layers, its MTP layer, the full
vocabulary) is first trained on the GPU on a synthetic language whose tokens follow predictably (arithmetic
progressions over the first ``--lang-vocab`` ids, with a ``--noise`` fraction of random tokens), trunk and MTP
layer together, so the MTP layer's drafts are accepted at a rate set by the data rather than by chance. Greedy
decoding of ``--new-tokens`` tokens after ``--prompt-len``-token prompts at each batch size; decode rate and
acceptance length as in ``rollout_gpu.py``. Writes ``benchmarks/results/speculative_gpu.json``.

    python benchmarks/speculative_gpu.py [--num-layers 4] [--batches 1,16,64] [--spec-steps 1,2,3]
    python benchmarks/speculative_gpu.py --preset tiny --device cpu --dtype float32 --batches 1,4 --new-tokens 16
        (a smoke test of the script)
"""

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import random_model

import league
from league.engine.engine import EngineConfig, LLMEngine
from league.engine.request import SamplingParams
from league.models.qwen3_5_moe import ForwardBatch, Transformer
from league.models.qwen3_5_moe.presets import PRESETS, with_num_layers


def synthetic(num: int, length: int, vocab: int, noise: float, gen: torch.Generator) -> torch.Tensor:
    """``[num, length]`` arithmetic progressions mod ``vocab`` (steps 1 to 3), a ``noise`` fraction replaced."""
    start = torch.randint(0, vocab, (num, 1), generator=gen)
    step = torch.randint(1, 4, (num, 1), generator=gen)
    seqs = (start + step * torch.arange(length)[None]) % vocab
    flip = torch.rand(num, length, generator=gen) < noise
    return torch.where(flip, torch.randint(0, vocab, (num, length), generator=gen), seqs)


def train(model: Transformer, opts, gen: torch.Generator) -> list[float]:
    """Next-token loss of the trunk plus the MTP layer's loss on the token after next; [first, last] losses."""
    opt = torch.optim.AdamW(model.parameters(), lr=opts.lr, betas=(0.9, 0.95))
    num, length = 16, 64
    batch = ForwardBatch.packed([length] * num, device=opts.device)
    losses = []
    for _ in range(opts.train_steps):
        seqs = synthetic(num, length, opts.lang_vocab, opts.noise, gen).to(opts.device)
        hidden = model(seqs.view(-1), batch)
        logits = model.logits(hidden).float().view(num, length, -1)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), seqs[:, 1:].flatten())
        mtp_hidden = model.mtp_forward(hidden, torch.roll(seqs, -1, 1).view(-1), batch, detach_trunk=True)
        mtp = model.mtp_logits(mtp_hidden, detach_head=True).float().view(num, length, -1)
        mtp_loss = F.cross_entropy(mtp[:, :-2].flatten(0, 1), seqs[:, 2:].flatten())
        opt.zero_grad(set_to_none=True)
        (loss + mtp_loss).backward()
        opt.step()
        losses.append((float(loss), float(mtp_loss)))
    return [losses[0], losses[-1]]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def decode_rate(model: Transformer, prompts: list[list[int]], opts, spec_steps: int) -> tuple[dict, list]:
    batch = len(prompts)
    config = EngineConfig(
        max_running_requests=batch,
        num_slots=batch,
        context_length=len(prompts[0]) + opts.new_tokens + 8,
        cuda_graph_bs=[batch] if opts.device == "cuda" and not spec_steps else None,
        speculative_algorithm="EAGLE" if spec_steps else None,
        speculative_num_steps=max(spec_steps, 1),
    )
    engine = LLMEngine(model, config)
    engine.generate(prompts, SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True))  # warm-up

    def timed(new_tokens: int) -> tuple[float, list]:
        sync(opts.device)
        start = time.perf_counter()
        outs = engine.generate(prompts, SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True))
        sync(opts.device)
        return time.perf_counter() - start, outs

    prefill_s, _ = timed(1)
    before = engine.stats.spec.verify_steps, engine.stats.spec.verified_output_tokens
    total_s, outs = timed(opts.new_tokens)
    record = {"decode_tokens_per_s": batch * (opts.new_tokens - 1) / (total_s - prefill_s), "seconds": total_s}
    if spec_steps:
        steps = engine.stats.spec.verify_steps - before[0]
        record["accept_length"] = (engine.stats.spec.verified_output_tokens - before[1]) / max(steps, 1)
    return record, [o.output_ids for o in outs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="qwen3.6-35b-a3b")
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--spec-steps", default="1,2,3")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lang-vocab", type=int, default=256)
    parser.add_argument("--noise", type=float, default=0.05)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "speculative_gpu.json")
    opts = parser.parse_args()
    args = with_num_layers(PRESETS[opts.preset], opts.num_layers).replace(mtp_num_layers=1)
    gen = torch.Generator().manual_seed(0)
    model = random_model(args, opts.device, getattr(torch, opts.dtype)).train()
    losses = train(model, opts, gen)
    print("train (trunk, mtp) losses first/last:", losses, flush=True)
    model.eval()
    batches = [int(b) for b in opts.batches.split(",")]
    prompts = synthetic(max(batches), opts.prompt_len, opts.lang_vocab, 0.0, gen).tolist()
    results = {}
    for batch in batches:
        base, base_ids = decode_rate(model, prompts[:batch], opts, 0)
        results[f"b{batch}_no_spec"] = base
        print(batch, "no spec", json.dumps(base), flush=True)
        for steps in [int(s) for s in opts.spec_steps.split(",")]:
            rec, ids = decode_rate(model, prompts[:batch], opts, steps)
            rec["speedup"] = rec["decode_tokens_per_s"] / base["decode_tokens_per_s"]
            rec["greedy_equal_no_spec"] = ids == base_ids
            results[f"b{batch}_spec{steps}"] = rec
            print(batch, f"spec {steps}", json.dumps(rec), flush=True)
    record = {
        "benchmark": "speculative_gpu",
        "device": torch.cuda.get_device_name() if opts.device == "cuda" else platform.processor() or "cpu",
        "versions": {"league": league.__version__, "torch": torch.__version__, "python": platform.python_version()},
        "settings": {k: v for k, v in vars(opts).items() if k != "out"} | {"greedy": True},
        "train_losses_first_last": losses,
        "results": results,
    }
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
