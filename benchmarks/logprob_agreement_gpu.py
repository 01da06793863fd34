"""Train/rollout log-prob agreement: the engine's log-prob of each token it samples against the trainer's log-prob of
the same token in the same sequence, on one model, in the run's dtype, and the gap split into its parts. The gap is
what GRPO's importance ratio sees as off-policy noise; the goal on the GPU in bf16 is a mean absolute difference
<= 1e-3.

The model is the Qwen3.6-35B-A3B width cut to ``--num-layers`` layers (MTP off), random weights drawn with
``--init-std`` (larger than ``league init``'s 0.02 so that the next-token distributions are not nearly uniform; a
comma list, e.g. ``0.02,0.05,0.1``, repeats the whole measurement for each value on the same base weights, scaled,
and the same prompts). The engine samples ``--new-tokens`` tokens at temperature 1 for ``--batch`` random prompts of
``--prompt-len`` tokens (prompt prefill, then decode: CUDA graphs, Triton decode kernels, fp32 or bf16 GDN states
per ``--mamba-ssm-dtype``). On those samples the script computes four sets of response log-probs:

    rollout   the engine's, as sampled (the first response token from the prompt prefill, the rest from decode);
    trainer   ``Trainer.compute_logprobs``: packed micro-batches of 8,192 tokens, chunked GDN, varlen attention,
              the fused output head (``linear_token_logprobs``);
    prefill   the engine's forward as a prefill of each whole sequence (prompt + response, one sequence per
              forward, into a fresh engine cache slot, as ``league score`` runs it, not batch-invariant), then the
              engine's head: ``model.logits`` in the model's dtype and the fp32 ``token_logprobs``;
    head      the engine's head (as above, ``--batch`` rows per logits GEMM as in decode) applied to the trainer's
              own final hidden states (after the final norm).

Each gap is reported over all response tokens as ``mean_abs_diff``, ``max_abs_diff``, ``mean_diff`` (signed, first
minus second), ``mean_abs_diff_by_position_quarter`` and ``first_token_mean_abs_diff`` (response token 0):

    rollout_vs_trainer   trainer - rollout: the whole train/rollout gap (the goal's figure);
    head_only            trainer - head: the output heads' numerics alone, the trunk's hidden states held equal
                         (the trainer's side from a second trainer pass: see trainer_rerun_max_abs_diff);
    prefill_vs_trainer   trainer - prefill: engine vs trainer forward over whole sequences (packing, and the
                         heads; with a fresh cache the prefill takes the trainer's varlen attention and chunked GDN);
    decode_vs_prefill    prefill - rollout: step-by-step generation (batched prompt prefill for token 0, then
                         decode's recurrent GDN, cached attention and batch-``--batch`` GEMMs) vs whole-sequence
                         prefill. The signed differences add: prefill_vs_trainer + decode_vs_prefill =
                         rollout_vs_trainer, token by token.

Also: ``head_logits_vs_fp32`` (fp32-logits head - engine head, on the trainer's hidden states: the rounding of the
logits to the model's dtype); ``hidden_rel_err_prefill_vs_trainer``, the mean and max over response positions of
``|h_prefill - h_trainer| / |h_trainer|`` (L2 over the model dim) of the final hidden states; and
``trainer_rerun_max_abs_diff``, the largest change of the trainer's log-probs between two identical passes (its
run-to-run nondeterminism). Writes ``benchmarks/results/logprob_agreement_gpu.json``, one results block per
``--init-std`` value.

With ``--decode-parity``, the engine's prompt prefill, the prefill pass and the trainer run with
decode parity (their token mixers computed as decode computes them; see ``ops.numerics``).

With ``--routing-replay``, each results block also has ``routing_replay``: the rollout/trainer gap and the mean
low_var_kl (trainer vs rollout) without and with the trainer replaying the rollout's experts
(``--use-rollout-routing-replay``).

With ``--attribute``, each results block also has ``attribution``: the decode gap split by layer and sublayer, on
the first ``--attribute-batch`` samples (default 8). The engine decodes their sampled tokens teacher-forced, one
token per step, as ``LLMEngine._decode`` builds its batch but without CUDA graphs (after a batched prefill of the
prompts into its cache), and forward hooks on each layer's mixer (``.gdn`` or ``.attn``), ``.moe`` and the layer
keep their outputs at the positions decode feeds (every response token but the last); the reference is the
trainer's whole-sequence forward (one packed sequence, no cache). Per layer: ``mixer_rel_err``, ``moe_rel_err`` and
``layer_out_rel_err``, the mean over those positions of ``|a - b| / |b|`` (decode a, whole sequence b), with the
error accumulated from earlier sublayers; and ``*_own_rel_err``, from a second decode in which every hooked
module's input is replaced by the whole-sequence run's (so the mixer's cache is filled from exact inputs too): the
error each sublayer adds alone (for the layer output, the residual plus the two own outputs). Also
``final_hidden_rel_err`` and ``logprob_gap`` (whole sequence - decode, the engine's head on both, response tokens
1 on), to set beside ``decode_vs_prefill`` (whose decode ran ``--batch`` rows a step, with CUDA graphs).

    python benchmarks/logprob_agreement_gpu.py [--num-layers 4] [--batch 64] [--prompt-len 200] [--new-tokens 512]
        [--init-std 0.05 | --init-std 0.02,0.05,0.1] [--decode-parity] [--attribute [--attribute-batch 8]]
    python benchmarks/logprob_agreement_gpu.py --preset tiny --device cpu --dtype float32 --batch 4 --new-tokens 16
        (a smoke test of the script)
"""

