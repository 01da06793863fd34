"""Paged KV, the prefix cache with GDN snapshots, and preemption: the radix tree by hand, and the engine's outputs
and log-probs with the cache on equal to those with it off (bitwise, under batch-invariant numerics on CPU) for
repeated prompts, multi-turn conversations, a shared system prompt, branching prefixes, speculation, eviction, the
no_buffer strategy, and a pool too small for every request (preempted requests lose nothing)."""

import pytest
import torch

from league.engine.cache import BlockPool, SlotPool
from league.engine.config import EngineConfig
from league.engine.engine import LLMEngine
from league.engine.radix import RadixCache
from league.engine.request import SamplingParams

# the radix tree by hand --------------------------------------------------------------------------------------


def tree(num_blocks=12, snapshots=(100, 101, 102), page=2):
    pool = SlotPool(num_slots=len(snapshots), first=snapshots[0])  # consecutive slots
    blocks = BlockPool(num_blocks=num_blocks)
    return RadixCache(page, blocks, pool), blocks, pool


def test_a_prefix_is_reusable_up_to_its_deepest_snapshot():
    cache, blocks, snaps = tree()
    mine = [blocks.allocate() for _ in range(3)]  # a request's blocks for 6 tokens
    assert cache.insert([1, 2, 3, 4, 5, 6], mine, snapshot=snaps.allocate())
    assert [blocks.refs[b] for b in mine] == [2, 2, 2]  # the request's and the tree's
    hit = cache.match([1, 2, 3, 4, 5, 6, 7], limit=6)
    assert (hit.length, hit.blocks, hit.snapshot, hit.keys_length) == (6, mine, 100, 6)
    # the keys match 4 tokens of another prompt, but there is no snapshot at 4: nothing reusable
    other = cache.match([1, 2, 3, 4, 9, 9, 9], limit=6)
    assert (other.length, other.snapshot, other.keys_length) == (0, None, 4)
    # the limit keeps at least the last token to run: a snapshot past it is not used
    assert cache.match([1, 2, 3, 4, 5, 6], limit=5).length == 0
    # a snapshot at the branch point (4) splits the edge; both are reusable now
    assert cache.insert([1, 2, 3, 4], mine[:2], snapshot=snaps.allocate())
    assert [blocks.refs[b] for b in mine] == [2, 2, 2]  # the split kept one reference per block
    other = cache.match([1, 2, 3, 4, 9, 9, 9], limit=6)
    assert (other.length, other.blocks, other.snapshot) == (4, mine[:2], 101)
    assert cache.match([1, 2, 3, 4, 5, 6, 7], limit=6).snapshot == 100
    # a second snapshot at the same place is given back
    extra = snaps.allocate()
    assert not cache.insert([1, 2, 3, 4], mine[:2], snapshot=extra) and extra in snaps.free


def test_eviction_drops_least_recently_used_leaves_and_blocks_live_while_a_request_holds_them():
    cache, blocks, snaps = tree(num_blocks=6)
    first = [blocks.allocate() for _ in range(2)]
    second = [blocks.allocate() for _ in range(2)]
    cache.insert([1, 2, 3, 4], first, snapshot=snaps.allocate())
    cache.insert([5, 6, 7, 8], second, snapshot=snaps.allocate())
    for b in second:  # the second request finished: only the tree holds its blocks
        blocks.release(b)
    cache.match([1, 2, 3, 4, 0], limit=4)  # the first prefix was used last
    assert blocks.num_free == 2
    cache.evict(blocks=4)  # the least recently used leaf goes: the second prefix
    assert blocks.num_free == 4 and cache.match([5, 6, 7, 8, 0], limit=4).length == 0
    assert cache.match([1, 2, 3, 4, 0], limit=4).length == 4 and snaps.num_free == 2
    cache.evict(blocks=6)  # the first prefix goes too, but its blocks stay with the request that holds them
    assert blocks.num_free == 4 and [blocks.refs[b] for b in first] == [1, 1] and snaps.num_free == 3
    cache.insert([1, 2, 3, 4], first, snapshot=None)
    cache.flush()
    assert [blocks.refs[b] for b in first] == [1, 1] and cache.num_blocks == 0


