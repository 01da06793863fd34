"""Engine throughput on CPU: league's engine with and without MTP speculation, beside transformers'
``generate``, on the same tiny model, batch and lengths, measured in one run (so the ratios hold even on a
noisy machine). The model and its MTP head are first trained briefly on a predictable synthetic language,
so speculation has something to accept. Writes ``benchmarks/results/engine_cpu.json``.

    python benchmarks/engine_cpu.py [--batch 16] [--new-tokens 64] [--repeats 3]
"""

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers

import league
from league.checkpoint.hf import save_hf
from league.engine.config import EngineConfig
from league.engine.engine import LLMEngine
from league.engine.request import SamplingParams
from league.models.qwen3_5_moe import ForwardBatch, ModelArgs, Transformer

ARGS = ModelArgs(
    vocab_size=64,
    dim=128,
    num_layers=4,
    layer_types=["linear_attention"] * 3 + ["full_attention"],
    num_heads=4,
    num_kv_heads=2,
    head_dim=32,
    rope_theta=10000.0,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=32,
    linear_value_head_dim=32,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=64,
    shared_expert_intermediate_size=64,
    max_position_embeddings=4096,
    mtp_num_layers=1,
    eos_token_id=[],
    dtype="float32",
)


def synthetic(num: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """Arithmetic progressions mod vocab: every token after the second is predictable."""
    start = torch.randint(0, ARGS.vocab_size, (num, 1), generator=gen)
    step = torch.randint(1, 4, (num, 1), generator=gen)
    return (start + step * torch.arange(length)[None]) % ARGS.vocab_size


def train(model: Transformer, steps: int, gen: torch.Generator) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    num, length = 16, 32
    batch = ForwardBatch.packed([length] * num)
    for _ in range(steps):
        seqs = synthetic(num, length, gen)
        hidden = model(seqs.view(-1), batch)
        logits = model.logits(hidden).view(num, length, -1)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, ARGS.vocab_size), seqs[:, 1:].reshape(-1))
        mtp = model.mtp_logits(
            model.mtp_forward(hidden, torch.roll(seqs, -1, 1).view(-1), batch, detach_trunk=True), detach_head=True
        ).view(num, length, -1)
        loss = loss + F.cross_entropy(mtp[:, :-2].reshape(-1, ARGS.vocab_size), seqs[:, 2:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=150)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "engine_cpu.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = Transformer(ARGS)
    model.init_weights(0)
    final_loss = train(model, args.train_steps, gen)
    model.eval()
    prompts = synthetic(args.batch, args.prompt_len, gen)
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0)
    total = args.batch * args.new_tokens
    results = {}
    outputs = {}
    for name, spec in [
        ("league", {}),
        ("league_mtp_2", dict(speculative_algorithm="EAGLE", speculative_num_steps=2)),
        ("league_mtp_3", dict(speculative_algorithm="EAGLE", speculative_num_steps=3)),
    ]:
        config = EngineConfig(
            max_running_requests=args.batch, context_length=args.prompt_len + args.new_tokens + 8, **spec
        )
        state = {}

        def run(config=config, state=state):
            engine = LLMEngine(model, config)
            state["outs"] = engine.generate(prompts.tolist(), params)
            state["accept"] = engine.stats.spec.accept_length

        seconds = timed(run, args.repeats)
        outputs[name] = [o.output_ids for o in state["outs"]]
        results[name] = {"seconds": seconds, "tokens_per_s": total / seconds, "accept_length": state["accept"]}
    with tempfile.TemporaryDirectory() as folder:
        save_hf(model, Path(folder) / "ckpt")
        hf = transformers.AutoModelForCausalLM.from_pretrained(Path(folder) / "ckpt", dtype=torch.float32).eval()
        state = {}

        def run_hf():
            with torch.no_grad():
                state["out"] = hf.generate(
                    prompts,
                    attention_mask=torch.ones_like(prompts),
                    do_sample=False,
                    max_new_tokens=args.new_tokens,
                    min_new_tokens=args.new_tokens,
                    pad_token_id=0,
                    eos_token_id=None,
                )

        seconds = timed(run_hf, args.repeats)
        results["transformers_generate"] = {"seconds": seconds, "tokens_per_s": total / seconds}
        hf_tokens = state["out"][:, args.prompt_len :].tolist()
    same = {name: outs == hf_tokens for name, outs in outputs.items()}
    base = results["transformers_generate"]["tokens_per_s"]
    for name in results:
        results[name]["ratio_to_transformers"] = results[name]["tokens_per_s"] / base
    record = {
        "benchmark": "engine_cpu",
        "device": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "versions": {
            "league": league.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "settings": {
            **{k: v for k, v in vars(args).items() if k != "out"},
            "model": "tiny (4 layers: 3 GDN + 1 attention, 8 experts top-2, dim 128, MTP 1 layer)",
            "greedy": True,
            "train_loss": final_loss,
        },
        "results": results,
        "greedy_tokens_equal_transformers": same,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    for name, r in results.items():
        extra = f", acceptance length {r['accept_length']:.2f}" if r.get("accept_length") else ""
        print(f"{name:24s} {r['tokens_per_s']:9.1f} tokens/s  x{r['ratio_to_transformers']:.2f}{extra}")
    print(f"greedy tokens equal to transformers: {same}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