import argparse
import gc
import json
import platform
from pathlib import Path

import torch
import torch.nn.functional as F
from common import random_model, rel_err, teacher_forced_batches, widen

import league
from league.engine.cache import allocate_cache
from league.engine.config import EngineConfig
from league.engine.engine import LLMEngine
from league.engine.request import SamplingParams
from league.models.qwen3_5_moe import ForwardBatch, Transformer
from league.models.qwen3_5_moe.presets import PRESETS, with_num_layers
from league.ops.logprob import token_logprobs
from league.ops.numerics import DECODE_PARITY, FAST
from league.rl.algorithms import approx_kl
from league.rl.optim import OptimConfig
from league.rl.sample import Sample
from league.rl.trainer import AlgorithmConfig, TrainConfig, Trainer, response_logprobs
from league.score import LOGIT_ROWS


def rollout(model: Transformer, prompts: list[list[int]], opts) -> tuple[LLMEngine, list[Sample]]:
    config = EngineConfig(
        max_running_requests=len(prompts),
        num_slots=len(prompts),
        context_length=len(prompts[0]) + opts.new_tokens + 8,
        mamba_ssm_dtype=opts.mamba_ssm_dtype,
        numerics="decode_parity" if opts.decode_parity else "fast",
        enable_return_routed_experts=opts.routing_replay,
    )
    engine = LLMEngine(model, config)
    params = SamplingParams(max_new_tokens=opts.new_tokens, temperature=1.0, ignore_eos=True, seed=0)
    outputs = engine.generate(prompts, params, routed_experts_start_len=0 if opts.routing_replay else None)
    samples = [
        Sample(
            prompt_ids=prompt,
            response_ids=o.output_ids,
            rollout_logprobs=o.output_logprobs,
            advantage=0.0,
            index=i,
            routed_experts=o.routed_experts,
        )
        for i, (prompt, o) in enumerate(zip(prompts, outputs))
    ]
    return engine, samples


def engine_head(model: Transformer, hidden_RD: torch.Tensor, tokens_R: torch.Tensor, rows: int) -> torch.Tensor:
    """The engine's log-probs: ``model.logits`` (the model's dtype) ``rows`` rows at a time, then fp32 log-softmax."""
    return torch.cat(
        [
            token_logprobs(model.logits(hidden_RD[s : s + rows]), tokens_R[s : s + rows])
            for s in range(0, len(tokens_R), rows)
        ]
    )


def fp32_head(model: Transformer, hidden_RD: torch.Tensor, tokens_R: torch.Tensor) -> torch.Tensor:
    """Log-probs from fp32 logits (fp32 copies of the hidden states and the head, no TF32)."""
    weight = model.output_weight().float()
    return torch.cat(
        [
            token_logprobs(F.linear(hidden_RD[s : s + LOGIT_ROWS].float(), weight), tokens_R[s : s + LOGIT_ROWS])
            for s in range(0, len(tokens_R), LOGIT_ROWS)
        ]
    )


