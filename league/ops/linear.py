"""Linear layers, and a batch-invariant form of them.

A BLAS matmul may pick its kernel (and so its summation order) by the number of rows, so the same
row can round differently in a batch of 1 and a batch of 100. The batch-invariant form computes each
output row as an elementwise product summed over the input dim, 16 rows at a time, so a row's result
never depends on which rows share its batch: a token's logits are then bitwise the same in prefill,
decode, verify and training. Slower; meant for exact checks and small models.

Legend: M rows, K input dim, N output dim.
"""

import torch
import torch.nn.functional as F

ROWS = 16


def linear(x_MK: torch.Tensor, weight_NK: torch.Tensor, batch_invariant: bool = False) -> torch.Tensor:
    """``x @ weight^T`` over the last dim of ``x`` (any leading shape).

    Args:
        x_MK (torch.Tensor): ``[..., K]``.
        weight_NK (torch.Tensor): ``[N, K]``.
        batch_invariant (bool): use the row-independent form. Default: ``False``.
    """
    if not batch_invariant:
        return F.linear(x_MK, weight_NK)
    lead = x_MK.shape[:-1]
    rows = x_MK.reshape(-1, x_MK.shape[-1])
    blocks = [(rows[s : s + ROWS, None, :] * weight_NK[None]).sum(-1) for s in range(0, rows.shape[0], ROWS)]
    out = torch.cat(blocks) if blocks else rows.new_zeros(0, weight_NK.shape[0])
    return out.reshape(*lead, weight_NK.shape[0])
