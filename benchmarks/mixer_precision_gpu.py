"""Where one layer's decode-vs-prefill error comes from, stage by stage, against an fp64 ground truth.

``logprob_agreement_gpu.py --attribute`` found that a token mixer's output differs between decode and the
whole-sequence forward by ~5e-3 (relative L2, bf16, exact inputs) and that the MoE adds nothing of its own. This
script splits that figure along the mixer. It builds the preset's model (``--preset``, two layers: one Gated
DeltaNet, one gated attention; random weights by ``common.random_model``, matrices widened to ``--init-std``), draws
``--batch`` sequences of ``--seq-len`` random hidden states, normalised by the layer's input norm as the mixer
receives them, and runs each mixer module three ways:

    prefill  the module over the whole sequences, packed, no cache (the trainer's and the engine's whole-sequence
             path: GEMMs over all rows, fla's chunked GDN, cuDNN conv, varlen flash attention on the GPU);
    decode   the engine's path: the first ``--prompt-len`` positions prefilled into cache slots, then one token per
             sequence a step over the cache, with ``common.teacher_forced_batches`` (as ``--attribute`` decodes:
             no CUDA graphs; GEMMs of ``--batch`` rows, the slot conv kernel, the Triton recurrent GDN kernel with
             fp32 states, the cache-reading attention kernel);
    fp64     the same stages by the repo's plain-torch reference ops in float64 (``naive_gated_delta_rule``,
             ``causal_attention``, ``rms_norm_reference``, ...) on the same bf16 inputs and weights.

The stages of the two module runs are not recomputed: while the module runs, each op it calls through ``model.py``
(``linear``, the conv, the GDN core, ``gated_rms_norm``, ``apply_rope``, the attention op, ``sigmoid``) is wrapped so
that its inputs and outputs are kept. The exception is ``q_l2norm``/``k_l2norm``, normalised inside the GDN core
kernels: recomputed as each core does it (fla's ``l2norm_fwd``, bf16 out, on the fla path; fp32 elsewhere).

Per stage, over the decode positions (``--prompt-len`` on): ``prefill_rel_err`` and ``decode_rel_err`` (the mean
over tokens of ``|x - x64| / |x64|``, L2 over each token's values), ``floor_rel_err`` (the fp64 value rounded once
to the prefill's dtype: what any path that stores the stage in that dtype must lose), ``decode_vs_prefill_rel_err``
and ``differ_fraction`` (the share of elements in which the two paths differ at all).

With ``--decode-parity`` the prefill run is the trainer's under decode parity (the GDN recurrence and attention by
the decode kernels over whole sequences, ``league.ops.gdn.parity`` and ``varlen_causal_attention_as_decode``): its
stages should then equal decode's bitwise, and a stage that does not is where the two still part; the core and
attention experiments (which read the ordinary prefill ops) are skipped.

Experiments on shared inputs, each against the fp64 op on the very same inputs, over the decode positions (the
lines ``*_as_prefill`` are the prefill path's own outputs: the error that op adds alone): ``core`` runs the GDN
recurrence on the prefill's bf16 q, k, v, g, beta: fla's chunk kernels in bf16 (the prefill path) and on fp32 copies
(fla then uses tf32 dots; ``--no-fla-fp32`` skips it, saving a second autotuning of fla's kernels), the Triton
recurrent kernel over whole sequences (the decode kernel's arithmetic), the torch chunk and recurrent references in
fp32; ``attention`` runs the prefill's q, k, v by flash varlen (the prefill path), by the decode attention kernel
over whole sequences (its chunked-prefill form, each query row computed as in decode; bf16 and fp32), by SDPA in fp32
and by the torch reference in fp32; ``gemm`` runs each projection on its prefill inputs at all rows at once (the
prefill path) and ``--batch`` rows at a time (as decode), by cuBLAS and by decode parity's fixed-tiles GEMM.
Kernels that are not available (no CUDA, no fla) are skipped. Each line gives ``rel_err`` (and
``rel_err_rounded`` for an fp32 output rounded to the path's dtype) and ``differ_fraction_vs_path``.

Writes ``benchmarks/results/mixer_precision_gpu.json`` (rewritten after each layer, with ``seconds`` per layer).

    python benchmarks/mixer_precision_gpu.py [--batch 8] [--seq-len 512] [--prompt-len 128] [--init-std 0.02]
        [--no-fla-fp32] [--decode-parity]
    python benchmarks/mixer_precision_gpu.py --device cpu
        (a smoke test of the script: tiny preset, 2 x 48 tokens, torch reference ops only)
"""

