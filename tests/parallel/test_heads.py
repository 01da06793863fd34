"""Head shares in one process: the mixers' outputs summed over the shares equal the whole mixer's (fp64), for
the splits the real models need (the 35B model's 2 KV heads over 4 ranks), and bad splits are refused."""

import pytest
import torch
from torch.func import functional_call

from league.models.qwen3_5_moe import ModelArgs
from league.models.qwen3_5_moe.batch import ForwardBatch
from league.models.qwen3_5_moe.gated_deltanet import GatedDeltaNet
from league.models.qwen3_5_moe.model import GatedAttention
from league.models.qwen3_5_moe.presets import TINY
from league.parallel.heads import attention_share, check_head_split, gdn_share, padded_batch, share_of

ARGS = TINY.replace(
    dim=32,
    num_heads=8,
    num_kv_heads=2,
    head_dim=8,
    linear_num_key_heads=4,
    linear_num_value_heads=8,
    linear_key_head_dim=8,
    linear_value_head_dim=8,
)


def randomized(module: torch.nn.Module) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.2)
    return module


def summed_over_shares(module, make_share, build, size, inputs):
    total = 0
    for rank in range(size):
        share = make_share(ARGS, rank, size)
        weights = {name: share_of(share, name, p) for name, p in module.named_parameters()}
        with torch.device("meta"):
            skeleton = build(share.args)
        total = total + functional_call(skeleton, weights, inputs)
    return total


@pytest.mark.parametrize("size", [1, 2, 4])
def test_gdn_shares_sum_to_the_whole_mixer(size):
    gdn = randomized(GatedDeltaNet(ARGS).double())
    batch = ForwardBatch.packed([5, 9, 2])
    x = torch.randn(16, ARGS.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = gdn(x, batch, None)
    got = summed_over_shares(gdn, gdn_share, GatedDeltaNet, size, (x, batch, None))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("size", [1, 2, 4, 8])
def test_attention_shares_sum_to_the_whole_mixer(size):
    """8 query heads over 2 KV heads: at 4 and 8 ranks each KV head serves several ranks."""
    attn = randomized(GatedAttention(ARGS).double())
    batch = ForwardBatch.packed([5, 9, 2])
    x = torch.randn(16, ARGS.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    from league.ops.rope import rope_cos_sin, rope_inv_freq

    rope = rope_cos_sin(batch.positions, rope_inv_freq(ARGS.rotary_dim, ARGS.rope_theta).double())
    expected = attn(x, batch, rope, None)
    got = summed_over_shares(attn, attention_share, GatedAttention, size, (x, batch, rope, None))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_the_35b_models_heads_split_over_2_4_and_8_ranks():
    args = ModelArgs()  # Qwen3.6-35B-A3B: 16 query heads over 2 KV heads, GDN 16 key / 32 value heads
    for size in (2, 4, 8):
        check_head_split(args, size)
        assert attention_share(args, size - 1, size).args.num_kv_heads == 1
    assert attention_share(args, 0, 2).args.num_heads == 8


@pytest.mark.parametrize(
    "changes,size,message",
    [
        ({"num_heads": 6, "num_kv_heads": 2}, 4, "6 attention query heads"),
        ({"linear_num_key_heads": 2, "linear_num_value_heads": 4}, 4, "2 GDN key heads"),
        ({"num_heads": 12, "num_kv_heads": 3}, 2, "3 KV heads"),
    ],
)
def test_bad_head_splits_are_refused(changes, size, message):
    with pytest.raises(ValueError, match=message):
        check_head_split(ARGS.replace(**changes), size)


def test_padded_batch_adds_one_sequence_of_the_missing_rows():
    batch = ForwardBatch.packed([5, 9, 2])
    padded, pad = padded_batch(batch, 16, 3)
    assert pad == 2 and padded.seq_lens == [5, 9, 2, 2]
    same, none = padded_batch(batch, 16, 4)
    assert none == 0 and same.seq_lens == [5, 9, 2]
