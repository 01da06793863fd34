"""``with_inert_layers`` of ``benchmarks/speculative_gpu.py``: a trained cut of the model served at full depth must
decode exactly as the cut does, while its extra layers do a real layer's work."""

import pytest
import torch

from league.engine.config import EngineConfig
from league.engine.engine import LLMEngine
from league.engine.request import SamplingParams
from league.models.qwen3_5_moe import ForwardBatch
from league.models.qwen3_5_moe.presets import TINY, with_num_layers
from tests.benchmarks import load_benchmark


def test_inert_layers_keep_the_cut_models_tokens():
    bench = load_benchmark("speculative_gpu")
    cut = bench.random_model(with_num_layers(TINY, 4), "cpu", torch.float32, seed=0).eval()
    with torch.no_grad():  # norms away from their zero init, so the layers do not all look alike
        for name, p in cut.named_parameters():
            if p.ndim == 1 and name.endswith("norm.weight"):
                p.normal_(0.0, 0.1)
    deep = bench.with_inert_layers(cut, with_num_layers(TINY, 8), seed=1).eval()
    assert len(deep.layers) == 8 and deep.args.layer_types[:4] == cut.args.layer_types
    deep_weights = deep.state_dict()
    assert all(torch.equal(w, deep_weights[name]) for name, w in cut.state_dict().items())
    extra = deep.layers[4]
    assert extra.gdn.wo.weight.abs().max() == 0 and extra.moe.experts.w_down.abs().max() == 0
    assert extra.gdn.w_qkv.weight.abs().max() > 0 and extra.moe.router.weight.abs().max() > 0
    assert deep.layers[7].attn.wo.weight.abs().max() == 0

    tokens = torch.randint(0, TINY.vocab_size, (2 * 12,), generator=torch.Generator().manual_seed(0))
    batch = ForwardBatch.packed([12, 12])
    with torch.no_grad():
        hidden_cut, hidden_deep = cut(tokens, batch), deep(tokens, batch)
        assert torch.equal(hidden_cut, hidden_deep)
        mtp_cut = cut.mtp_logits(cut.mtp_forward(hidden_cut, tokens.roll(-1), batch))
        assert torch.equal(mtp_cut, deep.mtp_logits(deep.mtp_forward(hidden_deep, tokens.roll(-1), batch)))

    def generate(model, spec_steps):
        config = EngineConfig(
            max_running_requests=2,
            num_slots=2,
            context_length=64,
            speculative_algorithm="EAGLE" if spec_steps else None,
            speculative_num_steps=max(spec_steps, 1),
        )
        prompts = [tokens[:12].tolist(), tokens[12:].tolist()]
        outs = LLMEngine(model, config).generate(prompts, SamplingParams(max_new_tokens=10, temperature=0.0))
        return [o.output_ids for o in outs]

    assert generate(deep, 2) == generate(cut, 2) == generate(cut, 0)


def test_inert_layers_refuse_a_model_that_does_not_extend_the_cut():
    bench = load_benchmark("speculative_gpu")
    cut = bench.random_model(with_num_layers(TINY, 4), "cpu", torch.float32, seed=0)
    with pytest.raises(ValueError, match="must begin with the same layers"):
        bench.with_inert_layers(cut, with_num_layers(TINY, 3), seed=1)
    shifted = with_num_layers(TINY, 8)
    shifted = shifted.replace(layer_types=shifted.layer_types[1:] + shifted.layer_types[:1])
    with pytest.raises(ValueError, match="must begin with the same layers"):
        bench.with_inert_layers(cut, shifted, seed=1)