# the engine, cache on and off --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    from tests.models.test_forms import tiny_model

    return tiny_model("gqa2_interval2").float()


def engine(model, **kw):
    config = dict(
        max_running_requests=4,
        max_num_batched_tokens=64,
        context_length=96,
        numerics="batch_invariant",
        page_size=4,
        mamba_track_interval=8,
        max_mamba_cache_size=32,
    )
    eng = LLMEngine(model, EngineConfig(**{**config, **kw}))
    eng.eos_ids = set()
    return eng


def tokens(n, seed):
    return torch.randint(0, 96, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def results(outs):
    return [(o.output_ids, o.output_logprobs) for o in outs]


def both(model, waves, params, **kw):
    """Each wave of prompts generated in turn by one engine with the prefix cache and one without: the outputs of
    both, and the cached engine's outputs and metrics."""
    cached, plain = engine(model, **kw), engine(model, disable_radix_cache=True, **kw)
    got, want = [], []
    for prompts in waves:
        prompts = prompts(got) if callable(prompts) else prompts
        outs = cached.generate(prompts, params)
        got.append(outs)
        want.append(plain.generate(prompts, params))
    assert [results(w) for w in got] == [results(w) for w in want]
    return got, cached.cache_metrics()


GREEDY = SamplingParams(max_new_tokens=14, temperature=0)
SEEDED = SamplingParams(max_new_tokens=14, temperature=1.0, seed=7)
SPEC = dict(speculative_algorithm="EAGLE", speculative_num_steps=2)


@pytest.mark.parametrize("spec", [{}, SPEC], ids=["plain", "speculative"])
@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_repeated_prompts(model, spec, params):
    prompts = [tokens(21, 1), tokens(30, 2)]
    waves, metrics = both(model, [prompts, prompts, prompts], params, **spec)
    # the prefill stopped at the last multiple of the interval before each prompt's last token to snapshot there
    assert [o.cached_tokens for o in waves[1]] == [16, 24]
    # and the second stopped where the keys stopped matching (the whole blocks of the prompt) to snapshot there
    assert [o.cached_tokens for o in waves[2]] == [20, 28]
    assert metrics["cache_hit_rate"] == pytest.approx(4 / 6)


@pytest.mark.parametrize("spec", [{}, SPEC], ids=["plain", "speculative"])
def test_multi_turn_conversation(model, spec):
    """Each turn resends the conversation so far (prompt, answer) with a new message."""

    def turn(i):
        def prompts(previous):
            if not previous:
                return [tokens(9, 10)]
            last = previous[-1][0]
            return [last.prompt_ids + last.output_ids + tokens(5, 10 + i)]

        return prompts

    waves, _ = both(model, [turn(i) for i in range(4)], GREEDY, **spec)
    cached = [w[0].cached_tokens for w in waves]
    assert cached[0] == 0 and all(c > 0 for c in cached[1:])
    # decoding snapshots every 8 tokens (speculating: part-way through the verify that passes a multiple of 8): a
    # turn reuses all but the last few tokens of the one before
    for i in range(1, 4):
        before = len(waves[i - 1][0].prompt_ids) + len(waves[i - 1][0].output_ids) - 1
        assert cached[i] == before // 8 * 8, (i, cached, before)


@pytest.mark.parametrize("spec", [{}, SPEC], ids=["plain", "speculative"])
def test_shared_system_prompt_and_branching_prefixes(model, spec):
    system = tokens(22, 20)
    questions = [system + tokens(4 + i, 30 + i) for i in range(4)]
    waves, _ = both(model, [[q] for q in questions], GREEDY, **spec)
    cached = [w[0].cached_tokens for w in waves]
    # the first leaves a snapshot past the system prompt (at 24); the second finds the keys up to 20 (whole blocks
    # of the system prompt) but no snapshot, and stops its prefill there to leave one; the others resume from it
    assert cached == [0, 0, 20, 20]
    # branches off a branch: the third question again, continued two ways
    third = questions[2]
    waves, _ = both(model, [[third], [third + tokens(9, 40)], [third + tokens(9, 41)]], GREEDY, **spec)
    # a prompt ending at a block boundary leaves a snapshot there (28; a speculating engine hands it to the cache
    # once its first draft has computed the MTP row of the prompt's last position)
    assert [w[0].cached_tokens for w in waves] == [0, 28, 28]


def test_many_at_once_and_n_samples_share_the_prompt(model):
    """A batch admitted together (nothing cached yet), and GRPO-style groups: n samples share the prompt's blocks."""
    prompts = [tokens(17, 50), tokens(33, 51), tokens(17, 50)]
    cached, plain = engine(model), engine(model, disable_radix_cache=True)
    for _ in range(2):
        got, want = cached.generate(prompts, SEEDED, n=2), plain.generate(prompts, SEEDED, n=2)
        assert results(got) == results(want)
    assert all(o.cached_tokens == 16 for o in got[:2]) and all(o.cached_tokens == 32 for o in got[2:4])


@pytest.mark.parametrize("spec", [{}, SPEC], ids=["plain", "speculative"])
def test_eviction_under_a_small_pool(model, spec):
    """Two snapshots and a pool of little more than one request's blocks: the cache evicts as requests need
    blocks and snapshot slots, and the outputs stay the same."""
    prompts = [[tokens(20, 60 + i)] for i in (0, 0, 1, 1, 2, 2, 0, 3, 3)]
    small = dict(max_total_tokens=160, max_mamba_cache_size=2, max_running_requests=2)
    waves, metrics = both(model, prompts, GREEDY, **small, **spec)
    assert metrics["evicted_blocks"] > 0 and metrics["cache_snapshots"] <= 2
    assert sum(w[0].cached_tokens for w in waves) > 0


def test_no_buffer_snapshots_where_prompts_and_requests_end(model):
    conversation = [tokens(9, 70)]

    def next_turn(previous):
        last = previous[-1][0]
        return [last.prompt_ids + last.output_ids + tokens(3, len(previous))]

    waves, _ = both(
        model,
        [conversation, next_turn, next_turn, [conversation[0] + tokens(4, 99)]],
        GREEDY,
        page_size=1,
        mamba_track_interval=1,
        mamba_scheduler_strategy="no_buffer",
    )
    # each turn resumes from where the last request ended (its every token but the last); the last prompt extends
    # the first one, which left a snapshot where it ended
    expected = [0, 9 + 13, 9 + 14 + 3 + 13, 9]
    assert [w[0].cached_tokens for w in waves] == expected


def test_weight_updates_and_flush_empty_the_cache(model):
    eng = engine(model)
    prompt = [tokens(21, 80)]
    eng.generate(prompt, GREEDY)
    assert eng.generate(prompt, GREEDY)[0].cached_tokens == 16
    eng.flush_cache()
    assert eng.cache_metrics()["cache_blocks"] == 0 and eng.generate(prompt, GREEDY)[0].cached_tokens == 0
    eng.update_weights([(name, p.detach().clone()) for name, p in model.named_parameters()][:1])
    assert eng.generate(prompt, GREEDY)[0].cached_tokens == 0
    assert eng.cache_metrics()["blocks_in_use"] == eng.cache_metrics()["cache_blocks"]  # nothing else holds blocks


# memory exhaustion -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec,overlap",
    [({}, True), ({}, False), (SPEC, False)],
    ids=["overlap", "no-overlap", "speculative"],
)
@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_preemption_loses_no_request_and_changes_no_output(model, spec, overlap, params):
    """Mixed lengths in a pool that holds about two of them at their longest: requests are preempted as the pool
    runs out, prefilled again later (prompt and outputs so far), and every output equals the roomy engine's."""
    lengths = [5, 31, 12, 22, 3, 17]
    prompts = [tokens(n, 90 + i) for i, n in enumerate(lengths)]
    params = [
        SamplingParams(max_new_tokens=20 + 7 * i % 23, temperature=params.temperature, seed=params.seed)
        for i in range(len(prompts))
    ]
    tight = engine(
        model, max_total_tokens=112, disable_overlap_schedule=not overlap, context_length=64, **spec
    ).generate(prompts, params)
    roomy = engine(model, disable_radix_cache=True, context_length=64, **spec)
    want = roomy.generate(prompts, params)
    assert results(tight) == results(want)
    assert sum(o.num_retractions for o in tight) > 0
    assert all(o.finish_reason == "length" for o in tight)


