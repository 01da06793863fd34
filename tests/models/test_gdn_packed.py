"""The GPU's chunked GDN layout (packed sequences with ``cu_seqlens``) equals the CPU's (padded, folded into
heads): run here through the torch references by switching the layout."""

import torch

from league.models.qwen3_5_moe import ForwardBatch
from league.models.qwen3_5_moe import gated_deltanet as model_module
from tests.models.test_forms import tiny_model


def chunk_layout(packed: bool):
    """``gdn_path`` with the chunked form in the packed layout (the GPU's) or the padded one (the CPU's)."""
    from league.ops.gdn import gdn_path

    def path(*args):
        form = gdn_path(*args)
        return ("chunk_packed" if packed else "chunk_padded") if form.startswith("chunk") else form

    return path


def forward(model, seqs, cache_lens=None, cache=None, slots=None):
    tokens = torch.tensor([t for s in seqs for t in s])
    batch = ForwardBatch.packed([len(s) for s in seqs], cache_lens=cache_lens, slots=slots)
    with torch.no_grad():
        return model(tokens, batch, cache)


def test_packed_chunks_equal_folded(monkeypatch):
    model = tiny_model("gqa2_interval2").float()
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, model.args.vocab_size, (n,), generator=gen).tolist() for n in (70, 17, 129, 40)]
    folded = forward(model, seqs)
    monkeypatch.setattr(model_module, "gdn_path", chunk_layout(True))
    packed = forward(model, seqs)
    assert (packed - folded).abs().max().item() < 1e-5


def test_packed_chunks_continue_and_commit_cache_states(monkeypatch):
    """Chunked prefill continuing from cache slots: both layouts leave the same states and outputs."""
    from league.engine.cache import allocate_cache

    model = tiny_model("gqa2_interval2").float()
    gen = torch.Generator().manual_seed(1)
    first = [torch.randint(0, model.args.vocab_size, (n,), generator=gen).tolist() for n in (30, 50)]
    second = [torch.randint(0, model.args.vocab_size, (n,), generator=gen).tolist() for n in (40, 21)]
    results = []
    for packed in (False, True):
        monkeypatch.setattr(model_module, "gdn_path", chunk_layout(packed))
        cache = allocate_cache(model.args, 4, 128, torch.float32, "cpu")
        forward(model, first, cache_lens=[0, 0], cache=cache, slots=[3, 1])
        out = forward(model, second, cache_lens=[30, 50], cache=cache, slots=[3, 1])
        results.append((out, [layer.ssm.clone() for layer in cache.layers if hasattr(layer, "ssm")]))
    assert (results[0][0] - results[1][0]).abs().max().item() < 1e-5
    for a, b in zip(results[0][1], results[1][1]):
        assert (a - b).abs().max().item() < 1e-5
