"""Decode parity on the GPU in bf16: an engine whose prefill computes as decode does, decoding through CUDA graphs,
against a trainer-style whole-sequence forward with decode parity (skipped without CUDA), on the tiny preset
and on two full-width layers of Qwen3.6-35B-A3B (where cuBLAS splits the out-projections' K at few rows). Without
parity the same comparison shows the ordinary gap (flash attention, fla's chunked GDN and cuBLAS against the decode
kernels). Also the fixed-tiles GEMM at the full-width projection shapes: each row bitwise the same at any row count;
and the engine's joined projections (one GEMM per group) bitwise the trainer's one-by-one GEMMs under parity.

Run on the GPU machine with ``python -m pytest tests/gpu/test_decode_parity.py -q -s`` (``-s`` prints the gaps).
"""

import pytest
import torch

from league.engine.config import EngineConfig
from league.engine.engine import LLMEngine
from league.engine.request import SamplingParams
from league.models.qwen3_5_moe import ForwardBatch, Transformer
from league.models.qwen3_5_moe.presets import PRESETS
from league.ops.linear import linear
from league.ops.logprob import token_logprobs
from league.ops.numerics import DECODE_PARITY, FAST
from league.ops.rope import rope_inv_freq

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def tiny_model() -> Transformer:
    model = Transformer(PRESETS["tiny"])
    model.init_weights(seed=3, std=0.2)
    return model.cuda().to(torch.bfloat16).eval()


def full_width_model() -> Transformer:
    """Two layers (Gated DeltaNet, gated attention) of the 35B-A3B preset with ``league init``'s weights, made on
    the GPU (no fp32 copy of the model on the host)."""
    args = PRESETS["qwen3.6-35b-a3b"].replace(
        num_layers=2, layer_types=["linear_attention", "full_attention"], mtp_num_layers=0
    )
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to_empty(device="cuda").to(torch.bfloat16)
    model.init_weights(seed=0)
    model.inv_freq = rope_inv_freq(args.rotary_dim, args.rope_theta).cuda()
    return model.eval()


def gap(model: Transformer, parity: bool) -> tuple[float, float]:
    """(mean |trainer - rollout| over sampled tokens, fraction of tokens whose log-probs are bitwise equal)."""
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, model.args.vocab_size, (n,), generator=gen).tolist() for n in (40, 7, 90, 23)]
    engine = LLMEngine(
        model, EngineConfig(max_running_requests=4, context_length=160, numerics="decode_parity" if parity else "fast")
    )
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=48, temperature=1.0, ignore_eos=True, seed=2))
    assert engine.runner.graphs is not None  # decode ran captured
    seqs = [p + o.output_ids for p, o in zip(prompts, outs)]
    with torch.no_grad():
        batch = ForwardBatch.packed([len(s) for s in seqs], device="cuda", numerics=DECODE_PARITY if parity else FAST)
        hidden = model(torch.tensor([t for s in seqs for t in s], device="cuda"), batch)
    diffs, start = [], 0
    for prompt, seq, out in zip(prompts, seqs, outs):
        rows = hidden[start + len(prompt) - 1 : start + len(seq) - 1]
        scored = token_logprobs(model.logits(rows), torch.tensor(out.output_ids, device="cuda"))
        diffs.append((scored.cpu() - torch.tensor(out.output_logprobs)).abs())
        start += len(seq)
    diff = torch.cat(diffs)
    return diff.mean().item(), (diff == 0).float().mean().item()


@pytest.mark.parametrize("make_model", [tiny_model, full_width_model], ids=["tiny", "full_width_2_layers"])
def test_decode_parity_closes_the_train_rollout_gap(make_model):
    model = make_model()
    ordinary, parity = gap(model, False), gap(model, True)
    print(
        f"mean |trainer - rollout|: ordinary {ordinary[0]:.2e} ({ordinary[1]:.0%} equal), "
        f"decode parity {parity[0]:.2e} ({parity[1]:.0%} equal)"
    )
    assert parity[0] <= 1e-3 and parity[0] <= ordinary[0]


# (N, K) of the full-width projections: GDN qkv / z / a and out, attention q+gate / k and out, router, shared
# expert gate-up and down, its gate
FULL_WIDTH_WEIGHTS = [(8192, 2048), (4096, 2048), (32, 2048), (2048, 4096), (8192, 2048), (512, 2048)]
FULL_WIDTH_WEIGHTS += [(2048, 4096), (256, 2048), (512, 2048), (2048, 512), (1, 2048)]


@pytest.mark.parametrize("shape", sorted(set(FULL_WIDTH_WEIGHTS)))
def test_fixed_tiles_rows_are_bitwise_the_same_at_any_row_count(shape):
    gen = torch.Generator(device="cuda").manual_seed(0)
    cols, dim = shape
    w = torch.randn(cols, dim, generator=gen, device="cuda").mul_(0.02).to(torch.bfloat16)
    x = torch.randn(4096, dim, generator=gen, device="cuda").to(torch.bfloat16)
    whole = linear(x, w, DECODE_PARITY)
    torch.testing.assert_close(whole.float(), x.float() @ w.float().t(), rtol=1.6e-2, atol=2e-3)
    for rows in (1, 8, 64, 256, 711):
        assert torch.equal(linear(x[:rows], w, DECODE_PARITY), whole[:rows]), rows
    assert torch.equal(linear(x[3000:3001], w, DECODE_PARITY), whole[3000:3001])


def test_joined_projections_give_the_same_bits_under_parity():
    """The engine joins each group of projections of one input into one GEMM (``Transformer.join_projections``);
    the trainer, with gradients, runs them one by one. Under parity the fixed-tiles GEMM's columns do not depend on
    the other columns, so both give the same bits; without parity cuBLAS may round the joined GEMM differently."""
    model = full_width_model()
    gen = torch.Generator().manual_seed(3)
    lens = [40, 7, 90]
    tokens = torch.randint(0, model.args.vocab_size, (sum(lens),), generator=gen).cuda()
    outs = {}
    for joined in (False, True):
        if joined:
            model.join_projections()
        for parity in (False, True):
            batch = ForwardBatch.packed(lens, device="cuda", numerics=DECODE_PARITY if parity else FAST)
            with torch.no_grad():
                outs[joined, parity] = model(tokens, batch)
    assert torch.equal(outs[True, True], outs[False, True])
    plain, joined = outs[False, False].float(), outs[True, False].float()
    # bf16 roundings apart (a token whose router logits round differently may take another expert: up to ~5%)
    assert ((joined - plain).norm(dim=-1) / plain.norm(dim=-1)).mean() < 1e-2