def test_the_samples_of_a_prompt_share_its_blocks(model):
    """n samples: the prompt's whole blocks are the same blocks in every sample (no copies); the block holding the
    prompt's last positions, which each sample writes its first tokens into, is copied for all but one."""
    eng = engine(model, disable_radix_cache=True, disable_overlap_schedule=True)
    eng.add_request(tokens(17, 3), SamplingParams(max_new_tokens=8, temperature=1.0, seed=1), n=4)
    eng.step()  # admission, the prefill, each sample's first decode
    samples = eng.scheduler.running
    assert len(samples) == 4 and all(len(r.output_ids) == 2 for r in samples)
    whole = {tuple(r.blocks[:4]) for r in samples}
    assert len(whole) == 1 and all(eng.scheduler.blocks.refs[b] == 4 for b in next(iter(whole)))
    assert len({r.blocks[4] for r in samples}) == 4  # position 16 onwards: a block each
    assert eng.paging.num_blocks - eng.scheduler.blocks.num_free == 4 + 4


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(mamba_scheduler_strategy="lru"), "`mamba_scheduler_strategy` 'lru': expected extra_buffer or no_buffer"),
        (dict(mamba_track_interval=10, page_size=4), "`mamba_track_interval` (10) must be a multiple of `page_size`"),
        (dict(mamba_scheduler_strategy="no_buffer"), "needs `page_size` 1 (got 16)"),
        (
            dict(mamba_scheduler_strategy="no_buffer", page_size=1, speculative_algorithm="EAGLE"),
            "speculative decoding needs `mamba_scheduler_strategy` extra_buffer",
        ),
        (dict(page_size=0), "page_size"),
        (dict(max_total_tokens=0), "max_total_tokens"),
    ],
)
def test_prefix_cache_settings_are_checked(settings, message):
    with pytest.raises(ValueError) as error:
        EngineConfig(**settings)
    assert message in str(error.value)