import argparse
import contextlib
import json
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from common import random_model, rel_err, teacher_forced_batches, versions, widen
from speculative_gpu import device_name

from league.engine.cache import allocate_cache
from league.models.qwen3_5_moe import ForwardBatch, Transformer
from league.models.qwen3_5_moe import batch as batch_py
from league.models.qwen3_5_moe import gated_deltanet as gdn_py
from league.models.qwen3_5_moe import model as model_py
from league.models.qwen3_5_moe.presets import PRESETS
from league.ops import gdn as gdn_ops
from league.ops.attention import (
    cached_attention,
    causal_attention,
    varlen_causal_attention,
    varlen_causal_attention_reference,
)
from league.ops.backends import installed
from league.ops.conv import causal_conv1d_batched
from league.ops.gdn import chunk as gdn_chunk
from league.ops.gdn import recurrent as gdn_recurrent
from league.ops.gdn.gates import gdn_gates
from league.ops.gdn.naive import l2norm, naive_gated_delta_rule
from league.ops.linear import fixed_tiles_fit, linear
from league.ops.norm import gated_rms_norm, rms_norm_reference
from league.ops.numerics import BATCH_INVARIANT, DECODE_PARITY, FAST
from league.ops.rope import apply_rope

START = time.perf_counter()
# unset flags, on the GPU and (True) on the CPU smoke run
DEFAULTS = {
    False: {"preset": "qwen3.6-35b-a3b", "batch": 8, "seq_len": 512, "prompt_len": 128},
    True: {"preset": "tiny", "batch": 2, "seq_len": 48, "prompt_len": 16},
}

# GDN core ops of model.py, and how their tensors lay out tokens: "packed" [N*T, ...], "batched" [N, T, ...]
CORE_LAYOUTS = {
    "chunk_gated_delta_rule_varlen": "packed",
    "chunk_gated_delta_rule_padded": "batched",
    "recurrent_gated_delta_rule": "batched",
    "recurrent_gated_delta_rule_slots": "batched",
    "gated_delta_rule_as_decode": "batched",
}
RECORDED = (
    "linear",
    "linear_joined",  # recorded as one "linear" call per weight
    "sigmoid",
    "causal_conv1d_batched",
    "causal_conv1d_slots",
    *CORE_LAYOUTS,
    "gated_rms_norm",
    "apply_rope",
    "varlen_causal_attention",
    "varlen_causal_attention_as_decode",
    "cached_attention",
)
# the GDN input projections (module attribute -> stage)
GDN_PROJECTIONS = {"w_qkv": "qkv_proj", "w_z": "z_proj", "w_b": "b_proj", "w_a": "a_proj"}
LINEAR_STAGES = GDN_PROJECTIONS | {
    "wq": "q_gate_proj",
    "wk": "k_proj",
    "wv": "v_proj",
    "wo": "out_proj",
}
GDN_STAGES = (
    "qkv_proj",
    "z_proj",
    "b_proj",
    "a_proj",
    "conv",
    "q_l2norm",
    "k_l2norm",
    "g",
    "beta",
    "core",
    "gated_norm",
    "out_proj",
)
ATTENTION_STAGES = (
    "q_proj",
    "gate_proj",
    "k_proj",
    "v_proj",
    "q_norm_rope",
    "k_norm_rope",
    "attention",
    "gate_sigmoid",
    "gated_out",
    "out_proj",
)


