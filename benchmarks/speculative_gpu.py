"""Speculative decoding with a trained MTP layer: acceptance length and decode speed of league's engine with and
without MTP speculation, on one model, side by side in one run.

The model has the per-layer shape of Qwen3.6-35B-A3B (dim 2048, 16 query / 2 KV heads of 256, GDN 16 key / 32 value
heads of 128, 256 experts top-8 of 512 plus a shared expert, the full 248,320-token vocabulary and output head) cut
to ``--num-layers`` layers of its hybrid pattern (3 Gated DeltaNet : 1 attention), with one MTP layer. Its random
weights (``common.random_model``) are first trained on the device for ``--train-steps`` AdamW steps in the model's
dtype, ``--train-batch`` x ``--train-len`` tokens a step (16 x 64), on a synthetic language over the first
``--lang-vocab`` token ids: arithmetic progressions mod ``--lang-vocab`` (steps 1 to 3) with a ``--noise`` fraction
of tokens replaced at random. The trunk learns the next token and the MTP layer (alone: trunk and output head
detached, as in league's trainer) the token after next, so drafts are accepted at a rate the training sets, not by
chance.

Then, for each batch in ``--batches`` and temperature in ``--temperatures`` (0: greedy; others: sampling, with
exact speculative sampling when speculating): B noise-free prompts of ``--prompt-len`` tokens, ``--new-tokens``
tokens each (EOS ignored), by the engine without speculation and with EAGLE-style MTP speculation at each of
``--spec-steps`` draft steps, both as configured by default (CUDA graphs where they apply, i.e. bf16 on
Hopper/Blackwell: one graph per decode step, or per draft-and-verify step). Decode rate is
``B * (new - 1) / (t_generate - t_prefill)``, ``t_prefill`` the time of the same call generating one token, each the
fastest of ``--repeats`` runs after a warm-up; acceptance length is tokens emitted per verify step (1 = no draft
accepted) over the timed runs; speedup is the decode rate over no speculation's at the same batch and temperature;
``live_fraction`` is the mean share of the batch still running in a decode step (below 1 when requests that advance
at different rates leave the last steps part-empty; 1 without speculation, where all finish together).
The engines capture one graph size, the batch's, so the last steps of a batch whose requests finish at different
steps run padded to the full batch; ``--graph-sizes default`` captures the engine's default sizes up to the batch
instead (as ``league serve`` does), so a shrinking batch runs in the smallest graph that holds it.
With ``--requests-per-slot K`` (default 1) each engine takes K x B prompts with B slots: a finished request's slot
takes a waiting one (continuous batching, as an RL rollout runs), so the batch stays full but for the last wave;
the decode rate then counts all K x B requests, and ``tokens_per_s`` (every request's new tokens over the whole
call, prefills included) gives ``speedup_end_to_end``; result keys end in ``_r<K>``.
Greedy outputs with and without speculation are compared per batch (``greedy_equal``), equal in fp32 on a CPU; in
bf16 the verify forward's numerics differ from decode's, so they may diverge (recorded, not asserted). Writes
``benchmarks/results/speculative_gpu.json``.

The trained layers are few (training must fit the device), so the MTP layer's share of a step's cost is larger
than in the full model. ``--serve-layers L`` (e.g. 40) decodes instead with the trained layers followed by
``L - --num-layers`` inert ones (random weights but for zero output projections: each reads the weights, caches and
states a real layer does, and adds exact zeros to the residual stream), so every step costs what the full-depth
model's does while tokens and drafts, and so acceptance, stay the trained model's. The 40-layer model takes 70 GB
of bf16 weights, made after training frees its optimizer.

Training keeps bf16 weights, gradients and AdamW moments (8 bytes a parameter: 64 GiB for the 8.6 B parameters of
the default 8 layers; up to about 16 layers fit an H200).

    python benchmarks/speculative_gpu.py [--num-layers 8] [--batches 1,16,64] [--spec-steps 1,2,3]
        [--temperatures 0,1] [--train-steps 200] [--lang-vocab 256] [--noise 0.05] [--new-tokens 256]
        [--requests-per-slot 4] [--graph-sizes default] [--serve-layers 40]
    OMP_NUM_THREADS=1 python benchmarks/speculative_gpu.py --device cpu --preset tiny --num-layers 4 \
        --lang-vocab 64 --train-steps 200 --train-len 32 --lr 3e-3 --prompt-len 16 --batches 1,4 --new-tokens 32 \
        --spec-steps 1,2 --out /tmp/spec.json   (a CPU smoke test: a minute or two on 2 cores)
"""