def test_a_pool_smaller_than_one_request_is_refused(model):
    with pytest.raises(ValueError, match="max_total_tokens 32 cannot hold one request of context_length 96"):
        engine(model, max_total_tokens=32)
    eng = engine(model, max_total_tokens=100, context_length=90, page_size=4, max_running_requests=32)  # 25 blocks
    with pytest.raises(ValueError, match=r"need 26 cache blocks of 4 tokens; the engine has 25 \(max_total_tokens\)"):
        eng.add_request(tokens(20, 1), SamplingParams(), n=21)


def check_blocks(eng) -> None:
    """Every block a running request or the prefix cache holds is held (counted once per holder) and not free; no
    request lists a block twice; every other block is free."""
    sched = eng.scheduler
    holders = [b for r in sched.running for b in r.blocks]
    if sched.radix is not None:
        holders += [b for node in sched.radix._nodes() for b in node.blocks]
    counts = {b: holders.count(b) for b in set(holders)}
    assert all(len(set(r.blocks)) == len(r.blocks) for r in sched.running)
    assert all(sched.blocks.refs[b] == n for b, n in counts.items()), "a block's references"
    free = set(sched.blocks.free)
    assert not free & counts.keys() and len(free) == len(sched.blocks.free)
    assert len(free) + len(counts) == sched.blocks.num_blocks