@contextlib.contextmanager
def recording(calls: dict[str, list]):
    """While open, each op of ``RECORDED`` that ``model.py`` or ``batch.py`` calls appends ``(args, output)`` to
    ``calls[op]`` (a group of joined projections one ``((x, weight), output)`` per weight to ``calls["linear"]``)."""

    def wrap(name, fn):
        def recorded(*args, **kwargs):
            out = fn(*args, **kwargs)
            if name == "linear_joined":
                calls["linear"].extend(((args[0], w), o) for w, o in zip(args[1], out))
            else:
                calls[name].append((args, out))
            return out

        return recorded

    # the model's ops, and the projections that its ForwardBatch runs
    modules = [(module, name) for module in (model_py, gdn_py, batch_py) for name in RECORDED if hasattr(module, name)]
    originals = {(module, name): getattr(module, name) for module, name in modules}
    try:
        for (module, name), fn in originals.items():
            setattr(module, name, wrap(name, fn))
        yield calls
    finally:
        for (module, name), fn in originals.items():
            setattr(module, name, fn)


def run_mixer(model: Transformer, layer: int, x_TD: torch.Tensor, batch: ForwardBatch, cache) -> torch.Tensor:
    """Layer ``layer``'s token mixer on already-normalised inputs, as ``DecoderLayer.forward`` calls it."""
    block = model.layers[layer]
    if block.layer_type == "full_attention":
        return block.attn(x_TD, batch, model.rope(batch.positions), cache)
    return block.gdn(x_TD, batch, cache)


@torch.no_grad()
def prefill_calls(model: Transformer, layer: int, x_NTD: torch.Tensor, decode_parity: bool = False) -> dict[str, list]:
    """The op calls of the mixer over the whole sequences, packed, without a cache (with ``decode_parity``, as
    the trainer runs it then)."""
    num_seqs, seq_len, dim = x_NTD.shape
    numerics = DECODE_PARITY if decode_parity else FAST
    batch = ForwardBatch.packed([seq_len] * num_seqs, device=x_NTD.device, numerics=numerics)
    with recording(defaultdict(list)) as calls:
        run_mixer(model, layer, x_NTD.reshape(-1, dim), batch, None)
    return calls


@torch.no_grad()
def decode_calls(
    model: Transformer, layer: int, x_NTD: torch.Tensor, prompt_len: int, decode_parity: bool = False
) -> dict[str, list]:
    """The op calls of the mixer's decode steps (positions ``prompt_len`` on), after a prefill of the prompts into
    fresh cache slots (the engine's cache, fp32 GDN states); with ``decode_parity`` as the engine runs then."""
    num_seqs, seq_len, dim = x_NTD.shape
    cache = allocate_cache(model.args, num_seqs, seq_len, x_NTD.dtype, x_NTD.device).layers[layer]
    numerics = DECODE_PARITY if decode_parity else FAST
    prefill, steps = teacher_forced_batches(num_seqs, prompt_len, seq_len, x_NTD.device, numerics)
    run_mixer(model, layer, x_NTD[:, :prompt_len].reshape(-1, dim), prefill, cache)
    with recording(defaultdict(list)) as calls:
        for p, batch in steps:
            run_mixer(model, layer, x_NTD[:, p].contiguous(), batch, cache)
    return calls


def tokens(x: torch.Tensor, num_seqs: int, layout: str = "packed") -> torch.Tensor:
    """``x`` as ``[N, T, ...]`` from its op's layout (see ``CORE_LAYOUTS``)."""
    if layout == "batched":
        return x
    return x.reshape(num_seqs, -1, *x.shape[1:])


def uses_fla(op: str, q: torch.Tensor) -> bool:
    """Whether ``league.ops.gdn`` ran the core ``op`` on fla's kernels (which normalise q and k into q's dtype)."""
    return op.startswith("chunk") and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and installed("fla")


