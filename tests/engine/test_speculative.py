"""Speculative sampling is exact (the emitted tokens follow the target's distribution), and a trained
MTP head gets real acceptance."""

import math

import torch
import torch.nn.functional as F

from league.engine.config import EngineConfig
from league.engine.engine import LLMEngine
from league.engine.request import SamplingParams
from league.engine.speculative import accept
from league.models.qwen3_5_moe import ForwardBatch, ModelArgs, Transformer
from league.ops.sampling import filtered_probs
from tests.conftest import hf_text_config

ALPHA = 1e-3


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Goodness of fit of ``counts`` to ``probs``; cells expecting fewer than 5 are pooled."""
    total = counts.sum()
    expected = probs.double() * total
    small = expected < 5
    obs = torch.cat([counts[~small].double(), counts[small].double().sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2))


def shifted(probs: torch.Tensor, amount: float = 0.05) -> torch.Tensor:
    """Move ``amount`` of probability from the likeliest token to the second likeliest."""
    order = probs.argsort(descending=True)
    out = probs.clone()
    out[order[0]] -= amount
    out[order[1]] += amount
    return out


def test_acceptance_rule_emits_the_target_distribution():
    """First emitted token of one verify: draft kept with prob p(d), else a residual draw. Its law must be p.
    Power: the same number of draws from p shifted by 0.05 is rejected (checked below)."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 12, generator=gen) * 1.5
    params = SamplingParams(temperature=0.8, top_k=8)
    target = filtered_probs(logits[0], 0.8, top_k=8)
    for draft in (int(target.argmax()), int(target.argsort()[-4]), int(target.argmin())):
        counts = torch.zeros(12)
        draws = 6000
        for seed in range(draws):
            accepted, bonus = accept(logits, [draft, 0], params, seed, position=7)
            counts[draft if accepted else bonus] += 1
        assert chi_square_p_value(counts, target) > ALPHA
    wrong = torch.multinomial(shifted(target), draws, replacement=True, generator=gen).bincount(minlength=12)
    assert chi_square_p_value(wrong, target) < ALPHA


def small_vocab_model(seed: int = 0) -> Transformer:
    args = ModelArgs.from_hf_config(hf_text_config("gqa2_interval2", vocab_size=12, mtp_num_hidden_layers=1).to_dict())
    model = Transformer(args).eval()
    model.init_weights(seed, std=0.3)  # peaky distributions, so drafts are sometimes accepted
    return model


def test_speculative_sampling_matches_the_model_distribution():
    """3,000 two-token continuations with speculation (2 steps) follow the model's exact law of the first
    token and of the second token; the same test rejects a 0.05 shift of either (power check)."""
    model = small_vocab_model()
    prompt = [3, 1, 4, 1, 5]
    num = 3000
    params = [SamplingParams(max_new_tokens=2, temperature=1.0, seed=i) for i in range(num)]
    eng = LLMEngine(
        model,
        EngineConfig(
            max_running_requests=64, context_length=32, speculative_algorithm="EAGLE", speculative_num_steps=2
        ),
    )
    eng.eos_ids = set()
    outs = eng.generate([prompt] * num, params)
    assert eng.stats.spec.accepted_tokens > 0 and eng.stats.spec.accepted_tokens < eng.stats.spec.draft_tokens
    first = torch.tensor([o.output_ids[0] for o in outs])
    second = torch.tensor([o.output_ids[1] for o in outs])
    with torch.no_grad():
        p_first = F.softmax(model.logits(model(torch.tensor(prompt), ForwardBatch.packed([5])))[-1].float(), -1)
        cont = torch.tensor([prompt + [t] for t in range(12)]).view(-1)
        last = model.logits(model(cont, ForwardBatch.packed([6] * 12))).view(12, 6, -1)[:, -1]
        p_second = (p_first[:, None] * F.softmax(last.float(), -1)).sum(0)
    for tokens, probs in ((first, p_first), (second, p_second)):
        counts = tokens.bincount(minlength=12)
        assert chi_square_p_value(counts, probs) > ALPHA
        wrong = torch.multinomial(
            shifted(probs), num, replacement=True, generator=torch.Generator().manual_seed(1)
        ).bincount(minlength=12)
        assert chi_square_p_value(wrong, probs) < ALPHA


