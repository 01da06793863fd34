"""The engine: greedy output equals transformers' generate with and without speculation, continuous
batching (requests join and leave), n samples, waiting for slots, abort, per-request seeds."""

import pytest
import torch
from transformers import Qwen3_5MoeForCausalLM

from league.checkpoint.qwen3_5_moe import from_hf
from league.engine.config import EngineConfig
from league.engine.engine import LLMEngine
from league.engine.request import SamplingParams
from league.models.qwen3_5_moe import ForwardBatch, ModelArgs, Transformer
from league.ops.logprob import token_logprobs
from league.ops.numerics import BATCH_INVARIANT
from tests.conftest import hf_text_config, randomize_vectors


@pytest.fixture(scope="module")
def hf_and_league():
    torch.manual_seed(0)
    config = hf_text_config("gqa2_interval2", mtp_num_hidden_layers=1)
    hf = Qwen3_5MoeForCausalLM(config).eval()
    randomize_vectors(hf)
    args = ModelArgs.from_hf_config(config.to_dict())
    model = Transformer(args).eval()
    model.init_weights(seed=3, std=0.05)  # the MTP head (transformers has none) stays random
    model.load_state_dict(from_hf(hf.state_dict(), args.moe_intermediate_size, args.num_experts), strict=False)
    return hf, model