@torch.no_grad()
def trainer_pass(trainer: Trainer, samples: list[Sample]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``Trainer.compute_logprobs``'s pass (same micro-batches, same calls), also keeping each sample's final hidden
    states at the positions that predict its response tokens, ``[R_i, D]``."""
    budget = trainer.config.log_probs_max_tokens_per_gpu or trainer.config.max_tokens_per_gpu
    logprobs: list[torch.Tensor] = [torch.empty(0)] * len(samples)
    hidden: list[torch.Tensor] = [torch.empty(0)] * len(samples)
    for mb in trainer._micro_batches(samples, budget):
        logp_R, hidden_TD = response_logprobs(trainer.model, mb, trainer.temperature)
        lengths = mb.packed.response_lengths
        for i, lp, h in zip(mb.indices, logp_R.split(lengths), hidden_TD[mb.packed.logit_index_R].split(lengths)):
            logprobs[i], hidden[i] = lp, h
    return logprobs, hidden


@torch.no_grad()
def slot_cache(engine: LLMEngine, num_slots: int):
    """A cache of ``num_slots`` slots laid out by slot, each of the engine's context, in the engine's dtypes (the
    engine's own is paged, its blocks handed out by its scheduler)."""
    runner = engine.runner
    return allocate_cache(
        runner.cache_args, num_slots, runner.slot_len, runner.dtype, runner.device, state_dtype=runner.state_dtype
    )


def prefill_pass(engine: LLMEngine, samples: list[Sample]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The engine's forward over each whole sequence from a fresh cache slot, and its head's response log-probs;
    also the final hidden states at the positions that predict the response tokens, ``[R_i, D]``."""
    model, device = engine.model, engine.device
    logprobs, hidden, cache = [], [], slot_cache(engine, 1)
    for s in samples:
        tokens = torch.tensor(s.prompt_ids + s.response_ids, device=device)
        batch = ForwardBatch.packed([len(tokens)], device=device, cache_lens=[0], slots=[0], numerics=engine.numerics)
        hidden_RD = model(tokens, batch, cache)[len(s.prompt_ids) - 1 : -1]
        logprobs.append(engine_head(model, hidden_RD, tokens[len(s.prompt_ids) :], LOGIT_ROWS))
        hidden.append(hidden_RD)
    return logprobs, hidden


def sublayers(model: Transformer) -> dict[tuple[int, str], torch.nn.Module]:
    """Each decoder layer's mixer (``.attn`` or ``.gdn``), its ``.moe`` and the layer itself, by (layer, name)."""
    named = {}
    for i, layer in enumerate(model.layers):
        named[i, "mixer"] = layer.attn if layer.layer_type == "full_attention" else layer.gdn
        named[i, "moe"], named[i, "layer"] = layer.moe, layer
    return named


def hook(
    modules: dict, outputs: dict, inputs: dict | None = None, rows: slice = slice(None), given: dict | None = None
):
    """Forward hooks that append each module's output (with ``inputs``, also its first argument) at ``rows`` to
    ``outputs[key]``; with ``given``, a pre-hook first replaces the first argument with ``given[key]``."""
    handles = []
    for key, m in modules.items():
        if given is not None:
            handles.append(m.register_forward_pre_hook(lambda _m, a, key=key: (given[key], *a[1:])))
        if inputs is not None:
            handles.append(m.register_forward_pre_hook(lambda _m, a, key=key: inputs[key].append(a[0][rows])))
        handles.append(m.register_forward_hook(lambda _m, _a, out, key=key: outputs[key].append(out[rows])))
    return handles


@torch.no_grad()
def teacher_forced_decode(
    engine: LLMEngine, seqs: list[list[int]], prompt_len: int, outputs: dict, inputs_SBD: dict | None = None
) -> torch.Tensor:
    """The prompts prefilled into cache slots ``0..B-1``, then each sequence but its last token fed one token per
    step, as ``LLMEngine._decode`` runs it without CUDA graphs. During decode, hooks append each sublayer's output
    ``[B, D]`` to ``outputs``; with ``inputs_SBD``, each sublayer's input at step ``j`` is replaced by
    ``inputs_SBD[key][j]``. Returns the final hidden states ``[B, S, D]`` (``S`` decode steps)."""
    model, device = engine.model, engine.device
    prompts = torch.tensor([t for s in seqs for t in s[:prompt_len]], device=device)
    prefill, steps = teacher_forced_batches(len(seqs), prompt_len, len(seqs[0]) - 1, device, engine.numerics)
    cache = slot_cache(engine, len(seqs))
    model(prompts, prefill, cache)
    given = None if inputs_SBD is None else {}
    handles = hook(sublayers(model), outputs, given=given)
    hidden = []
    for step, (p, batch) in enumerate(steps):
        if given is not None:
            given.update({key: x_SBD[step] for key, x_SBD in inputs_SBD.items()})
        hidden.append(model(torch.tensor([s[p] for s in seqs], device=device), batch, cache))
    for h in handles:
        h.remove()
    return torch.stack(hidden, dim=1)


@torch.no_grad()
def attribute(engine: LLMEngine, samples: list[Sample]) -> dict:
    """Per layer, the relative error of each sublayer's output in teacher-forced decode against the whole-sequence
    forward (the trainer's: one packed sequence, no cache), over the response positions that decode feeds (all
    response tokens but the last): accumulated (decode's own inputs), and own (each sublayer's input replaced by
    the whole-sequence run's, so the error it adds alone). Also the log-prob gap of the two runs' final hidden
    states through the engine's head."""
    model, device = engine.model, engine.device
    prompt_len, seqs = len(samples[0].prompt_ids), [s.prompt_ids + s.response_ids for s in samples]
    rows = slice(prompt_len, len(seqs[0]) - 1)
    keys = list(sublayers(model))
    whole_in, whole_out = {k: [] for k in keys}, {k: [] for k in keys}
    handles = hook(sublayers(model), whole_out, whole_in, rows)
    numerics = engine.numerics  # the reference computes as the trainer does
    whole = [
        model(torch.tensor(s, device=device), ForwardBatch.packed([len(s)], device=device, numerics=numerics))[rows]
        for s in seqs
    ]
    for h in handles:
        h.remove()
    whole_in_SBD = {k: torch.stack(v, dim=1) for k, v in whole_in.items()}
    whole_out_BSD = {k: torch.stack(v) for k, v in whole_out.items()}
    acc, own = {k: [] for k in keys}, {k: [] for k in keys}
    decoded = teacher_forced_decode(engine, seqs, prompt_len, acc)
    teacher_forced_decode(engine, seqs, prompt_len, own, whole_in_SBD)
    targets = torch.tensor([s[prompt_len + 1 :] for s in seqs], device=device)
    head = [engine_head(model, h, t, LOGIT_ROWS) for h, t in zip(whole, targets)]
    head_decoded = [engine_head(model, h, t, LOGIT_ROWS) for h, t in zip(decoded, targets)]
    layers = []
    for i, layer in enumerate(model.layers):
        entry = {"layer": i, "type": layer.layer_type}
        for name, label in (("mixer", "mixer"), ("moe", "moe"), ("layer", "layer_out")):
            ref = whole_out_BSD[i, name]
            entry[f"{label}_rel_err"] = rel_err(torch.stack(acc[i, name], dim=1), ref)
            entry[f"{label}_own_rel_err"] = rel_err(torch.stack(own[i, name], dim=1), ref)
        layers.append(entry)
    return {
        "batch": len(samples),
        "positions": len(samples) * (rows.stop - rows.start),
        "layers": layers,
        "final_hidden_rel_err": rel_err(decoded, torch.stack(whole)),
        "logprob_gap": gap(head, head_decoded),
    }


def routing_replay(trainer: Trainer, samples: list[Sample], train: list, rollout_lp: list) -> dict:
    """The train/rollout gap and KL (low_var_kl, trainer vs rollout, mean over response tokens) without and with
    routing replay (``--use-rollout-routing-replay``: the trainer's forward uses the rollout's experts)."""
    trainer.algo.use_rollout_routing_replay = True
    replayed = trainer.compute_logprobs(samples)
    trainer.algo.use_rollout_routing_replay = False

    def kl(logprobs: list[torch.Tensor]) -> float:
        logp, rollout = torch.cat([t.float().cpu() for t in logprobs]), torch.cat(rollout_lp).float()
        return approx_kl(logp, rollout, "low_var_kl").mean().item()

    return {
        "without": {"rollout_vs_trainer": gap(train, rollout_lp), "kl_low_var": kl(train)},
        "with": {"rollout_vs_trainer": gap(replayed, rollout_lp), "kl_low_var": kl(replayed)},
    }


def gap(first: list[torch.Tensor], second: list[torch.Tensor]) -> dict:
    """Statistics of ``first - second`` over all response tokens (equal-length responses, ``[B, N]``)."""
    diffs = torch.stack([a.float().cpu() - b.float().cpu() for a, b in zip(first, second)])
    return {
        "mean_abs_diff": diffs.abs().mean().item(),
        "max_abs_diff": diffs.abs().max().item(),
        "mean_diff": diffs.mean().item(),
        "mean_abs_diff_by_position_quarter": [q.mean().item() for q in diffs.abs().chunk(4, dim=1)],
        "first_token_mean_abs_diff": diffs[:, 0].abs().mean().item(),
    }


def measure(args, opts, init_std: float, prompts: list[list[int]]) -> dict:
    model = random_model(args, opts.device, getattr(torch, opts.dtype)).eval()
    widen(model, init_std)
    engine, samples = rollout(model, prompts, opts)
    trainer = Trainer(
        model,
        TrainConfig(global_batch_size=opts.batch, max_tokens_per_gpu=8192),
        AlgorithmConfig(),
        OptimConfig(lr=0.0),
        total_steps=1,
        numerics=DECODE_PARITY if opts.decode_parity else FAST,
    )
    train = trainer.compute_logprobs(samples)
    train_again, train_hidden = trainer_pass(trainer, samples)
    prefill, prefill_hidden = prefill_pass(engine, samples)
    targets = [torch.tensor(s.response_ids, device=engine.device) for s in samples]
    lengths = [len(t) for t in targets]
    with torch.no_grad():
        h_train, t_all = torch.cat(train_hidden), torch.cat(targets)
        head = engine_head(model, h_train, t_all, opts.batch).split(lengths)
        head_fp32 = fp32_head(model, h_train, t_all).split(lengths)
        h_train = h_train.float()
        rel_err = (torch.cat(prefill_hidden).float() - h_train).norm(dim=-1) / h_train.norm(dim=-1)
    rollout_lp = [torch.tensor(s.rollout_logprobs) for s in samples]
    attribution = {"attribution": attribute(engine, samples[: opts.attribute_batch])} if opts.attribute else {}
    if opts.routing_replay:
        attribution["routing_replay"] = routing_replay(trainer, samples, train, rollout_lp)
    return {
        "init_std": init_std,
        "tokens": sum(len(s.response_ids) for s in samples),
        "mean_rollout_logprob": torch.cat(rollout_lp).mean().item(),
        "rollout_vs_trainer": gap(train, rollout_lp),
        "head_only": gap(train_again, head),
        "prefill_vs_trainer": gap(train, prefill),
        "decode_vs_prefill": gap(prefill, rollout_lp),
        "head_logits_vs_fp32": gap(head_fp32, head),
        "hidden_rel_err_prefill_vs_trainer": {"mean": rel_err.mean().item(), "max": rel_err.max().item()},
        "trainer_rerun_max_abs_diff": max((a - b).abs().max().item() for a, b in zip(train, train_again)),
    } | attribution


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="qwen3.6-35b-a3b")
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=200)
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--init-std", default="0.05", help="one value or a comma list (one results block each)")
    parser.add_argument("--mamba-ssm-dtype", default="float32")
    parser.add_argument(
        "--decode-parity",
        action="store_true",
        help="engine prefill and trainer compute the token mixers as decode does (--numerics decode_parity)",
    )
    parser.add_argument("--attribute", action="store_true", help="add the per-layer, per-sublayer attribution")
    parser.add_argument(
        "--routing-replay", action="store_true", help="also the gap and KL with the rollout's experts replayed (R3)"
    )
    parser.add_argument("--attribute-batch", type=int, default=8, help="sequences (the first ones) it runs on")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "logprob_agreement_gpu.json")
    opts = parser.parse_args()
    init_stds = [float(v) for v in opts.init_std.split(",")]
    args = with_num_layers(PRESETS[opts.preset], opts.num_layers).replace(mtp_num_layers=0)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, args.vocab_size, (opts.batch, opts.prompt_len), generator=gen).tolist()
    results = []
    for init_std in init_stds:
        results.append(measure(args, opts, init_std, prompts))
        print(json.dumps(results[-1]), flush=True)
        gc.collect()  # the model, engine (graphs, cache) and trainer of this value, before the next one's
        if opts.device == "cuda":
            torch.cuda.empty_cache()
    record = {
        "benchmark": "logprob_agreement_gpu",
        "device": torch.cuda.get_device_name() if opts.device == "cuda" else platform.processor() or "cpu",
        "versions": {"league": league.__version__, "torch": torch.__version__, "python": platform.python_version()},
        "settings": {k: v for k, v in vars(opts).items() if k != "out"} | {"init_std": init_stds, "temperature": 1.0},
        "results": results,
    }
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
