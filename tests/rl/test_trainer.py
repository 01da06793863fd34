"""The train step: what changes and what does not, MTP gradients, and independence from packing."""

import copy
import random

import pytest
import torch

from league.ops.numerics import BATCH_INVARIANT, FAST
from league.rl.algorithms import mtp_labels_and_mask
from league.rl.optim import OptimConfig
from league.rl.sample import Sample
from league.rl.trainer import AlgorithmConfig, TrainConfig, Trainer
from tests.models.test_forms import tiny_model


def make_samples(num: int, vocab: int, seed: int = 0, masked: bool = False) -> list[Sample]:
    rng = random.Random(seed)
    samples = []
    for i in range(num):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(3, 9))]
        response = [rng.randrange(vocab) for _ in range(rng.randint(2, 11))]
        samples.append(
            Sample(
                prompt_ids=prompt,
                response_ids=response,
                rollout_logprobs=[-rng.random() * 3 for _ in response],
                advantage=rng.uniform(-1, 1),
                loss_mask=[0] * len(response) if masked else None,
                group_index=i // 2,
                index=i,
            )
        )
    return samples


def trainer_for(model, gbs=8, budget=4096, lr=1e-2, **algo) -> Trainer:
    algo = {"eps_clip_high": 0.28, "enable_mtp_training": True, **algo}
    return Trainer(
        model,
        TrainConfig(global_batch_size=gbs, max_tokens_per_gpu=budget, recompute=False),
        AlgorithmConfig(**algo),
        OptimConfig(lr=lr, weight_decay=0.0, clip_grad=0.0),
        total_steps=10,
    )


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_every_trainable_parameter_changes():
    model = tiny_model().float()
    before = snapshot(model)
    trainer_for(model).train(make_samples(8, model.args.vocab_size))
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert unchanged == []


def test_fully_masked_batch_changes_nothing():
    model = tiny_model().float()
    before = snapshot(model)
    metrics = trainer_for(model).train(make_samples(8, model.args.vocab_size, masked=True))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert metrics["train/pg_loss"] == 0.0 and metrics["train/mtp_loss"] == 0.0


def test_mtp_loss_gradient_reaches_only_mtp_parameters():
    """With zero advantages the policy loss has no gradient; what remains is the MTP loss's."""
    model = tiny_model().float()
    samples = make_samples(8, model.args.vocab_size)
    for s in samples:
        s.advantage = 0.0
    trainer = trainer_for(model)
    mb = trainer._micro_batches(samples, 4096)[0]
    _, hidden = __import__("league.rl.trainer", fromlist=["response_logprobs"]).response_logprobs(model, mb)
    trainer._mtp_loss(mb, hidden).backward()
    reached = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert reached and all(n.startswith("mtp.") for n in reached)
    assert {n for n, _ in model.named_parameters() if n.startswith("mtp.")} == reached


def test_without_mtp_training_the_head_is_frozen():
    model = tiny_model().float()
    before = snapshot(model)
    trainer_for(model, enable_mtp_training=False).train(make_samples(8, model.args.vocab_size))
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == n.startswith("mtp."), n


@pytest.mark.parametrize("per_token", [False, True])
def test_loss_and_gradients_do_not_depend_on_packing(per_token):
    base = tiny_model().double()
    samples = make_samples(8, base.args.vocab_size, seed=3)
    results = []
    for budget in (4096, 40, 21):  # one micro-batch, a few, about one sample each
        model = copy.deepcopy(base)
        trainer = trainer_for(model, budget=budget, lr=0.0, calculate_per_token_loss=per_token)
        assert (len(trainer._micro_batches(samples, budget)) == 1) == (budget == 4096)
        metrics = trainer.train(samples)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((metrics, grads))
    (m0, g0), others = results[0], results[1:]
    for metrics, grads in others:
        for key in ("train/pg_loss", "train/ppo_kl", "train/train_rollout_logprob_abs_diff", "train/mtp_loss"):
            assert metrics[key] == pytest.approx(m0[key], rel=1e-6, abs=1e-9)  # log-probs are fp32
        for name, grad in g0.items():  # the MTP loss too: a token mean over the whole step
            assert torch.allclose(grads[name], grad, rtol=1e-5, atol=1e-8), name


def test_micro_batches_respect_the_token_budget():
    model = tiny_model().float()
    samples = make_samples(16, model.args.vocab_size, seed=4)
    trainer = trainer_for(model, gbs=16, budget=37)
    for mb in trainer._micro_batches(samples, 37):
        assert sum(mb.packed.seq_lens) <= 37


def test_several_optimizer_steps_per_rollout_use_pre_update_logprobs():
    model = tiny_model().float()
    samples = make_samples(8, model.args.vocab_size, seed=5)
    trainer = trainer_for(model, gbs=4)
    metrics = trainer.train(samples)
    assert trainer.num_steps == 2
    assert metrics["train/ppo_kl"] != 0.0  # the second step's ratio is against the first step's weights


