"""The reference ops and the engine on a CUDA device, against the CPU fp32 results (skipped without CUDA).

Run on the GPU machine with ``python -m pytest tests/gpu -q``.
"""

import pytest
import torch

from league.engine.config import EngineConfig
from league.engine.engine import LLMEngine
from league.engine.request import SamplingParams
from league.models.qwen3_5_moe import ForwardBatch
from tests.models.test_forms import tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def prompts_of(lengths, vocab):
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


def test_forward_on_cuda_matches_cpu_fp32():
    cpu = tiny_model("gqa4_interval4").float()
    gpu = tiny_model("gqa4_interval4").float().cuda()
    seqs = prompts_of([150, 40, 77], cpu.args.vocab_size)
    tokens = torch.tensor([t for s in seqs for t in s])
    with torch.no_grad():
        ref = cpu.logits(cpu(tokens, ForwardBatch.packed([150, 40, 77])))
        out = gpu.logits(gpu(tokens.cuda(), ForwardBatch.packed([150, 40, 77], device="cuda")))
    assert (out.cpu() - ref).abs().max().item() < 1e-4


def test_bf16_forward_is_close_to_fp32():
    ref_model = tiny_model("gqa2_interval2").float().cuda()
    bf16 = tiny_model("gqa2_interval2").float().cuda().to(torch.bfloat16)
    seq = torch.tensor(prompts_of([120], ref_model.args.vocab_size)[0], device="cuda")
    with torch.no_grad():
        ref = ref_model.logits(ref_model(seq, ForwardBatch.packed([120], device="cuda"))).float()
        out = bf16.logits(bf16(seq, ForwardBatch.packed([120], device="cuda"))).float()
    lp_ref, lp = ref.log_softmax(-1), out.log_softmax(-1)
    assert (lp.exp() * (lp - lp_ref)).sum(-1).mean().item() < 5e-3  # KL(bf16 || fp32) per token


@pytest.mark.parametrize("spec", [None, "EAGLE"])
@pytest.mark.parametrize("lengths", [[5, 17, 33], [3, 7, 12]])  # the second: prefilled step by step, padded
def test_engine_greedy_on_cuda_matches_cpu(spec, lengths):
    cpu = tiny_model("gqa2_interval2").float()
    gpu = tiny_model("gqa2_interval2").float().cuda()
    prompts = prompts_of(lengths, cpu.args.vocab_size)
    params = SamplingParams(max_new_tokens=12, temperature=0)
    outs = []
    for model in (cpu, gpu):
        engine = LLMEngine(
            model, EngineConfig(max_running_requests=3, context_length=64, speculative_algorithm=spec, num_slots=3)
        )
        engine.eos_ids = set()
        outs.append([o.output_ids for o in engine.generate(prompts, params)])
    assert outs[0] == outs[1]


def test_engine_sizes_slots_from_gpu_memory():
    model = tiny_model("gqa2_interval2").float().cuda()
    engine = LLMEngine(model, EngineConfig(max_running_requests=8, context_length=64, mem_fraction_static=0.5))
    assert engine.scheduler.pool.num_slots == 8


def test_league_bench_times_a_rollout_through_cuda_graphs(tmp_path):
    """``league bench`` on the GPU: random bf16 weights made on the device, the decode graph captured, a record."""
    import json

    from typer.testing import CliRunner

    from league.cli import app

    out = tmp_path / "bench.json"
    args = ["bench", "--preset", "tiny", "--batch", "4", "--prompt-len", "16", "--new-tokens", "32"]
    args += ["--speculative-num-steps", "2", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    assert record["device"] != "cpu" and record["settings"]["dtype"] == "bfloat16"
    rates = record["results"]["b4"]
    assert rates["decode_tokens_per_s"] > 0 and 0 < rates["roofline_fraction"]
    assert 1.0 <= rates["spec_accept_length"] <= 3.0
