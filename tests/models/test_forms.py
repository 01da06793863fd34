"""The model's forms agree: cached prefill + decode == one forward, chunked prefill, packed == alone,
verify keeps every intermediate GDN state, and the MTP head follows spec/model.md section 4.

Run in float64, so that the forms (chunked vs step-by-step GDN, cached vs full attention) must agree to
~1e-12: any real difference in the math shows, and fp32 rounding does not hide one."""

import pytest
import torch
import torch.nn.functional as F

from league.engine.cache import allocate_cache
from league.models.qwen3_5_moe import ForwardBatch, GDNCache, ModelArgs, Transformer
from league.ops.norm import rms_norm
from tests.conftest import hf_text_config


def tiny_model(name: str = "gqa2_interval2", seed: int = 0, mtp: int = 1) -> Transformer:
    args = ModelArgs.from_hf_config(hf_text_config(name, mtp_num_hidden_layers=mtp).to_dict())
    model = Transformer(args).eval()
    model.init_weights(seed, std=0.05)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.double()


TOL = 1e-9
F64 = dict(dtype=torch.float64, device="cpu", state_dtype=torch.float64)


def full_logits(model: Transformer, seq: torch.Tensor) -> torch.Tensor:
    return model.logits(model(seq, ForwardBatch.packed([len(seq)])))


@torch.no_grad()
def test_prefill_then_decode_equals_full_forward(tiny_config_name):
    model = tiny_model(tiny_config_name)
    seq = torch.randint(0, model.args.vocab_size, (90,), generator=torch.Generator().manual_seed(2))
    reference = full_logits(model, seq)
    cache = allocate_cache(model.args, num_slots=3, max_len=128, **F64)
    prompt = 70
    slot = 2
    out = [model.logits(model(seq[:prompt], ForwardBatch.packed([prompt], cache_lens=[0], slots=[slot]), cache))]
    for t in range(prompt, len(seq)):
        batch = ForwardBatch.packed([1], cache_lens=[t], slots=[slot])
        out.append(model.logits(model(seq[t : t + 1], batch, cache)))
    assert (torch.cat(out) - reference).abs().max().item() < TOL


@torch.no_grad()
def test_chunked_prefill_and_batched_decode_of_several_requests():
    model = tiny_model("gqa4_interval4")
    gen = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, model.args.vocab_size, (n,), generator=gen) for n in (150, 40, 77)]
    cache = allocate_cache(model.args, num_slots=4, max_len=160, **F64)
    slots = [3, 0, 1]
    pieces = {i: [] for i in range(3)}
    # prefill in two chunks per request, with the requests packed together
    cuts = [100, 25, 60]
    batch = ForwardBatch.packed(cuts, cache_lens=[0, 0, 0], slots=slots)
    logits = model.logits(model(torch.cat([s[:c] for s, c in zip(seqs, cuts)]), batch, cache))
    for i, (_, start, end) in enumerate(batch.sequences()):
        pieces[i].append(logits[start:end])
    rest = [n - c - 10 for n, c in zip((150, 40, 77), cuts)]
    batch = ForwardBatch.packed(rest, cache_lens=cuts, slots=slots)
    logits = model.logits(model(torch.cat([s[c : c + r] for s, c, r in zip(seqs, cuts, rest)]), batch, cache))
    for i, (_, start, end) in enumerate(batch.sequences()):
        pieces[i].append(logits[start:end])
    # the last 10 tokens decoded one at a time, all three requests in one batch
    done = [c + r for c, r in zip(cuts, rest)]
    for step in range(10):
        batch = ForwardBatch.packed([1, 1, 1], cache_lens=[d + step for d in done], slots=slots)
        logits = model.logits(model(torch.stack([s[d + step] for s, d in zip(seqs, done)]), batch, cache))
        for i in range(3):
            pieces[i].append(logits[i : i + 1])
    for i, seq in enumerate(seqs):
        assert (torch.cat(pieces[i]) - full_logits(model, seq)).abs().max().item() < TOL


