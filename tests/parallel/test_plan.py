"""The memory plan (``parallel/plan.py``): its shards are those a real launch holds (world 4, gloo, every rank), and
equal the numbers computed by hand from the model's shapes at dp4, ep2, ep4 and tp2 ep2; the activation estimate
is its documented formula; ``league train --dry-run`` prints the plan of the 35B recipe at 8 ranks."""

import inspect
import math

import pytest
import torch
from typer.testing import CliRunner

from league.cli import app
from league.engine.cache import cache_bytes_per_slot
from league.models.qwen3_5_moe import Transformer
from league.models.qwen3_5_moe.presets import PRESETS
from league.ops.logprob import linear_token_logprobs
from league.parallel.activations import LOGPROB_CHUNK_ROWS, activation_estimate
from league.parallel.dims import ParallelConfig
from league.parallel.plan import (
    GiB,
    PlanSettings,
    fake_process_group,
    local_numels,
    placed_policy,
    plan_memory,
)
from tests.parallel.checks import ARGS
from tests.parallel.checks_plan import LAYOUTS


def settings(dtype: torch.dtype = torch.float32, **changes) -> PlanSettings:
    values = dict(
        dtype=dtype,
        recompute=True,
        max_tokens=64,
        optimizer_cpu_offload=True,
        kl_reference=True,
        engine_slots=8,
        engine_slots_fixed=False,
        engine_min_slots=2,
        engine_slot_len=128,
        engine_state_dtype=torch.float32,
        mem_fraction_static=0.7,
        ranks_per_node=4,
    )
    return PlanSettings(**{**values, **changes})


def plan_of(args, world: int, dtype: torch.dtype = torch.float32, **sizes):
    return plan_memory(args, ParallelConfig(**sizes).resolve(world), settings(dtype))


@pytest.mark.xdist_group("world4")
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_the_plan_counts_the_shards_of_a_real_launch(world4, layout):
    """Each rank of the launch (real tensors, placed by the same code over gloo): its local elements are the plan's
    count for that rank, the storage FSDP2 allocated is the plan's padded shards on every rank, and the optimizer's
    fp32 state is the plan's (16 bytes an element: master, its gradient, two moments) on the largest rank."""
    ranks = [result[layout] for result in world4["shard_sizes"]]
    plan = plan_of(ARGS, 4, **LAYOUTS[layout])
    assert plan.counts.local == [r["local"] for r in ranks]
    assert all(r["storage_bytes"] == plan.params for r in ranks)
    assert all(r["masters"] == r["master_grads"] == r["local"] for r in ranks)
    assert plan.optimizer == 16 * max(r["masters"] for r in ranks)


