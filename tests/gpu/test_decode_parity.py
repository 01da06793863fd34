"""Decode parity on the GPU in bf16: an engine whose prefill computes as decode does, decoding through CUDA graphs,
against a trainer-style whole-sequence forward with ``decode_parity`` (skipped without CUDA). Without parity the
same comparison shows the ordinary gap (flash attention and fla's chunked GDN against the decode kernels).

Run on the GPU machine with ``python -m pytest tests/gpu/test_decode_parity.py -q -s`` (``-s`` prints the gaps).
"""

import pytest
import torch

from league.engine.engine import EngineConfig, LLMEngine
from league.engine.request import SamplingParams
from league.models.qwen3_5_moe import ForwardBatch, Transformer
from league.models.qwen3_5_moe.presets import PRESETS
from league.ops.logprob import token_logprobs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def gap(parity: bool) -> tuple[float, float]:
    """(mean |trainer - rollout| over sampled tokens, fraction of tokens whose log-probs are bitwise equal)."""
    model = Transformer(PRESETS["tiny"])
    model.init_weights(seed=3, std=0.2)
    model = model.cuda().to(torch.bfloat16).eval()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, model.args.vocab_size, (n,), generator=gen).tolist() for n in (40, 7, 90, 23)]
    engine = LLMEngine(model, EngineConfig(max_running_requests=4, context_length=160, decode_parity=parity))
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=48, temperature=1.0, ignore_eos=True, seed=2))
    assert engine.graphs is not None  # decode ran captured
    seqs = [p + o.output_ids for p, o in zip(prompts, outs)]
    with torch.no_grad():
        batch = ForwardBatch.packed([len(s) for s in seqs], device="cuda", decode_parity=parity)
        hidden = model(torch.tensor([t for s in seqs for t in s], device="cuda"), batch)
    diffs, start = [], 0
    for prompt, seq, out in zip(prompts, seqs, outs):
        rows = hidden[start + len(prompt) - 1 : start + len(seq) - 1]
        scored = token_logprobs(model.logits(rows), torch.tensor(out.output_ids, device="cuda"))
        diffs.append((scored.cpu() - torch.tensor(out.output_logprobs)).abs())
        start += len(seq)
    diff = torch.cat(diffs)
    return diff.mean().item(), (diff == 0).float().mean().item()


def test_decode_parity_closes_the_train_rollout_gap():
    ordinary, parity = gap(False), gap(True)
    print(
        f"mean |trainer - rollout|: ordinary {ordinary[0]:.2e} ({ordinary[1]:.0%} equal), "
        f"decode parity {parity[0]:.2e} ({parity[1]:.0%} equal)"
    )
    assert parity[0] <= 1e-3 and parity[0] <= ordinary[0]