def synthetic_batch(num_seqs: int, length: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    """Arithmetic progressions mod vocab: the step is set by the first two tokens, so every later token
    (and the one after it) is predictable."""
    start = torch.randint(0, vocab, (num_seqs, 1), generator=gen)
    step = torch.randint(1, 4, (num_seqs, 1), generator=gen)
    return (start + step * torch.arange(length)[None]) % vocab


def test_trained_mtp_head_gets_real_acceptance():
    torch.manual_seed(0)
    args = ModelArgs.from_hf_config(hf_text_config("gqa2_interval2", vocab_size=32, mtp_num_hidden_layers=1).to_dict())
    model = Transformer(args)
    model.init_weights(0)
    gen = torch.Generator().manual_seed(0)
    prompts = synthetic_batch(8, 4, 32, gen).tolist()

    def acceptance() -> float:
        model.eval()
        eng = LLMEngine(
            model,
            EngineConfig(
                max_running_requests=8, context_length=64, speculative_algorithm="EAGLE", speculative_num_steps=2
            ),
        )
        eng.eos_ids = set()
        eng.generate(prompts, SamplingParams(max_new_tokens=24, temperature=0))
        return eng.stats.spec.accept_length

    untrained = acceptance()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    num_seqs, length = 16, 24
    batch = ForwardBatch.packed([length] * num_seqs)
    for _ in range(120):
        seqs = synthetic_batch(num_seqs, length, 32, gen)
        tokens = seqs.view(-1)
        hidden = model(tokens, batch)
        loss = F.cross_entropy(
            model.logits(hidden).view(num_seqs, length, -1)[:, :-1].reshape(-1, 32), seqs[:, 1:].reshape(-1)
        )
        next_tokens = torch.roll(seqs, -1, dims=1).view(-1)
        mtp = model.mtp_logits(model.mtp_forward(hidden, next_tokens, batch, detach_trunk=True), detach_head=True)
        mtp_loss = F.cross_entropy(mtp.view(num_seqs, length, -1)[:, :-2].reshape(-1, 32), seqs[:, 2:].reshape(-1))
        opt.zero_grad()
        (loss + mtp_loss).backward()
        opt.step()
    trained = acceptance()
    assert untrained < 1.3, untrained
    assert trained > 1.6, (untrained, trained)
    assert math.isfinite(mtp_loss.item()) and mtp_loss.item() < 1.0


def test_batched_acceptance_equals_each_request_alone():
    """A request's acceptance and bonus depend only on its logits, seed and position, not on the rows beside it."""
    from league.engine.speculative import accept_batch

    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 4, 12, generator=gen) * 2.0
    drafts = [torch.randint(0, 12, (3,), generator=gen).tolist() for _ in range(5)]
    params = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=0.8, top_k=8),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.8, top_k=8),
        SamplingParams(temperature=1.0, top_p=0.9),
    ]
    for trial in range(20):
        seeds = [100 * trial + i for i in range(5)]
        positions = [3 * i for i in range(5)]
        batched = accept_batch(logits, drafts, params, seeds, positions)
        alone = [accept(logits[i], drafts[i], params[i], seeds[i], positions[i]) for i in range(5)]
        assert batched == alone
        greedy_best = logits[0].argmax(-1).tolist()
        kept = next((t for t in range(3) if drafts[0][t] != greedy_best[t]), 3)
        assert batched[0] == (kept, greedy_best[kept])


def test_second_emitted_token_follows_the_target_after_an_accepted_draft():
    """Coins for all drafts are drawn at once; after draft 1 is kept, the next emitted token must still follow the
    target's row 1 (kept draft 2 with prob p1(d2), else the residual draw)."""
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 12, generator=gen) * 1.5
    params = SamplingParams(temperature=1.0)
    first, second = filtered_probs(logits[0], 1.0), filtered_probs(logits[1], 1.0)
    d1, d2 = int(first.argmax()), int(second.argsort()[-3])
    counts = torch.zeros(12)
    for seed in range(8000):
        accepted, bonus = accept(logits, [d1, d2], params, seed, position=0)
        if accepted >= 1:
            counts[d2 if accepted == 2 else bonus] += 1
    assert counts.sum() > 2000
    assert chi_square_p_value(counts, second) > ALPHA