def expected_local(name: str, shape: torch.Size, rank: int, world: int, ep: int) -> int:
    """By hand: rank ``rank``'s elements of a parameter. Dense weights: FSDP2 splits dim 0 over all ranks as
    ``torch.chunk`` does (ceil-sized pieces, the last ones smaller or empty); routed experts: rank r holds the
    experts of block r % ep, split the same way over the world / ep ranks holding that block (r // ep)."""
    rest = math.prod(shape[1:])
    if ".moe.experts." in name:
        rows, parts, part = shape[0] // ep, world // ep, rank // ep
    else:
        rows, parts, part = shape[0], world, rank
    piece = -(-rows // parts)
    return max(0, min(piece, rows - part * piece)) * rest


# vocabulary and dims that do not divide 4, so that some shards are uneven and padded
UNEVEN = ARGS.replace(vocab_size=98, mtp_num_layers=1)


@pytest.mark.parametrize("sizes", [{}, {"ep": 2}, {"ep": 4}, {"tp": 2, "ep": 2}], ids=["dp4", "ep2", "ep4", "tp2_ep2"])
def test_shards_and_optimizer_match_the_shapes_by_hand(sizes):
    world, ep = 4, sizes.get("ep", 1)
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in Transformer(UNEVEN).named_parameters()}
    per_rank = [sum(expected_local(n, s, r, world, ep) for n, s in shapes.items()) for r in range(world)]
    padded = sum(max(expected_local(n, s, r, world, ep) for r in range(world)) for n, s in shapes.items())
    experts = sum(math.prod(s) for n, s in shapes.items() if ".moe.experts." in n)
    plan = plan_of(UNEVEN, world, torch.bfloat16, **sizes)
    assert plan.counts.local == per_rank and per_rank[0] > per_rank[-1]  # the embedding's 98 rows: 25, 25, 25, 23
    assert plan.counts.local_experts == [experts // world] * world  # the experts split evenly: experts / ep / edp
    assert plan.params == plan.grads == plan.reference == 2 * padded  # bf16
    assert plan.optimizer == 16 * per_rank[0]  # the largest rank, fp32 master + gradient + Adam's m and v
    assert plan.replica == 2 * sum(math.prod(s) for s in shapes.values())
    assert plan.startup == 3 * plan.replica  # built whole, copied for the engine and the reference


def test_the_35b_model_at_tp1_ep8_by_hand():
    """The recipe's layout: 32 of 256 experts a layer on each rank, the dense weights over all 8."""
    args = PRESETS["qwen3.6-35b-a3b"]
    plan = plan_of(args, 8, torch.bfloat16, ep=8)
    layers = args.num_layers + args.mtp_num_layers
    expert = 2 * args.moe_intermediate_size * args.dim + args.dim * args.moe_intermediate_size
    assert plan.counts.local_experts == [layers * 32 * expert] * 8
    assert plan.counts.expert_numel == layers * 256 * expert
    assert abs(plan.replica / GiB - 66.13) < 0.01 and abs(plan.params / GiB - 8.27) < 0.01
    # the root (embedding, output head, final norm) is gathered whole; the largest layer with its 32 experts
    assert plan.counts.root_gathered == 2 * args.vocab_size * args.dim + args.dim
    assert plan.counts.layer_gathered > 32 * expert


def test_the_engine_cache_fills_what_is_left_under_mem_fraction_static():
    """The 35B model at TP1 EP8 on an H200 (139 GiB): a cache slot of 5,123 tokens (11 attention layers' KV, 30 GDN
    layers' conv window and fp32 state), as many as fit under 0.7 of the GPU beside what is in use, then the peak."""
    args = PRESETS["qwen3.6-35b-a3b"]
    plan = plan_memory(
        args, ParallelConfig(ep=8).resolve(8), settings(torch.bfloat16, engine_slots=256, max_tokens=8192)
    )
    slot_len = 128  # settings()
    kv = 2 * slot_len * 2 * 256 * 2  # k and v, 2 KV heads of 256, bf16
    gdn = 8192 * 3 * 2 + 32 * 128 * 128 * 4  # conv window (W - 1 = 3 steps of the 8192 channels), fp32 state
    assert plan.engine_slot == 11 * kv + 30 * gdn
    in_use = plan.params + plan.reference + plan.replica  # the optimizer is on the host
    assert plan.before_engine == in_use
    fit = plan.fit("H200", 139 * GiB)
    assert fit.slots == min(256, int((0.7 * 139 * GiB - in_use) // plan.engine_slot))
    assert fit.peak == in_use + fit.slots * plan.engine_slot + plan.in_training and fit.fits is False  # start-up
    assert plan.fit("H100", 78 * GiB).slots == 0  # 0.7 x 78 GiB < what is in use


def test_local_shapes_of_rank_0_are_the_placed_ones():
    """The placement math gives rank 0 the local shards ``parallelize_qwen3_5_moe`` made (this process is rank 0)."""
    dims = ParallelConfig(tp=2, ep=2).resolve(4)
    with fake_process_group(4):
        model = placed_policy(UNEVEN, dims, torch.float32, recompute=True)
        for name, param in model.named_parameters():
            assert local_numels(param, 4)[0] == param.to_local().numel(), name


def test_the_activation_estimate_is_its_formula():
    """A GDN layer and an attention layer of a small model at 64 tokens over a group of 2 (32 rows a rank), bf16;
    the sums written out from the docstring's terms."""
    args = ARGS.replace(layer_types=["linear_attention"], num_layers=1, mtp_num_layers=1, vocab_size=100)
    estimate = activation_estimate(args, num_tokens=64, group=2, recompute=True, itemsize=2)
    rows, gathered, dim, s = 32, 64, 64, 2
    norms = 2 * rows * (dim * s + 4)
    moe = rows * ((dim + 3 * 32 + 1) * s + 4 * 8 + 2 * ((2 * dim + 3 * 32) * s + 12))
    conv, key, value = 2 * 64 + 128, 64, 128  # C = 2 Hk K + Hv V, Hk K, Hv V
    gdn = gathered * ((dim + (3 * conv + 2 * key + 3 * value + 2 * 8) // 2) * s + 8 * 8 // 2)
    attention = gathered * ((dim + 6 * 4 * 16 // 2 + 3 * 2 * 16) * s + 4 * 4 // 2)
    assert estimate.layer == norms + moe + max(gdn, attention)
    assert estimate.kept == (2 + 5) * rows * dim * s
    assert estimate.head == 64 * dim * (2 * s + 4) + 64 * 100 * (s + 8)
    assert estimate.total == estimate.kept + 2 * estimate.layer + estimate.head
    whole = activation_estimate(args, num_tokens=64, group=2, recompute=False, itemsize=2)
    assert whole.kept == norms + moe + gdn + norms + moe + attention  # every layer's saved tensors, none recomputed


def test_the_logprob_chunk_is_the_fused_log_probs():
    assert inspect.signature(linear_token_logprobs).parameters["chunk_size"].default == LOGPROB_CHUNK_ROWS


def test_dry_run_prints_the_plan_of_the_35b_recipe_at_8_ranks():
    """``league train --dry-run`` at 8 ranks, TP1 EP8: the plan follows the config (no GPU, no process started),
    then the checks of this machine run as before."""
    args = ["train", "--dry-run", "--recipe", "qwen3_6_35b_a3b_mtp", "--nproc-per-node", "8", "--ep", "8"]
    result = CliRunner().invoke(app, args)
    plan = result.stdout[result.stdout.index("memory plan:") :]
    assert plan.startswith("memory plan: 8 ranks, tp 1 cp 1 ep 8 (dp 8, edp 1); policy ")
    assert "35.51B parameters (33.02B in routed experts), bfloat16" in plan
    lines = plan.splitlines()

    def line(words: str) -> str:
        return next(line for line in lines if words in line)

    assert "8.27  4.438B elements: 4.127B of routed experts (32 of 256 a layer)" in line("parameters, FSDP2 shards")
    # the recipe's engine spans the 8 ranks with its experts split 8 ways, as the trainer's: its 32 experts of every
    # layer are the trainer's shards, so each rank adds the dense part alone (35.51B - 33.02B = 2.487B in bf16)
    engine = "4.63  this rank's part of an engine over 8 ranks (heads over tp 1, experts over ep 8); its experts are"
    assert engine in line("GPU  engine weights")
    assert "66.13  16 B an element of the rank's shards" in line("host optimizer")
    assert "host: the optimizer of a node of 8 ranks: 529.08 GiB" in plan
    assert "H200 141GB, 139 GiB usable: training fits (peak 89.02 GiB with 256 cache slots); start-up 136.90" in plan
    assert "H100 80GB, 78 GiB usable: training does not fit (peak 78.47 GiB with 193 cache slots" in plan
    assert "engine prefix cache: 16 GDN state snapshots 0.96 GiB (--max-mamba-cache-size)" in plan


def test_an_engine_laid_out_as_the_trainer_adds_no_experts():
    """At ep 4 over 4 ranks (FSDP2's expert unit over one rank) an engine at ep 4 reads the trainer's expert shards:
    its part is the rest of the model; at ep 2 (experts split over 2 edp ranks by FSDP2) it holds its own blocks."""
    with torch.device("meta"):
        params = dict(Transformer(UNEVEN).named_parameters())
    dense = sum(p.numel() for n, p in params.items() if ".experts." not in n)
    experts = sum(p.numel() for n, p in params.items() if ".experts." in n)
    alike = plan_memory(UNEVEN, ParallelConfig(ep=4).resolve(4), settings(engine_ep=4))
    assert alike.replica == dense * 4
    apart = plan_memory(UNEVEN, ParallelConfig(ep=2).resolve(4), settings(engine_ep=2))
    assert apart.replica == (dense + experts // 2) * 4


@pytest.mark.parametrize(("tp", "ep"), [(1, 1), (1, 2), (2, 1), (2, 2)])
def test_the_engine_part_and_cache_slot_by_hand(tp, ep):
    """A rank's part of an engine laid out tp x ep holds 1/ep of the experts, its heads' rows of the mixers'
    projections, gates, conv and per-head parameters, and the rest whole (``wo`` included); its cache slot holds
    its heads' keys, values, conv windows and states."""
    dims = ParallelConfig(ep=2).resolve(4)
    plan = plan_memory(UNEVEN, dims, settings(engine_tp=tp, engine_ep=ep))
    with torch.device("meta"):
        params = dict(Transformer(UNEVEN).named_parameters())
    per_head = ("w_qkv", "conv_weight", "w_z", "w_b", "w_a", "dt_bias", "A_log", "wq", "wk", "wv")
    expected = 0
    for name, p in params.items():
        if ".experts." in name:
            expected += p.numel() // ep
        elif any(f".{key}" in name for key in per_head) and (".gdn." in name or ".attn." in name):
            expected += p.numel() // tp  # ARGS' head counts split evenly (4 query and KV heads, 4 and 8 GDN heads)
        else:
            expected += p.numel()
    assert plan.replica == expected * 4
    assert plan.engine_slot == cache_bytes_per_slot(
        UNEVEN.replace(
            num_heads=UNEVEN.num_heads // tp,
            num_kv_heads=UNEVEN.num_kv_heads // tp,
            linear_num_key_heads=UNEVEN.linear_num_key_heads // tp,
            linear_num_value_heads=UNEVEN.linear_num_value_heads // tp,
        ),
        128,
        torch.float32,
        torch.float32,
    )


def test_startup_from_load_holds_the_shards_beside_the_engines_copy():
    """From a DCP checkpoint (``--load``) across ranks each rank reads its shards of the policy and the reference
    into the placed (meta-built) model: nothing whole but the engine's copy."""
    dims = ParallelConfig(ep=2).resolve(4)
    built = plan_memory(UNEVEN, dims, settings(torch.bfloat16))
    loaded = plan_memory(UNEVEN, dims, settings(torch.bfloat16, sharded_load=True))
    assert built.startup == 3 * built.replica
    assert loaded.startup == loaded.replica + loaded.params + loaded.reference < built.startup
