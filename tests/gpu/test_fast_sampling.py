"""The sampling kernel on the GPU against the torch reference (skipped without CUDA).

Run on the GPU machine with ``python -m pytest tests/gpu -q``.
"""

import pytest
import torch

from league.ops.sampling import sample_logits, sample_logits_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize(
    "num_rows,vocab,dtype", [(64, 248_320, torch.bfloat16), (5, 1000, torch.float32), (1, 17, torch.bfloat16)]
)
def test_kernel_draws_the_reference_tokens(num_rows, vocab, dtype):
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(num_rows, vocab, generator=gen) * 4).to(dtype).cuda()
    seeds = torch.randint(0, 2**62, (num_rows,), generator=gen).cuda()
    positions = torch.randint(0, 4096, (num_rows,), generator=gen).cuda()
    exclude = torch.where(torch.arange(num_rows) % 2 == 0, -1, torch.arange(num_rows) % vocab).cuda()
    tokens, lse, coins = sample_logits(logits, 0.9, seeds, positions, exclude)
    ref_tokens, ref_lse, ref_coins = sample_logits_reference(logits, 0.9, seeds, positions, exclude)
    assert tokens.tolist() == ref_tokens.tolist()
    assert torch.equal(coins, ref_coins)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-6, atol=1e-5)
    assert not (tokens == exclude).any()