import argparse
import gc
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import random_model, versions

from league.engine.config import EngineConfig
from league.engine.engine import LLMEngine
from league.engine.request import SamplingParams, SpecStats
from league.models.qwen3_5_moe import ForwardBatch, ModelArgs, Transformer
from league.models.qwen3_5_moe.presets import PRESETS, with_num_layers
from league.ops.moe import grouped_mm_is_native


def synthetic(num: int, length: int, vocab: int, noise: float, gen: torch.Generator) -> torch.Tensor:
    """``[num, length]`` arithmetic progressions mod ``vocab`` (steps 1 to 3), a ``noise`` fraction of tokens
    replaced by uniform random ones (the progression goes on from its own value after a replaced token)."""
    start = torch.randint(0, vocab, (num, 1), generator=gen)
    step = torch.randint(1, 4, (num, 1), generator=gen)
    seqs = (start + step * torch.arange(length)[None]) % vocab
    flip = torch.rand(num, length, generator=gen) < noise
    return torch.where(flip, torch.randint(0, vocab, (num, length), generator=gen), seqs)


def losses(model: Transformer, seqs: torch.Tensor, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The trunk's next-token loss and the MTP layer's token-after-next loss (the MTP gradient reaches only MTP
    parameters), in fp32."""
    num, length = seqs.shape
    hidden = model(seqs.view(-1), batch)
    logits = model.logits(hidden).view(num, length, -1)
    trunk = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), seqs[:, 1:].flatten())
    mtp_hidden = model.mtp_forward(hidden, torch.roll(seqs, -1, 1).view(-1), batch, detach_trunk=True)
    mtp_logits = model.mtp_logits(mtp_hidden, detach_head=True).view(num, length, -1)
    mtp = F.cross_entropy(mtp_logits[:, :-2].flatten(0, 1).float(), seqs[:, 2:].flatten())
    return trunk, mtp


def train(model: Transformer, opts: argparse.Namespace, gen: torch.Generator) -> dict:
    """``opts.train_steps`` AdamW steps on the synthetic language, in the model's dtype; the losses of the first
    and last steps (and the mean of the last 10, less noisy), the time taken and, on a GPU, the peak memory."""
    if opts.train_steps < 1:
        return {"steps": 0}
    cuda = opts.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    optimizer = torch.optim.AdamW(model.parameters(), lr=opts.lr, betas=(0.9, 0.95), weight_decay=0.0, fused=cuda)
    batch = ForwardBatch.packed([opts.train_len] * opts.train_batch, device=opts.device)
    history: list[tuple[float, float]] = []
    every = max(1, opts.train_steps // 10)
    sync(opts.device)
    start = time.perf_counter()
    for step in range(opts.train_steps):
        seqs = synthetic(opts.train_batch, opts.train_len, opts.lang_vocab, opts.noise, gen).to(opts.device)
        trunk, mtp = losses(model, seqs, batch)
        optimizer.zero_grad(set_to_none=True)
        (trunk + mtp).backward()
        optimizer.step()
        history.append((trunk.item(), mtp.item()))
        if step % every == 0 or step == opts.train_steps - 1:
            print(f"train step {step:4d}: loss {history[-1][0]:.3f}, mtp loss {history[-1][1]:.3f}", flush=True)
    sync(opts.device)
    seconds = time.perf_counter() - start
    optimizer.zero_grad(set_to_none=True)
    del optimizer
    free_memory(opts.device)
    tail = history[-10:]
    memory = {"peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30} if cuda else {}
    return memory | {
        "steps": opts.train_steps,
        "seconds": seconds,
        "loss_first": history[0][0],
        "loss_last": history[-1][0],
        "loss_last10_mean": sum(t for t, _ in tail) / len(tail),
        "mtp_loss_first": history[0][1],
        "mtp_loss_last": history[-1][1],
        "mtp_loss_last10_mean": sum(m for _, m in tail) / len(tail),
    }


def with_inert_layers(model: Transformer, deep_args: ModelArgs, seed: int) -> Transformer:
    """``model`` deepened to ``deep_args``'s layers: its own layers (and embedding, MTP layer, norm, head) first,
    then random ones whose outputs to the residual stream are zero (the token mixer's output projection, the routed
    and shared experts' down projections). The extra layers read the weights, caches and recurrent states that
    real ones do, and their routers spread tokens over the experts, so a step costs what the deeper model's does;
    adding exact zeros, they leave every hidden state, and so every token and every draft, the trained
    ``model``'s."""
    num_layers, param = model.args.num_layers, next(model.parameters())
    if deep_args.num_layers <= num_layers or deep_args.layer_types[:num_layers] != model.args.layer_types:
        raise ValueError(
            f"cannot deepen layers {model.args.layer_types} to {deep_args.layer_types}: the deeper model must "
            "begin with the same layers and have more"
        )
    deep = random_model(deep_args, str(param.device), param.dtype, seed=seed)
    missing, unexpected = deep.load_state_dict(model.state_dict(), strict=False)
    extra = [name for name in deep.state_dict() if name.startswith("layers.") and int(name.split(".")[1]) >= num_layers]
    if unexpected or sorted(missing) != sorted(extra):
        raise RuntimeError(f"weights that do not match when deepening: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for layer in deep.layers[num_layers:]:
            mixer = layer.attn if layer.layer_type == "full_attention" else layer.gdn
            mixer.wo.weight.zero_()
            layer.moe.experts.w_down.zero_()
            layer.moe.shared.w_down.weight.zero_()
    return deep.train(model.training)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def make_engine(model: Transformer, opts: argparse.Namespace, batch: int, spec_steps: int) -> LLMEngine:
    """An engine for ``batch`` requests at once, speculating ``spec_steps`` draft tokens (0: none), through CUDA
    graphs if they apply (bf16 on Hopper/Blackwell)."""
    param = next(model.parameters())
    graphs = grouped_mm_is_native(param.dtype, param.device)
    config = EngineConfig(
        max_running_requests=batch,
        num_slots=batch,
        context_length=opts.prompt_len + opts.new_tokens + 8,
        max_num_batched_tokens=max(4096, batch * opts.prompt_len),
        cuda_graph_bs=([batch] if opts.graph_sizes == "batch" else None) if graphs else None,
        disable_cuda_graph=not graphs,
        speculative_algorithm="EAGLE" if spec_steps else None,
        speculative_num_steps=max(spec_steps, 1),
        mamba_ssm_dtype=opts.mamba_ssm_dtype,
        admission_batch=opts.admission_batch,
        speculative_max_batch=opts.spec_max_batch,
    )
    return LLMEngine(model, config)


def measure(
    model: Transformer,
    prompts: list[list[int]],
    opts: argparse.Namespace,
    spec_steps: int,
    temperature: float,
    slots: int | None = None,
) -> tuple[dict, list[list[int]]]:
    """Decode rate (and acceptance when speculating) of one engine setting running ``slots`` requests at a time
    (default: all of ``prompts`` at once); the last timed run's output ids."""
    requests, batch = len(prompts), slots or len(prompts)
    free_memory(opts.device)  # the previous setting's engine (cache, graphs)
    engine = make_engine(model, opts, batch, spec_steps)

    def timed(new_tokens: int) -> tuple[float, list[list[int]]]:
        params = SamplingParams(max_new_tokens=new_tokens, temperature=temperature, ignore_eos=True)
        sync(opts.device)
        start = time.perf_counter()
        outs = engine.generate(prompts, params)
        sync(opts.device)
        return time.perf_counter() - start, [o.output_ids for o in outs]

    timed(8)  # warm-up: kernels compiled and autotuned, CUDA graphs captured
    prefill_s = min(timed(1)[0] for _ in range(opts.repeats))
    before = SpecStats()
    before.add(engine.stats.spec)
    passes, prefills = engine.stats.forward_passes, engine.stats.prefill_passes
    total_s, outputs = float("inf"), []
    for _ in range(opts.repeats):
        seconds, outputs = timed(opts.new_tokens)
        total_s = min(total_s, seconds)
    prefill_passes = (engine.stats.prefill_passes - prefills) / opts.repeats
    decode_steps = (engine.stats.forward_passes - passes) / opts.repeats - prefill_passes
    record = {
        "batch": batch,
        "requests": requests,
        "temperature": temperature,
        "spec_steps": spec_steps,
        "cuda_graphs": engine.runner.use_graphs,
        "seconds": total_s,
        "prefill_seconds": prefill_s,
        "decode_tokens_per_s": requests * (opts.new_tokens - 1) / (total_s - prefill_s),
        "tokens_per_s": requests * opts.new_tokens / total_s,
        "decode_steps": decode_steps,
        "prefill_passes": prefill_passes,  # prefill forwards a call (waiting requests admitted together share one)
        # requests still running in the average decode step, over the batch (1: no step ran part-empty)
        "live_fraction": 1.0,
    }
    if spec_steps:
        spec = engine.stats.spec
        steps = spec.verify_steps - before.verify_steps
        record["live_fraction"] = steps / opts.repeats / max(decode_steps, 1) / batch
        record["accept_length"] = (spec.verified_output_tokens - before.verified_output_tokens) / max(steps, 1)
        record["draft_accept_rate"] = (spec.accepted_tokens - before.accepted_tokens) / max(
            spec.draft_tokens - before.draft_tokens, 1
        )
    return record, outputs


def run_batch(
    model: Transformer, prompts: list[list[int]], opts: argparse.Namespace, temperature: float, slots: int
) -> tuple[dict[str, dict], bool | None]:
    """Every setting at one batch (``slots`` requests at a time) and temperature: no speculation, then each draft
    length; greedy: whether every speculative output equals the output without speculation."""
    waves = len(prompts) // slots
    tag = f"b{slots}_t{temperature:g}" + (f"_r{waves}" if waves > 1 else "")
    results: dict[str, dict] = {}
    base, base_ids = measure(model, prompts, opts, 0, temperature, slots)
    results[f"{tag}_no_spec"] = base
    print(tag, "no spec", json.dumps(base), flush=True)
    equal = None
    for steps in opts.spec_steps:
        rec, ids = measure(model, prompts, opts, steps, temperature, slots)
        rec["speedup"] = rec["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        rec["speedup_end_to_end"] = rec["tokens_per_s"] / base["tokens_per_s"]
        if temperature == 0:
            same = [a == b for a, b in zip(ids, base_ids)]
            rec["greedy_equal"] = all(same)
            rec["greedy_equal_requests"] = sum(same) / len(same)
            equal = rec["greedy_equal"] if equal is None else equal and rec["greedy_equal"]
        results[f"{tag}_spec{steps}"] = rec
        print(tag, f"spec {steps}", json.dumps(rec), flush=True)
    return results, equal


def model_args(opts: argparse.Namespace) -> ModelArgs:
    """The preset cut to ``--num-layers`` layers of its pattern, with one MTP layer."""
    return with_num_layers(PRESETS[opts.preset], opts.num_layers).replace(mtp_num_layers=1)


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine() or "cpu"


def print_summary(results: dict[str, dict]) -> None:
    """One line per setting: decode rate, acceptance length, speedup over no speculation."""
    print(f"{'setting':28s} {'decode tok/s':>12s} {'accept len':>10s} {'speedup':>8s}  greedy equal")

    def cell(r: dict, key: str, width: int) -> str:
        return f"{r[key]:{width}.2f}" if key in r else " " * width

    for name, r in results.items():
        print(
            f"{name:28s} {r['decode_tokens_per_s']:12.1f} {cell(r, 'accept_length', 10)} {cell(r, 'speedup', 8)}"
            f"  {r.get('greedy_equal', '')}"
        )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--preset", default="qwen3.6-35b-a3b", choices=sorted(PRESETS))
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument(
        "--serve-layers",
        type=int,
        default=None,
        help="decode with the trained layers followed by inert ones up to this depth (e.g. 40, the full model), so "
        "steps cost what the full-depth model's do while the tokens stay the trained model's; default: --num-layers",
    )
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--spec-steps", default="1,2,3")
    parser.add_argument("--temperatures", default="0,1", help="0 is greedy; greedy is always measured")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--graph-sizes",
        choices=("batch", "default"),
        default="batch",
        help="CUDA graph sizes: the batch's only (a step runs padded to it as requests finish), or the engine's "
        "default sizes up to the batch (a shrinking batch runs in the smallest graph that holds it)",
    )
    parser.add_argument(
        "--requests-per-slot",
        type=int,
        default=1,
        help="requests per engine slot: with more than 1, finished requests' slots take waiting ones (continuous "
        "batching), so the batch stays full until the last wave",
    )
    parser.add_argument(
        "--admission-batch",
        type=int,
        default=1,
        help="the engines' admission_batch: with --requests-per-slot > 1, waiting requests are admitted only once "
        "this many fit, so they share a prefill",
    )
    parser.add_argument(
        "--spec-max-batch",
        type=int,
        default=None,
        help="the speculating engines' speculative_max_batch: steps over this many requests decode without drafts",
    )
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument("--train-batch", type=int, default=16, help="sequences per training step")
    parser.add_argument("--train-len", type=int, default=64, help="tokens per training sequence")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lang-vocab", type=int, default=256, help="token ids the synthetic language uses")
    parser.add_argument("--noise", type=float, default=0.05, help="fraction of training tokens made random")
    parser.add_argument("--mamba-ssm-dtype", default="float32", help="GDN state dtype of the engine's cache")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "speculative_gpu.json")
    opts = parser.parse_args()
    opts.dtype = opts.dtype or ("bfloat16" if opts.device == "cuda" else "float32")
    opts.batches = [int(b) for b in opts.batches.split(",")]
    opts.spec_steps = [int(s) for s in opts.spec_steps.split(",")]
    opts.temperatures = sorted({0.0, *(float(t) for t in opts.temperatures.split(","))})
    if opts.requests_per_slot < 1:
        parser.error(f"--requests-per-slot must be >= 1, got {opts.requests_per_slot}")
    return opts


def main() -> None:
    opts = parse_args()
    begin = time.perf_counter()
    args = model_args(opts)
    if not 4 <= opts.lang_vocab <= args.vocab_size:
        raise SystemExit(f"--lang-vocab {opts.lang_vocab}: must be in [4, {args.vocab_size}] for this model")
    torch.manual_seed(opts.seed)
    gen = torch.Generator().manual_seed(opts.seed)
    dtype = getattr(torch, opts.dtype)
    model = random_model(args, opts.device, dtype, seed=opts.seed).train()
    num_params = sum(p.numel() for p in model.parameters())
    print(
        f"model: {opts.preset}, {args.num_layers} layers {args.layer_types} + 1 MTP layer, "
        f"{num_params / 1e9:.2f} B parameters, {opts.dtype} on {opts.device}",
        flush=True,
    )
    training = train(model, opts, gen)
    print("training:", json.dumps(training), flush=True)
    model.eval().requires_grad_(False)
    served = args
    if opts.serve_layers is not None and opts.serve_layers != args.num_layers:
        served = with_num_layers(PRESETS[opts.preset], opts.serve_layers).replace(mtp_num_layers=1)
        model = with_inert_layers(model, served, seed=opts.seed + 1).eval().requires_grad_(False)
        free_memory(opts.device)  # the trained model's own copy
        print(f"served with {served.num_layers - args.num_layers} inert layers after the trained ones", flush=True)
    waves = opts.requests_per_slot
    prompts = synthetic(max(opts.batches) * waves, opts.prompt_len, opts.lang_vocab, 0.0, gen).tolist()
    results: dict[str, dict] = {}
    greedy_equal: dict[str, bool | None] = {}
    for batch in opts.batches:
        for temperature in opts.temperatures:
            recs, equal = run_batch(model, prompts[: batch * waves], opts, temperature, batch)
            results |= recs
            if temperature == 0:
                greedy_equal[f"b{batch}"] = equal
    record = {
        "benchmark": "speculative_gpu",
        "device": device_name(opts.device),
        "versions": versions(),
        "settings": {k: v for k, v in vars(opts).items() if k != "out"}
        | {
            "model": f"{opts.preset} cut to {args.num_layers} layers ({args.layer_types}) + 1 MTP layer"
            + (
                f", served with {served.num_layers - args.num_layers} inert layers after them"
                if served is not args
                else ""
            ),
            "num_params": num_params,
            "served_num_layers": served.num_layers,
            "served_num_params": sum(p.numel() for p in model.parameters()),
            "vocab_size": args.vocab_size,
            "speculative_algorithm": "EAGLE (the model's MTP layer, chain drafts)",
        },
        "training": training,
        "results": results,
        "greedy_equal": greedy_equal,
        "total_seconds": time.perf_counter() - begin,
    }
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(record, indent=2) + "\n")
    print_summary(results)
    print(f"greedy outputs equal with and without speculation: {greedy_equal}")
    print(f"total {record['total_seconds']:.0f} s; wrote {opts.out}", flush=True)


if __name__ == "__main__":
    main()