def prompts_of(lengths, vocab, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


def engine(model, **kw):
    config = dict(max_running_requests=3, max_num_batched_tokens=16, context_length=128)
    eng = LLMEngine(model, EngineConfig(**{**config, **kw}))
    eng.eos_ids = set()  # random weights: let every request run to its length
    return eng


@pytest.mark.parametrize("num_steps", [None, 1, 2, 3])
def test_greedy_equals_transformers_generate(hf_and_league, num_steps):
    hf, model = hf_and_league
    prompts = prompts_of([5, 40, 17, 2, 33, 9], model.args.vocab_size)
    lengths = [12, 20, 7, 16, 3, 20]  # requests leave at different steps; 6 requests, 3 slots: others join
    expected = []
    for p, n in zip(prompts, lengths):
        out = hf.generate(
            torch.tensor([p]),
            attention_mask=torch.ones(1, len(p), dtype=torch.long),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        expected.append(out[0, len(p) :].tolist())
    spec = dict(speculative_algorithm="EAGLE", speculative_num_steps=num_steps) if num_steps else {}
    eng = engine(model, **spec)
    outs = eng.generate(prompts, [SamplingParams(max_new_tokens=n, temperature=0) for n in lengths])
    assert [o.output_ids for o in outs] == expected
    assert all(o.finish_reason == "length" for o in outs)
    if num_steps:
        assert (
            eng.stats.spec.verify_steps > 0 and eng.stats.spec.draft_tokens == num_steps * eng.stats.spec.verify_steps
        )


def test_seeded_output_does_not_depend_on_the_batch(hf_and_league):
    _, model = hf_and_league
    prompts = prompts_of([5, 17, 33, 2, 9], model.args.vocab_size)
    params = SamplingParams(max_new_tokens=25, temperature=1.0, top_p=0.9, seed=11)
    alone = engine(model).generate([prompts[1]], params)[0]
    together = engine(model, max_running_requests=5).generate(prompts, params)[1]
    assert alone.output_ids == together.output_ids
    assert torch.allclose(torch.tensor(alone.output_logprobs), torch.tensor(together.output_logprobs), atol=1e-5)


def test_logprobs_equal_teacher_forced_scoring(hf_and_league):
    _, model = hf_and_league
    prompt = prompts_of([21], model.args.vocab_size)[0]
    out = engine(model).generate([prompt], SamplingParams(max_new_tokens=30, temperature=1.0, seed=5))[0]
    full = torch.tensor(prompt + out.output_ids)
    with torch.no_grad():
        logits = model.logits(model(full, ForwardBatch.packed([len(full)])))
    scored = token_logprobs(logits[len(prompt) - 1 : -1], torch.tensor(out.output_ids))
    assert torch.allclose(scored, torch.tensor(out.output_logprobs), atol=1e-5)


def test_n_samples_share_one_prefill(hf_and_league):
    _, model = hf_and_league
    prompt = prompts_of([30], model.args.vocab_size)[0]
    eng = engine(model, max_running_requests=4)
    outs = eng.generate([prompt], SamplingParams(max_new_tokens=10, temperature=1.0, seed=100), n=4)
    assert [o.rid for o in outs] == ["req-0-0", "req-0-1", "req-0-2", "req-0-3"]
    assert eng.stats.prompt_tokens == 30  # one prefill for the group
    for i, out in enumerate(outs):
        alone = engine(model).generate([prompt], SamplingParams(max_new_tokens=10, temperature=1.0, seed=100 + i))[0]
        assert out.output_ids == alone.output_ids
    assert len({tuple(o.output_ids) for o in outs}) > 1


def test_requests_wait_for_slots_and_all_finish(hf_and_league):
    _, model = hf_and_league
    prompts = prompts_of([3, 4, 5, 6, 7, 8, 9], model.args.vocab_size)
    eng = engine(model, num_slots=2, max_running_requests=2)
    outs = eng.generate(prompts, SamplingParams(max_new_tokens=6, temperature=0), n=1)
    assert [len(o.output_ids) for o in outs] == [6] * 7
    assert eng.scheduler.pool.num_free == 2


@pytest.mark.parametrize(
    "spec", [{}, dict(speculative_algorithm="EAGLE", speculative_num_steps=2)], ids=["plain", "spec"]
)
def test_admission_batch_makes_fewer_prefills_and_the_same_tokens(hf_and_league, spec):
    """9 requests through 3 slots, finishing at different steps: with ``admission_batch`` 3, waiting requests are
    admitted three at a time (3 prefills: the first wave, then two more) instead of as each slot frees, and every
    request's greedy tokens stay the same."""
    _, model = hf_and_league
    prompts = prompts_of([3, 5, 4, 6, 3, 5, 4, 6, 3], model.args.vocab_size, seed=7)
    lengths = [4, 9, 14, 5, 11, 8, 6, 13, 10]
    params = [SamplingParams(max_new_tokens=n, temperature=0) for n in lengths]
    outputs, prefills = [], []
    for admission_batch in (1, 3):
        eng = engine(model, num_slots=3, max_num_batched_tokens=64, admission_batch=admission_batch, **spec)
        outputs.append([o.output_ids for o in eng.generate(prompts, params)])
        prefills.append(eng.stats.prefill_passes)
        assert eng.scheduler.pool.num_free == 3 and not eng.has_unfinished()
    assert outputs[0] == outputs[1] and [len(ids) for ids in outputs[1]] == lengths
    assert prefills[1] == 3 and prefills[0] > 3


def test_admission_batch_admits_what_waits_when_fewer_wait():
    """With fewer requests waiting than ``admission_batch``, they are admitted once they all fit (no deadlock)."""
    model = Transformer(ModelArgs.from_hf_config(hf_text_config("gqa2_interval2").to_dict())).eval()
    model.init_weights(seed=1)
    prompts = prompts_of([3, 4, 5], model.args.vocab_size, seed=8)
    eng = engine(model, num_slots=2, max_running_requests=2, admission_batch=8)
    outs = eng.generate(prompts, [SamplingParams(max_new_tokens=n, temperature=0) for n in (3, 6, 4)])
    assert [len(o.output_ids) for o in outs] == [3, 6, 4] and eng.stats.prefill_passes == 2
    with pytest.raises(ValueError, match="admission_batch"):
        EngineConfig(admission_batch=0)


def test_speculative_max_batch_decodes_large_steps_without_drafts(hf_and_league):
    """6 requests through 3 slots, speculating only in steps of at most 2 requests: steps switch between drafting
    and plain decoding as requests join and leave, and the greedy tokens stay those of decoding without drafts."""
    _, model = hf_and_league
    prompts = prompts_of([5, 40, 17, 2, 33, 9], model.args.vocab_size)
    lengths = [12, 20, 7, 16, 3, 20]
    params = [SamplingParams(max_new_tokens=n, temperature=0) for n in lengths]
    expected = [o.output_ids for o in engine(model).generate(prompts, params)]
    eng = engine(model, speculative_algorithm="EAGLE", speculative_num_steps=2, speculative_max_batch=2)
    assert [o.output_ids for o in eng.generate(prompts, params)] == expected
    plain = eng.stats.forward_passes - eng.stats.prefill_passes - eng.stats.verify_passes
    assert eng.stats.verify_passes > 0 and plain > 0


def test_steps_without_drafts_keep_the_mtp_cache_whole(hf_and_league):
    """Two requests in two slots, speculating only alone: the longer one decodes without drafts while the other
    runs, then drafts. Its MTP layer's cached keys and values then equal those of running the MTP layer over its
    whole sequence at once (the plain steps fed it every token), and its greedy tokens equal those of an engine
    that drafted throughout."""
    from league.engine.cache import allocate_cache, slot_rows

    _, model = hf_and_league
    prompts = prompts_of([6, 9], model.args.vocab_size, seed=3)
    params = [SamplingParams(max_new_tokens=n, temperature=0) for n in (8, 30)]
    spec = dict(speculative_algorithm="EAGLE", speculative_num_steps=2, num_slots=2, max_running_requests=2)
    eng = engine(model, **spec, speculative_max_batch=1)
    long_out = eng.generate(prompts, params)[1]
    assert eng.stats.verify_passes > 0
    # the long request took slot 1; its MTP rows cover positions up to where its last verify started
    seq = torch.tensor(prompts[1] + long_out.output_ids)
    ref = allocate_cache(model.args, num_slots=1, max_len=64, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        hidden = model(seq, ForwardBatch.packed([len(seq)], cache_lens=[0], slots=[0]), ref)
        batch = ForwardBatch.packed([len(seq) - 1], cache_lens=[0], slots=[0])
        model.mtp_forward(hidden[:-1], seq[1:], batch, ref)
    checked = len(prompts[1]) + 8 + 4  # past the plain steps (while the short request ran) and a few verifies
    for got, want in zip(eng.runner.cache.mtp_layers, ref.mtp_layers):
        for mine, theirs in ((got.k, want.k), (got.v, want.v)):
            rows = slot_rows(mine, got.pages, 1, 0, checked)
            assert (rows - theirs[0, :checked]).abs().max().item() < 1e-4
    always = engine(model, **spec)
    assert always.generate(prompts, params)[1].output_ids == long_out.output_ids


class EagerGraph:
    """Stands in for a captured CUDA graph on the CPU: a replay runs the captured function."""

    def __init__(self, piece):
        self.replay = piece


def capture_eagerly(pieces, pool=None):
    return [EagerGraph(piece) for piece in pieces], pool


@pytest.mark.parametrize(
    "spec",
    [{}, dict(speculative_num_steps=2), dict(speculative_num_steps=2, speculative_max_batch=2)],
    ids=["plain", "spec", "spec_max_batch"],
)
def test_graph_paths_give_the_tokens_of_eager_steps(hf_and_league, monkeypatch, spec):
    """The engine's CUDA-graph code (static buffers, batches padded to a captured size with scratch-slot rows,
    decode graphs handing back logits and hidden states, speculative steps replayed from their pieces) run on the
    CPU with each "graph" replaying its function: the greedy tokens equal those of the eager engine."""
    from league.engine import cuda_graph, speculative
    from league.engine import model_runner as runner_module

    _, model = hf_and_league
    prompts = prompts_of([5, 40, 17, 2, 33, 9], model.args.vocab_size)
    params = [SamplingParams(max_new_tokens=n, temperature=0) for n in [12, 20, 7, 16, 3, 20]]
    config = dict(speculative_algorithm="EAGLE", **spec) if spec else {}
    expected = [o.output_ids for o in engine(model, **config).generate(prompts, params)]
    monkeypatch.setattr(runner_module, "graphs_apply", lambda *args: True)
    monkeypatch.setattr(cuda_graph, "capture_pieces", capture_eagerly)
    monkeypatch.setattr(speculative, "capture_pieces", capture_eagerly)
    eng = engine(model, cuda_graph_bs=[2, 4], **config)  # 3 running: padded to 4; 1 or 2: run in 2
    assert eng.runner.use_graphs
    assert [o.output_ids for o in eng.generate(prompts, params)] == expected
    if not spec or "speculative_max_batch" in spec:  # steps without drafts replayed the decode graphs
        assert eng.runner.graphs is not None and sorted(eng.runner.graphs.graphs) == [2, 4]
    if spec:
        assert sorted(eng.runner.spec_step.graphs) == [2]  # the step captures sizes up to its 3 rows


def test_overlap_schedule_gives_the_same_outputs(hf_and_league):
    """Reading a step's tokens back after launching the next one changes nothing: stop tokens (whose extra row in
    the next step is dropped), length limits, n samples, seeded sampling and greedy rows in one batch, requests
    waiting for slots."""
    _, model = hf_and_league
    prompts = prompts_of([5, 12, 3, 9, 7], model.args.vocab_size, seed=4)
    free = engine(model).generate(prompts[:1], SamplingParams(max_new_tokens=30, temperature=0))[0].output_ids
    params = [
        SamplingParams(max_new_tokens=30, temperature=0, stop_token_ids=[free[6]]),
        SamplingParams(max_new_tokens=9, temperature=1.0, seed=11),
        SamplingParams(max_new_tokens=1, temperature=0),
        SamplingParams(max_new_tokens=14, temperature=0.7, top_k=20, seed=5),
        SamplingParams(max_new_tokens=20, temperature=1.0, seed=2, stop_token_ids=[free[2], free[9]]),
    ]
    runs, logprobs = {}, {}
    for overlap in (False, True):
        eng = engine(model, num_slots=4, max_running_requests=4, disable_overlap_schedule=not overlap)
        outs = eng.generate(prompts, params, n=2)
        runs[overlap] = [(o.output_ids, o.finish_reason) for o in outs]
        logprobs[overlap] = torch.tensor([x for o in outs for x in o.output_logprobs])
        assert eng.scheduler.pool.num_free == 4 and not eng.has_unfinished()
    assert runs[True] == runs[False]
    # the batches differ (a dropped row), so matmuls may round differently in the last bit
    torch.testing.assert_close(logprobs[True], logprobs[False], rtol=0, atol=1e-5)
    assert runs[True][0][1] == "stop" and len(runs[True][0][0]) == free.index(free[6]) + 1
    assert {r[1] for r in runs[True]} == {"stop", "length"}


def test_overlap_schedule_reads_a_step_back_one_step_later(hf_and_league):
    _, model = hf_and_league
    eng = engine(model)
    eng.add_request(prompts_of([6], model.args.vocab_size)[0], SamplingParams(max_new_tokens=5, temperature=0))
    eng.step()  # prefill and the first token, then the first decode step is launched
    request = eng.scheduler.running[0]
    assert len(request.output_ids) == 1 and eng.in_flight is not None and eng.in_flight.reqs == [request]
    eng.step()
    assert len(request.output_ids) == 2
    outs = []
    while eng.has_unfinished():
        outs += eng.step()
    assert len(outs[0].output_ids) == 5 and outs[0].finish_reason == "length"


def test_abort_ends_a_running_request(hf_and_league):
    _, model = hf_and_league
    eng = engine(model)
    [rid] = eng.add_request(prompts_of([5], model.args.vocab_size)[0], SamplingParams(max_new_tokens=100))
    for _ in range(4):
        assert eng.step() == []
    assert eng.abort(rid)
    [out] = eng.step()
    assert out.finish_reason == "abort" and 1 <= len(out.output_ids) < 100
    assert not eng.has_unfinished()


def test_stop_token_and_eos(hf_and_league):
    _, model = hf_and_league
    prompt = prompts_of([8], model.args.vocab_size)[0]
    free = engine(model).generate([prompt], SamplingParams(max_new_tokens=20, temperature=0))[0].output_ids
    stop_at = free[5]
    first = free.index(stop_at)
    out = engine(model).generate([prompt], SamplingParams(max_new_tokens=20, temperature=0, stop_token_ids=[stop_at]))[
        0
    ]
    assert out.output_ids == free[: first + 1] and out.finish_reason == "stop"
    eng = engine(model)
    eng.eos_ids = {stop_at}
    assert eng.generate([prompt], SamplingParams(max_new_tokens=20, temperature=0))[0].output_ids == free[: first + 1]
    ignoring = eng.generate([prompt], SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True))[0]
    assert ignoring.output_ids == free


@pytest.mark.parametrize(
    "bad, field",
    [
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(temperature=-0.5), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_k=0), "top_k"),
        (dict(min_p=1.5), "min_p"),
        (dict(top_k=True), "top_k"),
        (dict(max_new_tokens=False), "max_new_tokens"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(seed=2**63), "seed"),
        (dict(seed=True), "seed"),
        (dict(stop_token_ids=[False]), "stop_token_ids"),
        (dict(ignore_eos="yes"), "ignore_eos"),
        (dict(presence_penalty=2.5), "presence_penalty"),
        (dict(repetition_penalty=0), "repetition_penalty"),
        (dict(min_new_tokens=1.5), "min_new_tokens"),
    ],
)
def test_bad_sampling_params_name_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**bad)