def core_l2norm(x: torch.Tensor, fla: bool) -> torch.Tensor:
    """q or k L2-normalised as the core that read it does: fla's ``l2norm_fwd`` (output in x's dtype), or fp32."""
    if fla:
        from fla.modules.norm.l2norm import l2norm_fwd

        return l2norm_fwd(x.contiguous())[0]
    return l2norm(x.float())


def linear_stages(calls: dict[str, list], mixer: torch.nn.Module, num_seqs: int, stages: dict) -> None:
    """Append each projection's output to ``stages`` (``q_gate_proj`` split into ``q_proj`` and ``gate_proj``,
    and ``wo``'s input as ``gated_out``)."""
    names = {id(p): name.split(".")[0] for name, p in mixer.named_parameters()}
    for args, out in calls["linear"]:
        stage, y = LINEAR_STAGES[names[id(args[1])]], tokens(out, num_seqs)
        if stage == "q_gate_proj":
            q, gate = y.reshape(*y.shape[:2], mixer.num_heads, 2 * mixer.head_dim).chunk(2, dim=-1)
            stages["q_proj"].append(q)
            stages["gate_proj"].append(gate)
            continue
        if stage == "out_proj":
            stages["gated_out"].append(tokens(args[0], num_seqs))
        stages[stage].append(y)


def gdn_stages(calls: dict[str, list], gdn: torch.nn.Module, num_seqs: int) -> dict[str, torch.Tensor]:
    """The GDN mixer's stages ``[N, T, ...]`` from the op calls of one or more forwards (concatenated along T)."""
    stages = defaultdict(list)
    linear_stages(calls, gdn, num_seqs, stages)
    stages["conv"] = [out[0] for _, out in calls["causal_conv1d_batched"]]
    stages["conv"] += [out for _, out in calls["causal_conv1d_slots"]]
    for op, layout in CORE_LAYOUTS.items():
        for args, out in calls[op]:
            fla = uses_fla(op, args[0])
            stages["q_l2norm"].append(tokens(core_l2norm(args[0], fla), num_seqs, layout))
            stages["k_l2norm"].append(tokens(core_l2norm(args[1], fla), num_seqs, layout))
            g, beta = args[3], args[4]
            if op == "gated_delta_rule_as_decode":  # made of the projections, by the kernel
                g, beta = gdn_gates(g, beta, args[5], args[6])
            elif len(args) > 10 and args[10] is not None:  # the decode kernel made the gates of the projections
                g, beta = gdn_gates(g, beta, *args[10])
            stages["g"].append(tokens(g, num_seqs, layout))
            stages["beta"].append(tokens(beta, num_seqs, layout))
            stages["core"].append(tokens(out if op.endswith("slots") else out[0], num_seqs, layout))
    stages["gated_norm"] = [tokens(out, num_seqs) for _, out in calls["gated_rms_norm"]]
    return {name: torch.cat(stages[name], dim=1) for name in GDN_STAGES}


def attention_stages(calls: dict[str, list], attn: torch.nn.Module, num_seqs: int) -> dict[str, torch.Tensor]:
    """The attention mixer's stages ``[N, T, ...]`` from the op calls of one or more forwards."""
    stages = defaultdict(list)
    linear_stages(calls, attn, num_seqs, stages)
    ropes = [tokens(out, num_seqs) for _, out in calls["apply_rope"]]  # q then k, forward by forward
    stages["q_norm_rope"], stages["k_norm_rope"] = ropes[0::2], ropes[1::2]
    for op in ("varlen_causal_attention", "varlen_causal_attention_as_decode", "cached_attention"):
        stages["attention"] += [tokens(out, num_seqs) for _, out in calls[op]]
    stages["gate_sigmoid"] = [tokens(out, num_seqs) for _, out in calls["sigmoid"]]
    return {name: torch.cat(stages[name], dim=1) for name in ATTENTION_STAGES}


