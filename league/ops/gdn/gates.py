"""Gated DeltaNet's gates from their projections: the log-decay ``g`` and the write strength ``beta``.

``g = -exp(A_log) * softplus(a + dt_bias)`` in fp32 and ``beta = sigmoid(b)`` in b's dtype, per token and value
head. Defined here once for the model and for the decode kernel that computes them in place
(``triton_recurrent``, with ``gate_params``). Not responsible for the projections.

Legend: H value heads; leading dims of ``a`` and ``b`` are free.
"""

import torch

from league.ops.activations import sigmoid, softplus
from league.ops.numerics import FAST, Numerics


def gdn_gates(
    a: torch.Tensor, b: torch.Tensor, A_log_H: torch.Tensor, dt_bias_H: torch.Tensor, numerics: Numerics = FAST
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(g, beta)`` from the raw projections ``a`` and ``b`` (``[..., H]``); g in fp32 (or fp64 for fp64 input),
    beta in b's dtype. Row-by-row ``numerics`` pick the activations' fixed-order forms (see ``ops.activations``)."""
    acc = torch.promote_types(a.dtype, torch.float32)
    g = -A_log_H.to(acc).exp() * softplus(a.to(acc) + dt_bias_H.to(acc), numerics)
    return g, sigmoid(b, numerics)