def test_entropy_bonus_is_the_same_fused_and_batch_invariant():
    """The fused entropy (no [R, V] logits) and the batch-invariant path's entropy agree, and so do the gradients."""
    results = []
    for invariant in (False, True):
        model = tiny_model().float()
        trainer = trainer_for(model, entropy_coef=0.01)
        trainer.numerics = BATCH_INVARIANT if invariant else FAST
        metrics = trainer.train(make_samples(8, model.args.vocab_size, seed=5))
        results.append((metrics["train/entropy_loss"], metrics["train/grad_norm"]))
    (entropy_fused, norm_fused), (entropy_invariant, norm_invariant) = results
    assert entropy_fused > 0 and abs(entropy_fused - entropy_invariant) < 1e-5
    assert abs(norm_fused - norm_invariant) < 1e-5 * norm_invariant


def test_mtp_loss_is_the_same_fused_and_batch_invariant():
    """The MTP loss through the fused head (no [R, V] logits) equals the cross-entropy of its logits, computed by
    hand over the masked rows, and so do the MTP parameters' gradients."""
    model = tiny_model().float()
    trainer = trainer_for(model)
    mb = trainer._micro_batches(make_samples(8, model.args.vocab_size, seed=3), 4096)[0]
    results = []
    for invariant in (False, True):
        trainer.numerics = BATCH_INVARIANT if invariant else FAST
        model.zero_grad()
        hidden = model(mb.packed.tokens_T, mb.batch)
        loss = trainer._mtp_loss(mb, hidden)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (fused, grads_fused), (invariant, grads_invariant) = results
    packed = mb.packed
    next_tokens, labels, mask = mtp_labels_and_mask(packed.tokens_T, packed.loss_mask_T, packed.cu_seqlens)
    with torch.no_grad():
        hidden = model(packed.tokens_T, mb.batch)
        logits = model.mtp_logits(model.mtp_forward(hidden, next_tokens, mb.batch))
    rows = mask.nonzero()[:, 0]
    by_hand = torch.nn.functional.cross_entropy(logits[rows].double(), labels[rows])
    assert len(rows) > 0 and abs(fused.item() - by_hand.item()) < 1e-5
    assert abs(fused.item() - invariant.item()) < 1e-5
    assert grads_fused.keys() == grads_invariant.keys() and all(n.startswith("mtp.") for n in grads_fused)
    for name, grad in grads_fused.items():
        torch.testing.assert_close(grad, grads_invariant[name], rtol=1e-4, atol=1e-6)


def test_nonfinite_logprobs_are_neutral_and_counted(monkeypatch):
    """NaN and -inf rollout and reference log-probs train as if they were the policy's own (TIS weight 1, no
    train/rollout difference, KL 0 with k3's zero gradient there), and are counted in the metrics."""
    base = tiny_model().float()
    samples = make_samples(8, base.args.vocab_size, seed=6)
    settings = dict(lr=1e-3, use_tis=True, use_kl_loss=True, kl_loss_coef=0.1, kl_loss_type="k3")
    own = trainer_for(copy.deepcopy(base), **settings).compute_logprobs(samples)
    bad, neutral = copy.deepcopy(samples), copy.deepcopy(samples)
    bad[0].rollout_logprobs[0], bad[1].rollout_logprobs[1] = float("-inf"), float("nan")
    neutral[0].rollout_logprobs[0], neutral[1].rollout_logprobs[1] = float(own[0][0]), float(own[1][1])
    results = []
    for batch, ref_value in ((bad, float("nan")), (neutral, None)):
        model = copy.deepcopy(base)
        trainer = trainer_for(model, **settings)
        compute = trainer.compute_logprobs

        def with_ref(samples, ref=False, compute=compute, ref_value=ref_value):
            out = compute(samples, ref)
            if ref and ref_value is not None:
                out[2] = out[2].clone()
                out[2][0] = ref_value
            return out

        monkeypatch.setattr(trainer, "compute_logprobs", with_ref)
        results.append((trainer.train(batch), snapshot(model)))
    (m_bad, p_bad), (m_neutral, p_neutral) = results
    assert m_bad.pop("train/nonfinite_logprob_tokens") == 2 and m_bad.pop("train/nonfinite_kl_tokens") == 1
    assert m_neutral.pop("train/nonfinite_logprob_tokens") == 0 and m_neutral.pop("train/nonfinite_kl_tokens") == 0
    assert m_bad == pytest.approx(m_neutral, rel=1e-6, abs=1e-9)
    for name, p in p_bad.items():
        assert torch.isfinite(p).all() and torch.allclose(p, p_neutral[name], rtol=1e-5, atol=1e-7), name