@torch.no_grad()
def test_packed_sequences_equal_each_alone():
    model = tiny_model("mha_pattern")
    gen = torch.Generator().manual_seed(4)
    seqs = [torch.randint(0, model.args.vocab_size, (n,), generator=gen) for n in (3, 130, 64, 65)]
    packed = model.logits(model(torch.cat(seqs), ForwardBatch.packed([len(s) for s in seqs])))
    start = 0
    for seq in seqs:
        alone = full_logits(model, seq)
        assert (packed[start : start + len(seq)] - alone).abs().max().item() < TOL
        start += len(seq)


@torch.no_grad()
@pytest.mark.parametrize("accepted", [0, 1, 3])
def test_verify_then_commit_equals_running_the_accepted_tokens(accepted):
    """Verify 4 tokens without committing; committing step ``accepted`` equals having run those tokens."""
    model = tiny_model("gqa2_interval2")
    gen = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, model.args.vocab_size, (30,), generator=gen)
    draft = torch.randint(0, model.args.vocab_size, (4,), generator=gen)
    follow = torch.randint(0, model.args.vocab_size, (1,), generator=gen)
    cache = allocate_cache(model.args, num_slots=2, max_len=64, **F64, max_rows=2, max_steps=4)
    model(prompt, ForwardBatch.packed([30], cache_lens=[0], slots=[1]), cache)
    gdn_caches = [layer for layer in cache.layers if isinstance(layer, GDNCache)]
    before = [(layer.conv.clone(), layer.ssm.clone()) for layer in gdn_caches]
    verify = ForwardBatch.packed([4], cache_lens=[30], slots=[1], record_states=True)
    verify_logits = model.logits(model(draft, verify, cache))
    for (conv, ssm), layer in zip(before, gdn_caches):  # a verify commits nothing
        assert torch.equal(conv, layer.conv) and torch.equal(ssm, layer.ssm)
    model.commit_verified(cache, torch.tensor([1]), torch.tensor([accepted]))
    kept = accepted + 1
    # the committed windows and states are those of running the kept tokens as a decode would
    plain = allocate_cache(model.args, num_slots=2, max_len=64, **F64)
    model(prompt, ForwardBatch.packed([30], cache_lens=[0], slots=[1]), plain)
    model(draft[:kept], ForwardBatch.packed([kept], cache_lens=[30], slots=[1]), plain)
    for layer, expected in zip(gdn_caches, [c for c in plain.layers if isinstance(c, GDNCache)]):
        assert (layer.conv[1] - expected.conv[1]).abs().max().item() < TOL
        assert (layer.ssm[1] - expected.ssm[1]).abs().max().item() < TOL
    after = model.logits(model(follow, ForwardBatch.packed([1], cache_lens=[30 + kept], slots=[1]), cache))
    reference = full_logits(model, torch.cat([prompt, draft[:kept], follow]))
    assert (verify_logits[:kept] - reference[30 : 30 + kept]).abs().max().item() < TOL
    assert (after[0] - reference[-1]).abs().max().item() < TOL


