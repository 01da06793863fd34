"""Log-probabilities and entropy from logits, in fp32 over the whole vocabulary.

This one function serves the engine (log-prob of a sampled token) and the trainer (log-prob of a
trained token), so both compute a token's log-probability the same way. :func:`linear_token_logprobs`
computes the same number from the output head's input and weight, without holding all the logits (training
on a 248k vocabulary); it does not promise bitwise agreement with the engine, so batch-invariant runs keep the
unfused form. On CUDA with Triton and bf16/fp16 weights, its per-chunk log-softmax work runs in the kernels of
``ops/logprob/triton.py`` over the chunk's logits in the weights' dtype (no fp32 copy of them).

Legend: T rows, V vocabulary, D hidden dim, C rows of a chunk, B vocabulary columns of a backward block.
"""

import torch
import torch.nn.functional as F

from league.ops.backends import use_kernel


def token_logprobs(logits_TV: torch.Tensor, tokens_T: torch.Tensor, chunk_size: int = 4096) -> torch.Tensor:
    """``log_softmax(float(logits))[t, tokens[t]]`` for each row, differentiable in the logits.

    On CUDA with Triton: one pass of ``ops.logprob.triton``'s log-sum-exp kernel over the logits in their dtype (no
    fp32 copy; a decode step at batch 256 read its 248,320-column logits five times in torch); the engine and the
    batch-invariant trainer both come here, so they agree bitwise. Elsewhere :func:`token_logprobs_reference`.

    Args:
        logits_TV (torch.Tensor): ``[T, V]`` raw logits (any float dtype).
        tokens_T (torch.Tensor): ``[T]`` token ids.
        chunk_size (int): rows converted to fp32 at once by the reference. Default: ``4096``.

    Returns:
        ``[T]`` fp32.
    """
    if use_kernel(logits_TV, None, None, op="token_logprobs"):
        return _TokenLogprobs.apply(logits_TV, tokens_T)
    return token_logprobs_reference(logits_TV, tokens_T, chunk_size)


class _TokenLogprobs(torch.autograd.Function):
    """:func:`token_logprobs` by the Triton kernels: forward by the log-sum-exp kernel, backward by the logits'
    gradient kernel (``softmax - one-hot``, scaled), on a copy of the logits."""

    @staticmethod
    def forward(ctx, logits_TV: torch.Tensor, tokens_T: torch.Tensor) -> torch.Tensor:
        from league.ops.logprob.triton import chunk_logsumexp

        logits_TV = logits_TV if logits_TV.stride(-1) == 1 else logits_TV.contiguous()
        logp_T = logits_TV.new_empty(logits_TV.shape[0], dtype=torch.float32)
        lse_T = torch.empty_like(logp_T)
        chunk_logsumexp(logits_TV, tokens_T, 1.0, lse_T, logp_T, logp_T.new_empty(0))
        ctx.save_for_backward(logits_TV, tokens_T, lse_T)
        return logp_T

    @staticmethod
    def backward(ctx, grad_logp_T: torch.Tensor):
        from league.ops.logprob.triton import chunk_grad_logits

        logits_TV, tokens_T, lse_T = ctx.saved_tensors
        grad = grad_logp_T.float().contiguous()
        return chunk_grad_logits(logits_TV.clone(), tokens_T, 1.0, lse_T, grad, None, None), None


def token_logprobs_reference(logits_TV: torch.Tensor, tokens_T: torch.Tensor, chunk_size: int = 4096) -> torch.Tensor:
    """:func:`token_logprobs` in torch, ``chunk_size`` rows converted to fp32 at a time."""
    out = []
    for start in range(0, logits_TV.shape[0], chunk_size):
        rows = logits_TV[start : start + chunk_size].float()
        picked = rows.gather(-1, tokens_T[start : start + chunk_size, None])[:, 0]
        out.append(picked - rows.logsumexp(-1))
    return torch.cat(out) if out else logits_TV.new_zeros(0, dtype=torch.float32)