def gdn_core_reference(q, k, v, g, beta) -> torch.Tensor:
    """``naive_gated_delta_rule`` in fp64, sequence by sequence, on ``[N, T, ...]`` inputs (cast exactly)."""
    f64 = torch.float64
    return torch.stack(
        [naive_gated_delta_rule(*(x[n].to(f64) for x in (q, k, v, g, beta)))[0] for n in range(q.shape[0])]
    )


@torch.no_grad()
def gdn_reference(gdn: torch.nn.Module, x_NTD: torch.Tensor) -> dict[str, torch.Tensor]:
    """The GDN mixer's stages in fp64 from the bf16 inputs and weights, by the plain-torch reference ops."""
    f64 = torch.float64
    x = x_NTD.to(f64)
    proj = {stage: linear(x, getattr(gdn, name).weight.to(f64)) for name, stage in GDN_PROJECTIONS.items()}
    window = x.new_zeros(x.shape[0], gdn.conv_weight.shape[0], gdn.conv_weight.shape[1] - 1)
    conv, _ = causal_conv1d_batched(proj["qkv_proj"], gdn.conv_weight.to(f64), window, BATCH_INVARIANT)
    q, k, v = gdn._split(conv)
    beta = torch.sigmoid(proj["b_proj"])
    g = -gdn.A_log.to(f64).exp() * F.softplus(proj["a_proj"] + gdn.dt_bias.to(f64))
    core = gdn_core_reference(q, k, v, g, beta)
    z = proj["z_proj"].view(*core.shape)
    normed = gated_rms_norm(core, z, gdn.norm_weight.to(f64), gdn.norm_eps)
    out = linear(normed.flatten(2), gdn.wo.weight.to(f64))
    stages = proj | {"conv": conv, "q_l2norm": l2norm(q), "k_l2norm": l2norm(k), "g": g, "beta": beta}
    return stages | {"core": core, "gated_norm": normed, "out_proj": out}


@torch.no_grad()
def attention_reference(attn: torch.nn.Module, x_NTD: torch.Tensor, inv_freq: torch.Tensor) -> dict:
    """The attention mixer's stages in fp64 from the bf16 inputs and weights (fp64 rotary tables)."""
    f64 = torch.float64
    num_seqs, seq_len, _ = x_NTD.shape
    heads, kv_heads, head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
    x = x_NTD.to(f64)
    q, gate = linear(x, attn.wq.weight.to(f64)).view(num_seqs, seq_len, heads, 2 * head_dim).chunk(2, dim=-1)
    k = linear(x, attn.wk.weight.to(f64)).view(num_seqs, seq_len, kv_heads, head_dim)
    v = linear(x, attn.wv.weight.to(f64)).view(num_seqs, seq_len, kv_heads, head_dim)
    freqs = torch.arange(seq_len, device=x.device, dtype=f64)[:, None] * inv_freq.to(f64)[None, :]
    cos, sin = torch.cat([freqs, freqs], dim=-1).cos(), torch.cat([freqs, freqs], dim=-1).sin()
    q_rope = apply_rope(rms_norm_reference(q, attn.q_norm.weight, attn.q_norm.eps), cos, sin)
    k_rope = apply_rope(rms_norm_reference(k, attn.k_norm.weight, attn.k_norm.eps), cos, sin)
    out = torch.stack([causal_attention(q_rope[n], k_rope[n], v[n], head_dim**-0.5) for n in range(num_seqs)])
    gate_sigmoid = torch.sigmoid(gate.flatten(2))
    gated = out.flatten(2) * gate_sigmoid
    return {
        "q_proj": q,
        "gate_proj": gate,
        "k_proj": k,
        "v_proj": v,
        "q_norm_rope": q_rope,
        "k_norm_rope": k_rope,
        "attention": out,
        "gate_sigmoid": gate_sigmoid,
        "gated_out": gated,
        "out_proj": linear(gated, attn.wo.weight.to(f64)),
    }


def err(a: torch.Tensor, b: torch.Tensor) -> float:
    """:func:`common.rel_err` of ``a`` against ``b``, in fp64."""
    return rel_err(a, b, torch.float64)