@torch.no_grad()
def test_mtp_head_by_hand():
    """spec/model.md 4.1: u = fc([norm_e(embed(x_{j+1})), norm_h(h_j)]), one full-attention MoE layer at
    position j, mtp.norm, shared output head."""
    model = tiny_model("gqa2_interval2")
    args = model.args
    seq = torch.randint(0, args.vocab_size, (20,), generator=torch.Generator().manual_seed(6))
    batch = ForwardBatch.packed([19])
    hidden = model(seq[:19], batch)
    logits = model.mtp_logits(model.mtp_forward(hidden, seq[1:20], batch))

    mtp = model.mtp
    e = model.tok_embeddings.weight[seq[1:20]]
    u = (
        torch.cat(
            [
                rms_norm(e, mtp.embed_norm.weight, args.norm_eps),
                rms_norm(hidden, mtp.hidden_norm.weight, args.norm_eps),
            ],
            dim=-1,
        )
        @ mtp.fc.weight.t()
    )
    layer = mtp.layers[0]
    h = rms_norm(u, layer.attn_norm.weight, args.norm_eps)
    attn = layer.attn
    q_and_gate = (h @ attn.wq.weight.t()).view(19, args.num_heads, 2 * args.head_dim)
    q, gate = q_and_gate[..., : args.head_dim], q_and_gate[..., args.head_dim :]
    k = (h @ attn.wk.weight.t()).view(19, args.num_kv_heads, args.head_dim)
    v = (h @ attn.wv.weight.t()).view(19, args.num_kv_heads, args.head_dim)
    q = rms_norm(q, attn.q_norm.weight, args.norm_eps)
    k = rms_norm(k, attn.k_norm.weight, args.norm_eps)
    rot = args.rotary_dim
    inv_freq = (1.0 / (args.rope_theta ** (torch.arange(0, rot, 2).float() / rot))).double()  # fp32 table
    angles = torch.arange(19).double()[:, None] * inv_freq[None]  # row j sits at position j
    cos, sin = torch.cat([angles, angles], -1).cos()[:, None], torch.cat([angles, angles], -1).sin()[:, None]

    def rotate(x):
        x1, x2 = x[..., : rot // 2], x[..., rot // 2 : rot]
        return torch.cat([x[..., :rot] * cos + torch.cat([-x2, x1], -1) * sin, x[..., rot:]], -1)

    q, k = rotate(q), rotate(k)
    groups = args.num_heads // args.num_kv_heads
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = torch.einsum("thd,shd->hts", q, k) / args.head_dim**0.5
    scores = scores.masked_fill(torch.ones(19, 19, dtype=torch.bool).triu(1), float("-inf"))
    o = torch.einsum("hts,shd->thd", scores.softmax(-1), v).reshape(19, -1) * torch.sigmoid(gate.reshape(19, -1))
    x = u + o @ attn.wo.weight.t()
    h2 = rms_norm(x, layer.ffn_norm.weight, args.norm_eps)
    moe = layer.moe
    probs = (h2 @ moe.router.weight.t()).softmax(-1)
    top_w, top_i = probs.topk(args.num_experts_per_tok, -1)
    top_w = top_w / top_w.sum(-1, keepdim=True)
    routed = torch.zeros_like(h2)
    for t in range(19):
        for w, ex in zip(top_w[t], top_i[t]):
            gu = moe.experts.w_gate_up[ex] @ h2[t]
            g_, up = gu[: args.moe_intermediate_size], gu[args.moe_intermediate_size :]
            routed[t] += w * (moe.experts.w_down[ex] @ (F.silu(g_) * up))
    shared = moe.shared.w_down(F.silu(moe.shared.w_gate(h2)) * moe.shared.w_up(h2))
    x = x + routed + torch.sigmoid(h2 @ moe.shared_gate.weight.t()) * shared
    expected = rms_norm(x, mtp.norm.weight, args.norm_eps) @ model.output.weight.t()
    assert (logits - expected).abs().max().item() < TOL


def test_mtp_gradient_reaches_only_mtp_parameters():
    model = tiny_model("gqa2_interval2")
    seq = torch.randint(0, model.args.vocab_size, (12,), generator=torch.Generator().manual_seed(7))
    batch = ForwardBatch.packed([11])
    hidden = model(seq[:11], batch)
    mtp_logits = model.mtp_logits(model.mtp_forward(hidden, seq[1:12], batch, detach_trunk=True), detach_head=True)
    F.cross_entropy(mtp_logits[:-1], seq[2:12]).backward()
    for name, p in model.named_parameters():
        reached = p.grad is not None and p.grad.abs().sum().item() > 0
        assert reached == name.startswith("mtp."), name


def test_rope_table_stays_fp32_when_the_model_is_cast():
    """``model.to(bf16)`` casts buffers too; the RoPE frequencies are remade in fp32 (bf16's rounding, up to 2^-9
    relative, would move the angle of position 4,000 by up to ~8 radians), and fp64 is kept for exact references."""
    from league.ops.rope import rope_inv_freq

    args = ModelArgs.from_hf_config(hf_text_config("gqa2_interval2").to_dict())
    table = rope_inv_freq(args.rotary_dim, args.rope_theta)
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.float()):
        model = cast(Transformer(args))
        assert model.inv_freq.dtype == torch.float32 and torch.equal(model.inv_freq, table)
    assert Transformer(args).double().inv_freq.dtype == torch.float64
    assert Transformer(args).to(torch.bfloat16).tok_embeddings.weight.dtype == torch.bfloat16