def top_logprobs(logits_TV: torch.Tensor, k: int, chunk_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest fp32 log-probabilities of each row and their token ids, largest first.

    Args:
        logits_TV (torch.Tensor): ``[T, V]`` raw logits (any float dtype).
        k (int): how many per row, ``1 <= k <= V``.
        chunk_size (int): rows converted to fp32 at once. Default: ``4096``.

    Returns:
        ``([T, k] fp32 log-probs, [T, k] int64 token ids)``.
    """
    values, ids = [], []
    for start in range(0, logits_TV.shape[0], chunk_size):
        rows = logits_TV[start : start + chunk_size].float()
        top = rows.topk(k, dim=-1)
        values.append(top.values - rows.logsumexp(-1, keepdim=True))
        ids.append(top.indices)
    if not values:
        return logits_TV.new_zeros(0, k, dtype=torch.float32), torch.zeros(0, k, dtype=torch.long)
    return torch.cat(values), torch.cat(ids)


def entropy(logits_TV: torch.Tensor, chunk_size: int = 4096) -> torch.Tensor:
    """``logsumexp(z) - sum softmax(z) z`` per row, fp32, ``[T]``."""
    out = []
    for start in range(0, logits_TV.shape[0], chunk_size):
        z = logits_TV[start : start + chunk_size].float()
        out.append(z.logsumexp(-1) - (z.softmax(-1) * z).sum(-1))
    return torch.cat(out) if out else logits_TV.new_zeros(0, dtype=torch.float32)


def linear_token_logprobs(
    hidden_TD: torch.Tensor,
    weight_VD: torch.Tensor,
    tokens_T: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """``log_softmax(float(hidden @ weight^T) / temperature)[t, tokens[t]]``, the output head fused in.

    Equals ``token_logprobs(F.linear(hidden, weight).float() / temperature, tokens)`` without holding the
    ``[T, V]`` logits: the forward computes them ``chunk_size`` rows at a time, and the backward computes them again
    in blocks of vocabulary columns over all rows of about as many elements, so about ``chunk_size`` rows' worth of
    logits exist at once. Differentiable in ``hidden_TD`` and ``weight_VD``.

    Args:
        hidden_TD (torch.Tensor): ``[T, D]`` inputs of the output head, in the dtype of ``weight_VD``.
        weight_VD (torch.Tensor): ``[V, D]`` output head.
        tokens_T (torch.Tensor): ``[T]`` token ids.
        temperature (float): the fp32 logits are divided by it. Default: ``1.0``.
        chunk_size (int): rows of logits computed at once. Default: ``1024``.

    Returns:
        ``[T]`` fp32.
    """
    logp_T, _ = _LinearLogprobs.apply(hidden_TD, weight_VD, tokens_T, temperature, chunk_size, False)
    return logp_T


def linear_token_logprobs_entropy(
    hidden_TD: torch.Tensor,
    weight_VD: torch.Tensor,
    tokens_T: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`linear_token_logprobs` and the :func:`entropy` of the same tempered logits, both ``[T]`` fp32 and
    both differentiable. Arguments as :func:`linear_token_logprobs`."""
    return _LinearLogprobs.apply(hidden_TD, weight_VD, tokens_T, temperature, chunk_size, True)


def _fused_kernels_apply(weight_VD: torch.Tensor) -> bool:
    """Whether the per-chunk log-softmax runs in Triton kernels: CUDA, Triton installed, bf16/fp16 weights (fp32
    weights keep the torch path, whose logits are fp32 throughout)."""
    return use_kernel(weight_VD, None, (torch.bfloat16, torch.float16), op="linear_token_logprobs")


def _chunk_logits(hidden_CD: torch.Tensor, weight_VD: torch.Tensor, temperature: float) -> torch.Tensor:
    """``[C, V]`` fp32 tempered logits, the linear in the parameters' dtype as ``F.linear``."""
    z_CV = F.linear(hidden_CD, weight_VD).float()
    return z_CV if temperature == 1.0 else z_CV / temperature


def _chunk_forward(
    hidden_CD: torch.Tensor,
    weight_VD: torch.Tensor,
    tokens_C: torch.Tensor,
    temperature: float,
    lse_C: torch.Tensor,
    logp_C: torch.Tensor,
    ent_C: torch.Tensor,
) -> None:
    """Writes one chunk's log-sum-exp, log-probs and (unless ``ent_C`` is empty) entropies."""
    z_CV = _chunk_logits(hidden_CD, weight_VD, temperature)
    lse_C.copy_(z_CV.logsumexp(-1))
    logp_C.copy_(z_CV.gather(-1, tokens_C[:, None])[:, 0] - lse_C)
    if ent_C.numel():
        ent_C.copy_(lse_C - (z_CV.softmax(-1) * z_CV).sum(-1))


class _LinearLogprobs(torch.autograd.Function):
    """Forward keeps only the per-row log-sum-exp (and entropy); backward rebuilds one block of logits at a time.

    With ``p = softmax(z)`` and ``g``, ``h`` the incoming gradients of the log-prob and the entropy:
    ``dL/dz = g * (onehot(token) - p) - h * p * (z - (lse - H))``, which needs only per-row numbers beside ``z``,
    so the backward takes the logits in blocks of vocabulary columns over all rows (the forward's row chunks need
    whole rows for the log-sum-exp). Each block's weight gradient is then final: one matmul over all rows, written
    into its rows of the result in the weight's dtype, as the unfused backward computes it; row chunks would instead
    add a ``[V, D]`` product per chunk into an fp32 sum (12 bytes moved per weight entry per chunk, 6 GB at the real
    vocabulary and width). The hidden gradient, ``[T, D]``, is the one summed over blocks, in fp32, and rounded once.
    """

    @staticmethod
    def forward(
        ctx,
        hidden_TD: torch.Tensor,
        weight_VD: torch.Tensor,
        tokens_T: torch.Tensor,
        temperature: float,
        chunk_size: int,
        with_entropy: bool,
    ):
        num_rows = hidden_TD.shape[0]
        logp_T = hidden_TD.new_empty(num_rows, dtype=torch.float32)
        lse_T = torch.empty_like(logp_T)
        ent_T = torch.empty_like(logp_T) if with_entropy else logp_T.new_empty(0)
        fast = _fused_kernels_apply(weight_VD)
        for start in range(0, num_rows, chunk_size):
            rows = slice(start, start + chunk_size)
            if fast:
                from league.ops.logprob.triton import chunk_logsumexp

                z_CV = F.linear(hidden_TD[rows], weight_VD)
                chunk_logsumexp(z_CV, tokens_T[rows], temperature, lse_T[rows], logp_T[rows], ent_T[rows])
            else:
                _chunk_forward(
                    hidden_TD[rows], weight_VD, tokens_T[rows], temperature, lse_T[rows], logp_T[rows], ent_T[rows]
                )
        ctx.save_for_backward(hidden_TD, weight_VD, tokens_T, lse_T, ent_T)
        ctx.temperature, ctx.chunk_size, ctx.fast = temperature, chunk_size, fast
        ctx.set_materialize_grads(False)
        if not with_entropy:
            ctx.mark_non_differentiable(ent_T)
        return logp_T, ent_T

    @staticmethod
    def backward(ctx, grad_logp_T: torch.Tensor | None, grad_ent_T: torch.Tensor | None):
        hidden_TD, weight_VD, tokens_T, lse_T, ent_T = ctx.saved_tensors
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        num_rows, vocab = hidden_TD.shape[0], weight_VD.shape[0]
        acc_dtype = torch.promote_types(weight_VD.dtype, torch.float32)
        grad_hidden_TD = torch.zeros_like(hidden_TD, dtype=acc_dtype) if want_hidden else None
        grad_weight_VD = torch.empty_like(weight_VD) if want_weight else None
        grad_logp_T = None if grad_logp_T is None else grad_logp_T.float().contiguous()
        ent_T = None if grad_ent_T is None else ent_T
        grad_ent_T = None if grad_ent_T is None else grad_ent_T.float().contiguous()
        block = _vocab_block(num_rows, vocab, ctx.chunk_size)
        for start in range(0, vocab, block):
            cols = slice(start, start + block)
            token_cols_T = tokens_T - start  # each row's token as a column of this block (outside it: no one-hot)
            grad_args = (token_cols_T, ctx.temperature, lse_T, grad_logp_T, ent_T, grad_ent_T)
            if ctx.fast:
                from league.ops.logprob.triton import chunk_grad_logits

                grad_z_TB = chunk_grad_logits(F.linear(hidden_TD, weight_VD[cols]), *grad_args)
            else:
                grad_z_TB = _grad_chunk_logits(hidden_TD, weight_VD[cols], *grad_args)
            if want_hidden:
                _add_matmul(grad_hidden_TD, grad_z_TB, weight_VD[cols])
            if want_weight:
                torch.mm(grad_z_TB.t(), hidden_TD, out=grad_weight_VD[cols])
        if want_hidden:
            grad_hidden_TD = grad_hidden_TD.to(hidden_TD.dtype)
        return grad_hidden_TD, grad_weight_VD, None, None, None, None


def _vocab_block(num_rows: int, vocab: int, chunk_size: int) -> int:
    """Columns of the backward's logit blocks: all rows times this many columns are about ``chunk_size`` rows of
    the whole vocabulary, in a multiple of 64 columns (aligned rows for the matmuls and kernels)."""
    num_blocks = max(1, -(-num_rows // chunk_size))
    per_block = -(-vocab // num_blocks)
    return max(1, min(vocab, -(-per_block // 64) * 64))


def _add_matmul(acc_TD: torch.Tensor, a_TB: torch.Tensor, b_BD: torch.Tensor) -> None:
    """``acc += a @ b`` with the products summed in ``acc``'s dtype (fp32) whatever the operands' (bf16/fp16)."""
    if a_TB.dtype == acc_TD.dtype:
        acc_TD.addmm_(a_TB, b_BD)
    elif a_TB.is_cuda:
        acc_TD += torch.mm(a_TB, b_BD, out_dtype=acc_TD.dtype)
    else:
        acc_TD.addmm_(a_TB.to(acc_TD.dtype), b_BD.to(acc_TD.dtype))


def _grad_chunk_logits(
    hidden_CD: torch.Tensor,
    weight_VD: torch.Tensor,
    tokens_C: torch.Tensor,
    temperature: float,
    lse_C: torch.Tensor,
    grad_logp_C: torch.Tensor | None,
    ent_C: torch.Tensor | None,
    grad_ent_C: torch.Tensor | None,
) -> torch.Tensor:
    """The gradient of a block of logits (in the weight's dtype, as autograd through ``.float()`` gives it), from
    its recomputed logits ``z`` (see :class:`_LinearLogprobs`); two ``[C, V]`` fp32 buffers at most. The block is
    any rows ``C`` (with their log-sum-exp) by any columns ``V`` (the rows of ``weight_VD``); ``tokens_C`` gives each
    row's token as a column of the block, and a token outside it adds no one-hot term."""
    z_CV = _chunk_logits(hidden_CD, weight_VD, temperature)
    p_CV = (z_CV - lse_C[:, None]).exp_()
    if grad_ent_C is None:
        coef_CV = grad_logp_C[:, None]
    else:
        coef_CV = z_CV.sub_((lse_C - ent_C)[:, None]).mul_(grad_ent_C[:, None])
        if grad_logp_C is not None:
            coef_CV.add_(grad_logp_C[:, None])
    grad_z_CV = p_CV.mul_(coef_CV).neg_()
    del z_CV, coef_CV
    if grad_logp_C is not None:
        num_cols = grad_z_CV.shape[1]
        one_hot_C = torch.where((tokens_C >= 0) & (tokens_C < num_cols), grad_logp_C, 0.0)
        grad_z_CV.scatter_add_(-1, tokens_C.clamp(0, max(num_cols - 1, 0))[:, None], one_hot_C[:, None])
    if temperature != 1.0:
        grad_z_CV /= temperature
    return grad_z_CV.to(weight_VD.dtype)