def differ_fraction(a: torch.Tensor, b: torch.Tensor) -> float:
    """The share of elements in which ``a`` and ``b`` differ at all (compared in fp32)."""
    return (a.float() != b.float()).float().mean().item()


def stage_table(prefill: dict, decode: dict, reference: dict, names: tuple, start: int) -> list[dict]:
    """One entry per stage over positions ``start`` on: those of ``decode``, the others' from ``start``."""
    table = []
    for name in names:
        a, ref = (s[:, start:].flatten(2) for s in (prefill[name], reference[name]))
        b = decode[name].flatten(2)
        table.append(
            {
                "stage": name,
                "prefill_dtype": str(a.dtype).removeprefix("torch."),
                "decode_dtype": str(b.dtype).removeprefix("torch."),
                "floor_rel_err": err(ref.to(a.dtype), ref),
                "prefill_rel_err": err(a, ref),
                "decode_rel_err": err(b, ref),
                "decode_vs_prefill_rel_err": err(b, a),
                "differ_fraction": differ_fraction(a, b),
            }
        )
    return table


def against(name: str, out: torch.Tensor, ref: torch.Tensor, same_as: torch.Tensor, start: int, **info) -> dict:
    """One experiment line: ``out``'s error against ``ref`` (and, for an fp32 ``out``, after rounding it to
    ``same_as``'s dtype), and its share of elements differing from ``same_as`` (the path's own output), over
    positions ``start`` on."""
    out, ref, same_as = (x[:, start:].flatten(2) for x in (out, ref, same_as))
    line = {"name": name, **info, "dtype": str(out.dtype).removeprefix("torch."), "rel_err": err(out, ref)}
    if out.dtype != same_as.dtype:
        line["rel_err_rounded"] = err(out.to(same_as.dtype), ref)
    return line | {"differ_fraction_vs_path": differ_fraction(out.to(same_as.dtype), same_as)}


@torch.no_grad()
def core_experiments(calls: dict[str, list], num_seqs: int, start: int, fla_fp32: bool = True) -> list[dict]:
    """The GDN recurrence on the prefill path's own inputs, by each available kernel, against fp64 on them
    (``fla_fp32``: also fla on fp32 copies, which autotunes and compiles fla's kernels a second time)."""
    op = next(op for op in CORE_LAYOUTS if calls[op])
    layout, (args, out) = CORE_LAYOUTS[op], calls[op][0]
    q, k, v, g, beta = (tokens(x, num_seqs, layout) for x in args[:5])
    path = tokens(out[0], num_seqs, layout)
    ref = gdn_core_reference(q, k, v, g, beta)
    states = q.new_zeros(num_seqs, v.shape[2], q.shape[-1], v.shape[-1], dtype=torch.float32)
    seq_len = q.shape[1]
    cu = torch.arange(num_seqs + 1, device=q.device) * seq_len

    def packed(x):
        return x.flatten(0, 1)

    lines = [against(f"{op}_as_prefill", path, ref, path, start, backend="fla" if uses_fla(op, q) else "torch")]
    if fla_fp32 and q.is_cuda and installed("fla"):
        from league.ops.gdn.fast import chunk_gated_delta_rule_fla

        f32 = (x.float() for x in (q, k, v, g, beta))
        o, _ = chunk_gated_delta_rule_fla(*(packed(x)[None] for x in f32), states, cu_seqlens=cu)
        lines.append(against("fla_chunk_fp32_inputs", o[0].view_as(path), ref, path, start, backend="fla tf32"))
    if q.is_cuda and installed("triton"):
        o, _ = gdn_ops.recurrent_gated_delta_rule(q, k, v, g, beta, states)
        lines.append(against("triton_recurrent_whole_sequence", o, ref, path, start, backend="triton"))
    f32 = [x.float() for x in (q, k, v, g, beta)]
    o, _ = gdn_chunk.chunk_gated_delta_rule_varlen(*(packed(x) for x in f32), cu, states)
    lines.append(against("torch_chunk_fp32", o.view_as(path), ref, path, start, backend="torch"))
    o, _ = gdn_recurrent.recurrent_gated_delta_rule(*f32, states)
    lines.append(against("torch_recurrent_fp32", o, ref, path, start, backend="torch"))
    return lines