def test_bad_prompts_are_rejected(hf_and_league):
    _, model = hf_and_league
    eng = engine(model)
    for bad in ([1, 2, model.args.vocab_size], [1, True], [1, 2.0], [-1]):
        with pytest.raises(ValueError, match="integer token ids in"):
            eng.add_request(bad)
    with pytest.raises(ValueError, match="context length"):
        eng.add_request([1] * 128)
    with pytest.raises(ValueError, match="non-empty"):
        eng.add_request([])
    with pytest.raises(ValueError, match="seed"):
        eng.add_request([1, 2], SamplingParams(seed=2**63 - 2), n=3)


def test_batch_invariant_mode_is_bitwise():
    """With batch_invariant numerics, a seeded request's log-probs are bitwise the same alone or in a
    batch, with or without speculation, and equal a teacher-forced forward of the same tokens."""
    model = tiny_model_f32()
    prompts = prompts_of([5, 17, 33, 2, 9], model.args.vocab_size)
    params = SamplingParams(max_new_tokens=24, temperature=1.0, seed=7)
    results = []
    for spec in ({}, dict(speculative_algorithm="EAGLE", speculative_num_steps=2)):
        alone = engine(model, numerics="batch_invariant", **spec).generate([prompts[1]], params)[0]
        mixed = engine(model, numerics="batch_invariant", max_running_requests=5, **spec).generate(prompts, params)[1]
        assert alone.output_ids == mixed.output_ids and alone.output_logprobs == mixed.output_logprobs
        results.append(alone)
    full = torch.tensor(prompts[1] + results[0].output_ids)
    with torch.no_grad():
        hidden = model(full, ForwardBatch.packed([len(full)], numerics=BATCH_INVARIANT))
        scored = token_logprobs(
            model.logits(hidden, BATCH_INVARIANT)[len(prompts[1]) - 1 : -1], torch.tensor(results[0].output_ids)
        )
    assert scored.tolist() == results[0].output_logprobs