@pytest.mark.parametrize("spec", [{}, SPEC], ids=["plain", "speculative"])
def test_a_tight_pool_under_a_mixed_workload_keeps_its_blocks_straight(model, spec):
    """Repeated, extended and new prompts of mixed lengths arriving over time, in a pool of about two requests at
    their longest with few snapshot slots: after every step each block is held by exactly its holders (eviction,
    copy on write, preemption), and every output equals the roomy engine's."""
    base = [tokens(n, 200 + i) for i, n in enumerate([23, 9, 30, 14])]
    prompts = [base[0], base[1], base[0] + tokens(7, 300), base[2], base[0], base[3], base[2] + tokens(5, 301)]
    prompts += [base[0], base[2], base[0] + tokens(7, 300)]
    params = [SamplingParams(max_new_tokens=10 + 5 * (i % 4), temperature=1.0, seed=i) for i in range(len(prompts))]
    tight = engine(model, max_total_tokens=128, max_mamba_cache_size=3, context_length=96, **spec)
    done = {}
    for i, (p, sp) in enumerate(zip(prompts, params)):
        tight.add_request(p, sp, rid=f"r{i}")
        for _ in range(2):  # a few steps between arrivals
            done |= {o.rid: o for o in tight.step()}
            check_blocks(tight)
    while tight.has_unfinished():
        done |= {o.rid: o for o in tight.step()}
        check_blocks(tight)
    roomy = engine(model, disable_radix_cache=True, context_length=96, **spec)
    want = roomy.generate(prompts, params)
    assert results([done[f"r{i}"] for i in range(len(prompts))]) == results(want)
    metrics = tight.cache_metrics()
    assert metrics["evicted_blocks"] > 0 and metrics["cached_tokens"] > 0 and metrics["preemptions"] > 0


class Memory:
    """The scheduler's memory without a model: records the block-table rows it is given."""

    def __init__(self):
        self.rows = {}

    def copy_blocks(self, src, dst):
        pass

    def copy_states(self, src, dsts):
        pass

    def set_blocks(self, slot, blocks):
        self.rows[slot] = list(blocks)


def test_admission_does_not_reuse_a_prefix_its_eviction_dropped():
    """A request matches a cached prefix, but the blocks it needs are only free once the prefix cache is evicted,
    that prefix included: it must not keep the prefix's blocks (freed, and handed out again), and waits."""
    from league.engine.request import Request
    from league.engine.scheduler import Paging, Scheduler

    sched = Scheduler(2, 2, 64, paging=Paging(page_size=2, num_blocks=10, snapshot_slots=range(5, 8)), memory=Memory())
    running = Request(rid="r", prompt_ids=[9] * 5, params=SamplingParams(), seed=0)
    running.group = [running]
    sched.add(running)
    sched.schedule()  # admitted: 3 blocks of its own
    prefix = [sched.blocks.allocate() for _ in range(2)]
    other = [sched.blocks.allocate() for _ in range(2)]
    sched.radix.insert([1, 2, 3, 4], prefix, snapshot=sched.take_snapshot_slot())
    sched.radix.insert([7, 7, 7, 7], other, snapshot=None)
    for block in prefix + other:  # only the cache holds them now
        sched.blocks.release(block)
    assert sched.blocks.num_free == 3
    new = Request(rid="n", prompt_ids=[1, 2, 3, 4, *range(10, 21)], params=SamplingParams(), seed=0)
    new.group = [new]
    sched.add(new)
    sched.schedule()  # 15 tokens: 8 blocks, 6 beyond the cached prefix: the cache is evicted whole, 7 free
    assert new.slot is None and sched.waiting[0] is new and sched.blocks.num_free == 7
    running.finish_reason = "stop"
    sched.collect_finished()
    sched.schedule()  # room now: admitted without the prefix, every block its own
    assert new.slot is not None and new.num_prefilled == 0 and len(set(new.blocks)) == len(new.blocks) == 8


def test_a_flush_drops_the_snapshots_waiting_to_enter_the_cache(model):
    """In a speculating engine's steps without drafts (two requests over ``speculative_max_batch`` 1), a snapshot at
    a multiple of the interval waits for the next step's MTP row before entering the cache; a flush (a weight update)
    drops it with the cache, so nothing computed with the old weights enters the cache after."""
    eng = engine(model, **SPEC, speculative_max_batch=1)
    for seed in (5, 6):
        eng.add_request(tokens(9, seed), SamplingParams(max_new_tokens=20, temperature=0))
    for _ in range(20):
        eng.step()
        if eng._pending_snapshots:
            break
    waiting = [length for _, length, _ in eng._pending_snapshots]
    assert waiting and all(length % 8 == 0 for length in waiting)
    eng.flush_cache()
    assert not eng._pending_snapshots and eng.scheduler.radix.snapshots.num_free == len(eng.paging.snapshot_slots)
    eng.step()
    assert eng.cache_metrics()["cache_snapshots"] == 0