@torch.no_grad()
def attention_experiments(calls: dict[str, list], num_seqs: int, start: int) -> list[dict]:
    """Causal attention on the prefill path's own q, k, v, by each available kernel, against fp64 on them."""
    args, out = calls["varlen_causal_attention"][0]
    q_THK, k_TGK, v_TGK, cu, max_len, scale = args[:6]
    path = tokens(out, num_seqs)
    q, k, v = (tokens(x, num_seqs) for x in (q_THK, k_TGK, v_TGK))
    ref = torch.stack([causal_attention(*(x[n].double() for x in (q, k, v)), scale) for n in range(num_seqs)])
    backend = "flash" if q.is_cuda else "torch"
    lines = [against("varlen_causal_attention_as_prefill", path, ref, path, start, backend=backend)]
    slots, kv_lens = torch.arange(num_seqs, device=q.device), torch.full((num_seqs,), max_len, device=q.device)
    dtypes = (q.dtype, torch.float32) if q.is_cuda and installed("triton") else ()
    for dtype in dtypes:  # the decode kernel, every query of a sequence in one call (chunked-prefill form)
        o = cached_attention(q_THK.to(dtype), k.to(dtype), v.to(dtype), cu, slots, kv_lens, scale, max_len, max_len)
        name = f"triton_cached_attention_whole_sequence_{str(dtype).removeprefix('torch.')}"
        lines.append(against(name, tokens(o, num_seqs), ref, path, start, backend="triton"))
    f32 = [x.float() for x in (q_THK, k_TGK, v_TGK)]
    if q.is_cuda:  # SDPA's fused fp32 kernel, one call per sequence
        o = varlen_causal_attention(*f32, cu, max_len, scale)
        lines.append(against("varlen_causal_attention_fp32", tokens(o, num_seqs), ref, path, start, backend="sdpa"))
    o = varlen_causal_attention_reference(*f32, cu, max_len, scale)
    lines.append(against("torch_reference_fp32", tokens(o, num_seqs), ref, path, start, backend="torch"))
    return lines


@torch.no_grad()
def gemm_experiments(calls: dict[str, list], mixer: torch.nn.Module, num_seqs: int, start: int) -> list[dict]:
    """Each projection of the prefill path on its own inputs, at all rows at once (the path's own output) and at
    ``num_seqs`` rows a step (one row per sequence, as decode), against fp64: by cuBLAS (``F.linear``) and, where
    it runs, by the fixed-tiles GEMM of decode parity."""
    names = {id(p): name.split(".")[0] for name, p in mixer.named_parameters()}
    lines = []
    for args, out in calls["linear"]:
        x_TK, weight = args[:2]
        x = tokens(x_TK, num_seqs)
        path, ref = tokens(out, num_seqs), linear(x.double(), weight.double())
        stage = LINEAR_STAGES[names[id(weight)]]
        lines.append(against(f"{stage}_all_rows_as_prefill", path, ref, path, start, rows=x_TK.shape[0]))
        forms = {"": {}} | ({"fixed_tiles_": {"numerics": DECODE_PARITY}} if fixed_tiles_fit(x_TK, weight) else {})
        for form, kw in forms.items():
            if form:
                whole = linear(x_TK, weight, **kw)
                lines.append(against(f"{stage}_{form}all_rows", tokens(whole, num_seqs), ref, path, start))
            steps = torch.stack([linear(x[:, p].contiguous(), weight, **kw) for p in range(x.shape[1])], dim=1)
            lines.append(against(f"{stage}_{form}{num_seqs}_rows_a_step", steps, ref, path, start, rows=num_seqs))
    return lines