def tiny_model_f32():
    from tests.models.test_forms import tiny_model

    return tiny_model("gqa2_interval2").float()


@pytest.mark.parametrize("spec", [{}, dict(speculative_algorithm="EAGLE", speculative_num_steps=2)])
def test_bf16_recurrent_states_stay_close_to_fp32(spec):
    """`mamba_ssm_dtype="bfloat16"` halves the GDN state cache; decoding stays close to the fp32-state run."""
    model = tiny_model_f32()
    prompts = prompts_of([5, 17, 33], model.args.vocab_size)
    params = SamplingParams(max_new_tokens=12, temperature=0)
    half = engine(model, mamba_ssm_dtype="bfloat16", **spec)
    assert all(layer.ssm.dtype == torch.bfloat16 for layer in half.runner.cache.layers if hasattr(layer, "ssm"))
    low, full = half.generate(prompts, params), engine(model, **spec).generate(prompts, params)
    diffs = [abs(a - b) for lo, fu in zip(low, full) for a, b in zip(lo.output_logprobs, fu.output_logprobs)]
    assert [o.output_ids for o in low] == [o.output_ids for o in full]
    assert 0 < max(diffs) < 2e-2


def test_unknown_state_dtype_is_refused():
    with pytest.raises(ValueError, match="mamba_ssm_dtype"):
        EngineConfig(mamba_ssm_dtype="float16")
    with pytest.raises(ValueError, match="batch_invariant"):  # the trainer keeps fp32 states
        EngineConfig(mamba_ssm_dtype="bfloat16", numerics="batch_invariant")


def test_cuda_graph_sizes_without_graphs_warn():
    with pytest.warns(UserWarning, match="cuda_graph_bs is ignored"):
        engine(tiny_model_f32(), cuda_graph_bs=[1, 2])


def test_graph_pieces_cover_each_layer_once_in_order():
    from league.engine.cuda_graph import layer_runs

    assert layer_runs(40) == [range(0, 2), range(2, 6), range(6, 14), range(14, 30), range(30, 40)]
    for num_layers in range(1, 70):
        runs = layer_runs(num_layers)
        assert [i for run in runs for i in run] == list(range(num_layers))
        assert all(len(run) > 0 for run in runs)