@torch.no_grad()
def measure(
    model: Transformer, layer: int, x_NTD: torch.Tensor, prompt_len: int, fla_fp32: bool, decode_parity: bool = False
) -> dict:
    """The stage table and the experiments of one layer's mixer."""
    block, num_seqs = model.layers[layer], x_NTD.shape[0]
    x_NTD = block.attn_norm(x_NTD.flatten(0, 1)).view_as(x_NTD)
    begin = time.perf_counter()
    prefill = prefill_calls(model, layer, x_NTD, decode_parity)
    decode = decode_calls(model, layer, x_NTD, prompt_len, decode_parity)
    if block.layer_type == "full_attention":
        stages = {"prefill": attention_stages(prefill, block.attn, num_seqs)}
        stages["decode"] = attention_stages(decode, block.attn, num_seqs)
        stages["fp64"] = attention_reference(block.attn, x_NTD, model.inv_freq)
        names, mixer = ATTENTION_STAGES, block.attn
        experiments = {} if decode_parity else {"attention": attention_experiments(prefill, num_seqs, prompt_len)}
    else:
        stages = {"prefill": gdn_stages(prefill, block.gdn, num_seqs)}
        stages["decode"] = gdn_stages(decode, block.gdn, num_seqs)
        stages["fp64"] = gdn_reference(block.gdn, x_NTD)
        names, mixer = GDN_STAGES, block.gdn
        experiments = {} if decode_parity else {"core": core_experiments(prefill, num_seqs, prompt_len, fla_fp32)}
    experiments["gemm"] = gemm_experiments(prefill, mixer, num_seqs, prompt_len)
    return {
        "layer": layer,
        "type": block.layer_type,
        "stages": stage_table(stages["prefill"], stages["decode"], stages["fp64"], names, prompt_len),
        "experiments": experiments,
        "seconds": time.perf_counter() - begin,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", help="default: qwen3.6-35b-a3b on cuda, tiny on cpu")
    parser.add_argument("--batch", type=int, help="sequences, decoded a row each per step (default: 8; 2 on cpu)")
    parser.add_argument("--seq-len", type=int, help="default: 512; 48 on cpu")
    parser.add_argument("--prompt-len", type=int, help="positions prefilled before decode (default: 128; 16 on cpu)")
    parser.add_argument("--init-std", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fla-fp32", action=argparse.BooleanOptionalAction, default=True, help="fla on fp32 inputs")
    parser.add_argument(
        "--decode-parity", action="store_true", help="the whole-sequence path computes as decode (the trainer's then)"
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "mixer_precision_gpu.json")
    opts = parser.parse_args()
    for name, value in DEFAULTS[opts.device == "cpu"].items():
        if getattr(opts, name) is None:
            setattr(opts, name, value)
    if not 1 <= opts.prompt_len < opts.seq_len:
        raise ValueError(f"`--prompt-len` ({opts.prompt_len}) must be in [1, --seq-len ({opts.seq_len}))")
    dtype = getattr(torch, opts.dtype)
    layer_types = ["linear_attention", "full_attention"]
    args = PRESETS[opts.preset].replace(num_layers=2, layer_types=layer_types, mtp_num_layers=0)
    model = random_model(args, opts.device, dtype, opts.seed).eval()
    widen(model, opts.init_std)
    gen = torch.Generator().manual_seed(opts.seed)
    x_NTD = torch.randn(opts.batch, opts.seq_len, args.dim, generator=gen).to(opts.device, dtype)
    record = {
        "benchmark": "mixer_precision_gpu",
        "device": device_name(opts.device),
        "versions": versions(),
        "settings": {k: v for k, v in vars(opts).items() if k != "out"},
        "results": [],
    }
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    for layer in range(len(layer_types)):  # the file is rewritten after each layer
        record["results"].append(measure(model, layer, x_NTD, opts.prompt_len, opts.fla_fp32, opts.decode_parity))
        record["seconds_after_imports"] = time.perf_counter() - START
        print(json.dumps(record["results"][-1]), flush=True)
        opts.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
