"""The chunked gated delta rule on fla's Triton kernels (training and prefill on CUDA).

Computes what ``chunk.chunk_gated_delta_rule`` defines, for a batch of equal-length sequences or for N
sequences packed along T (``cu_seqlens``), each with its own initial state. It does not pick a backend
(``league.ops.gdn`` does) and does not touch caches.

The forward is fla 0.6.0's chunk forward, with q/k L2-normalised by fla's kernel and grouped value heads
handled by fla (value head j reads key head ``j // (Hv / Hk)``). fla's own backward raises on Hopper with
Triton >= 3.4 and < 3.7.1, where ``chunk_bwd_dqkwg`` miscompiles (fla issue #640), so the backward is one of:

- ``"torch"``: recompute the torch reference under autograd and backpropagate through it. Correct by
  construction; costs a torch forward and backward at fp32.
- ``"fla"`` (default): fla's other backward kernels, with ``chunk_bwd_dqkwg``'s per-chunk products computed here
  as batched torch matmuls (``_chunk_bwd_dqkwg``). Those kernels have their own Hopper history (fla issue #984
  miscompiled the ungated ``prepare_wy_repr_bwd``); ``tests/gpu/test_fast_gdn.py`` passes with them on an H200
  with Triton 3.6 (docs/benchmarks.md), where a training step is 20% faster than with ``"torch"``. On another
  GPU or Triton version, run that test first; ``DEFAULT_BACKWARD = "torch"`` is the safe fallback.

fla and Triton are imported inside the functions: this module imports without them.

Legend: B batch, T tokens per batch row, N sequences, C chunks (all sequences), L tokens per chunk, Hk key heads,
Hv value heads, K key dim, V value dim.
"""

import contextlib

import torch

from league.ops.gdn.chunk import chunk_gated_delta_rule_varlen

CHUNK_SIZE = 64
# the backward when a caller names none (the model does not)
DEFAULT_BACKWARD = "fla"


def chunk_gated_delta_rule_fla(
    q_BTHK: torch.Tensor,
    k_BTHK: torch.Tensor,
    v_BTHV: torch.Tensor,
    g_BTH: torch.Tensor,
    beta_BTH: torch.Tensor,
    initial_state_NHKV: torch.Tensor | None = None,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    backward: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule by fla's chunked kernels; differentiable.

    Args:
        q_BTHK, k_BTHK (torch.Tensor): ``[B, T, Hk, K]`` raw (un-normalised) queries and keys; fp32, bf16 or fp16.
        v_BTHV (torch.Tensor): ``[B, T, Hv, V]``, same dtype as q.
        g_BTH (torch.Tensor): ``[B, T, Hv]`` log-decay (<= 0); computed in fp32.
        beta_BTH (torch.Tensor): ``[B, T, Hv]`` write strength.
        initial_state_NHKV (torch.Tensor, Optional): ``[N, Hv, K, V]`` fp32, one per sequence (N = B without
            ``cu_seqlens``). Default: zeros.
        scale (float, Optional): query scale. Default: ``K ** -0.5``.
        cu_seqlens (torch.Tensor, Optional): ``[N + 1]`` int64 offsets of N sequences packed along T; needs B == 1.
            Read on the host (fla sizes its grids from it). Default: ``None`` (each batch row is one sequence).
        backward (str, Optional): ``"torch"`` or ``"fla"``, see the module docstring. Default:
            ``DEFAULT_BACKWARD``.

    Returns:
        ``(o_BTHV, final_state_NHKV)``: outputs in the dtype of v, final states in fp32.
    """
    backward = DEFAULT_BACKWARD if backward is None else backward
    if backward not in ("torch", "fla"):
        raise ValueError(f"`backward` ({backward!r}) must be 'torch' or 'fla'")
    scale = q_BTHK.shape[-1] ** -0.5 if scale is None else scale
    return _ChunkGatedDeltaRule.apply(
        q_BTHK, k_BTHK, v_BTHV, g_BTH, beta_BTH, initial_state_NHKV, cu_seqlens, scale, backward
    )


def _device_of(x: torch.Tensor):
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _sequence_bounds(cu_seqlens: torch.Tensor | None, batch: int, num_tokens: int, device) -> torch.Tensor:
    """``cu_seqlens`` of the tokens flattened to ``[B * T]`` (batch rows are sequences without it)."""
    if cu_seqlens is not None:
        return cu_seqlens
    return torch.arange(batch + 1, device=device, dtype=torch.long) * num_tokens


class _ChunkGatedDeltaRule(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta, initial_state, cu_seqlens, scale, backward):
        from fla.modules.norm.l2norm import l2norm_fwd
        from fla.ops.gated_delta_rule.chunk import chunk_gated_delta_rule_fwd
        from fla.ops.utils.index import prepare_chunk_indices

        ctx.g_dtype, ctx.scale, ctx.backward = g.dtype, scale, backward
        q, k, v, beta = (x.contiguous() for x in (q, k, v, beta))
        g = g.float().contiguous()
        if initial_state is not None:
            initial_state = initial_state.float().contiguous()
        chunk_indices = None if cu_seqlens is None else prepare_chunk_indices(cu_seqlens, CHUNK_SIZE)
        with _device_of(q):
            q_unit, q_rstd = l2norm_fwd(q)
            k_unit, k_rstd = l2norm_fwd(k)
            g_cum, o, A, final, _, _ = chunk_gated_delta_rule_fwd(
                q=q_unit,
                k=k_unit,
                v=v,
                g=g,
                beta=beta,
                scale=scale,
                initial_state=initial_state,
                output_final_state=True,
                cu_seqlens=cu_seqlens,
                chunk_indices=chunk_indices,
                chunk_size=CHUNK_SIZE,
            )
        if backward == "fla":
            ctx.save_for_backward(q_unit, q_rstd, k_unit, k_rstd, v, g_cum, beta, A, initial_state, cu_seqlens)
        else:
            ctx.save_for_backward(q, k, v, g, beta, initial_state, cu_seqlens)
        return o.to(v.dtype), final

    @staticmethod
    def backward(ctx, grad_o, grad_final):
        needs = ctx.needs_input_grad[:6]
        if ctx.backward == "fla":
            with _device_of(grad_o):
                grads = _chunk_bwd_fla(*ctx.saved_tensors, grad_o, grad_final, ctx.scale)
        else:
            grads = _chunk_bwd_torch(*ctx.saved_tensors, grad_o, grad_final, ctx.scale, needs)
        dq, dk, dv, dg, db, dh0 = grads
        dg = None if dg is None else dg.to(ctx.g_dtype)
        grads = (dq, dk, dv, dg, db, dh0)
        return (*(grad if need else None for grad, need in zip(grads, needs)), None, None, None)


def _chunk_bwd_torch(q, k, v, g, beta, initial_state, cu_seqlens, grad_o, grad_final, scale, needs):
    """Gradients by backpropagating through the torch reference (recomputed in fp32)."""
    batch, num_tokens = v.shape[:2]
    bounds = _sequence_bounds(cu_seqlens, batch, num_tokens, v.device)
    inputs = [q, k, v, g, beta, initial_state]
    leaves = [None if x is None else x.detach().requires_grad_(need) for x, need in zip(inputs, needs)]
    with torch.enable_grad():
        o, final = chunk_gated_delta_rule_varlen(
            *(x.flatten(0, 1) for x in leaves[:5]), bounds, leaves[5], scale, CHUNK_SIZE
        )
    wanted = [x for x in leaves if x is not None and x.requires_grad]
    found = iter(torch.autograd.grad((o, final), wanted, (grad_o.flatten(0, 1), grad_final), allow_unused=True))
    grads = [next(found) if x is not None and x.requires_grad else None for x in leaves]
    return [None if d is None else d.view_as(x) for d, x in zip(grads, inputs)]


def _chunk_bwd_fla(q_unit, q_rstd, k_unit, k_rstd, v, g_cum, beta, A, initial_state, cu_seqlens, do, dht, scale):
    """fla 0.6.0's chunk backward with ``chunk_bwd_dqkwg`` replaced by :func:`_chunk_bwd_dqkwg`."""
    from fla.modules.norm.l2norm import l2norm_bwd
    from fla.ops.common.chunk_delta_h import chunk_gated_delta_rule_bwd_dhu, chunk_gated_delta_rule_fwd_h
    from fla.ops.common.chunk_o import chunk_bwd_dv_local
    from fla.ops.gated_delta_rule.wy_fast import prepare_wy_repr_bwd, recompute_w_u_fwd
    from fla.ops.utils import chunk_local_cumsum
    from fla.ops.utils.index import prepare_chunk_indices

    do, dht = do.contiguous(), dht.contiguous()
    index = dict(cu_seqlens=cu_seqlens)
    index["chunk_indices"] = None if cu_seqlens is None else prepare_chunk_indices(cu_seqlens, CHUNK_SIZE)
    w, u = recompute_w_u_fwd(k=k_unit, v=v, beta=beta, A=A, g=g_cum, **index)
    h, v_new, _ = chunk_gated_delta_rule_fwd_h(
        k=k_unit, w=w, u=u, g=g_cum, initial_state=initial_state, output_final_state=False, **index
    )
    dv_local = chunk_bwd_dv_local(q=q_unit, k=k_unit, g=g_cum, do=do, scale=scale, chunk_size=CHUNK_SIZE, **index)
    dh, dh0, du = chunk_gated_delta_rule_bwd_dhu(
        q=q_unit, k=k_unit, w=w, g=g_cum, h0=initial_state, dht=dht, do=do, dv=dv_local, scale=scale, **index
    )
    bounds = _sequence_bounds(cu_seqlens, v.shape[0], v.shape[1], v.device)
    dq, dk, dw, dg = _chunk_bwd_dqkwg(q_unit, k_unit, v_new, g_cum, h, du, do, dh, scale, bounds)
    dk_wy, dv, db, dg_wy = prepare_wy_repr_bwd(
        k=k_unit, v=v, beta=beta, A=A, dw=dw.to(w.dtype), du=du, g=g_cum, **index
    )
    dk = dk + dk_wy
    dg = chunk_local_cumsum(dg + dg_wy, chunk_size=CHUNK_SIZE, reverse=True, **index)
    dq = l2norm_bwd(q_unit, q_rstd, dq.to(q_unit.dtype))
    dk = l2norm_bwd(k_unit, k_rstd, dk.to(k_unit.dtype))
    return dq, dk, dv, dg, db, dh0


def _chunk_bwd_dqkwg(q, k, v_new, g_cum, h, du, do, dh, scale, bounds):
    """What fla's ``chunk_bwd_dqkwg`` computes for the gated delta rule, as batched torch ops over all chunks.

    Per chunk (tokens i, j; ``g`` the in-chunk cumulative log2-decay, ``g_l`` its last value; S and dS the chunk's
    entering state and its gradient):
        dw = -du S^T
        P_ij = (do_i . v_j) 2^(g_i - g_j) scale for i >= j, else 0
        dq = 2^g (do S^T) scale + P k,   dk = 2^(g_l - g) (v dS^T) + P^T q
        dg = rowsum(dq * q) - rowsum(dk * k), plus ``2^g_l sum(S * dS) + sum(2^(g_l - g) (v dS^T) * k)`` on the
        chunk's last token (reverse-cumsummed within the chunk by the caller).

    Args:
        q, k (torch.Tensor): ``[B, T, Hk, K]`` normalised; v_new, du, do ``[B, T, Hv, V]``; g_cum ``[B, T, Hv]``.
        h, dh (torch.Tensor): ``[B, C', Hv, K, V]`` per-chunk states and their gradients (C = B * C').
        bounds (torch.Tensor): ``[N + 1]`` offsets of the sequences in the ``[B * T]`` flattened tokens.

    Returns:
        ``(dq, dk [B, T, Hk, K], dw [B, T, Hv, K], dg [B, T, Hv])`` in fp32.
    """
    batch, num_tokens, num_k_heads, k_dim = q.shape
    num_v_heads = v_new.shape[2]
    total, device, f32 = batch * num_tokens, q.device, torch.float32
    lens = bounds.diff()
    chunks_per_seq = (lens + CHUNK_SIZE - 1) // CHUNK_SIZE
    seq_of_chunk = torch.repeat_interleave(torch.arange(len(lens), device=device), chunks_per_seq)
    first_chunk = torch.cumsum(chunks_per_seq, 0) - chunks_per_seq
    chunk_in_seq = torch.arange(len(seq_of_chunk), device=device) - first_chunk[seq_of_chunk]
    start_C = bounds[seq_of_chunk] + chunk_in_seq * CHUNK_SIZE
    count_C = torch.minimum(bounds[seq_of_chunk + 1] - start_C, torch.full_like(start_C, CHUNK_SIZE))
    pos_L = torch.arange(CHUNK_SIZE, device=device)
    valid_CL = pos_L[None, :] < count_C[:, None]
    token_CL = torch.where(valid_CL, start_C[:, None] + pos_L[None, :], total)  # ``total``: a spare row

    def gather(x_BTH_: torch.Tensor) -> torch.Tensor:  # [B, T, H, ...] -> [C, H, L, ...], zero outside a chunk
        flat = x_BTH_.flatten(0, 1).to(f32)
        flat = torch.cat([flat, flat.new_zeros(1, *flat.shape[1:])])
        return flat[token_CL].movedim(2, 1)

    key_head = torch.arange(num_v_heads, device=device) // (num_v_heads // num_k_heads)
    q_CHLK, k_CHLK = gather(q)[:, key_head], gather(k)[:, key_head]
    v_CHLV, du_CHLV, do_CHLV = gather(v_new), gather(du), gather(do)
    g_CHL = gather(g_cum[..., None])[..., 0]
    state_CHKV = h.flatten(0, 1).to(f32)
    dstate_CHKV = dh.flatten(0, 1).to(f32)

    last_C = (count_C - 1)[:, None, None].expand(-1, num_v_heads, 1)
    g_last_CH1 = g_CHL.gather(-1, last_C)
    dw = -(du_CHLV @ state_CHKV.transpose(-1, -2))
    dq = (do_CHLV @ state_CHKV.transpose(-1, -2)) * (torch.exp2(g_CHL) * scale)[..., None]
    to_end_CHL = torch.where(valid_CL[:, None, :], torch.exp2(g_last_CH1 - g_CHL), 0.0)
    dk = (v_CHLV @ dstate_CHKV.transpose(-1, -2)) * to_end_CHL[..., None]
    dg_last_CH = (state_CHKV * dstate_CHKV).sum((-2, -1)) * torch.exp2(g_last_CH1[..., 0])
    dg_last_CH = dg_last_CH + (dk * k_CHLK).sum((-2, -1))

    causal_LL = torch.ones(CHUNK_SIZE, CHUNK_SIZE, dtype=torch.bool, device=device).tril()
    visible_CLL = causal_LL & valid_CL[:, :, None] & valid_CL[:, None, :]
    log_decay = torch.where(visible_CLL[:, None], g_CHL[..., :, None] - g_CHL[..., None, :], float("-inf"))
    p_CHLL = (do_CHLV @ v_CHLV.transpose(-1, -2)) * torch.exp2(log_decay) * scale
    dq = dq + p_CHLL @ k_CHLK
    dk = dk + p_CHLL.transpose(-1, -2) @ q_CHLK
    dg = (dq * q_CHLK).sum(-1) - (dk * k_CHLK).sum(-1)
    dg = dg + torch.where(pos_L[None, None, :] == last_C, dg_last_CH[..., None], 0.0)

    def scatter(x_CHL_: torch.Tensor) -> torch.Tensor:  # [C, H, L, ...] -> [B, T, H, ...]
        out = x_CHL_.new_zeros(total + 1, num_v_heads, *x_CHL_.shape[3:])
        out[token_CL] = x_CHL_.movedim(1, 2)
        return out[:total].view(batch, num_tokens, num_v_heads, *x_CHL_.shape[3:])

    groups = num_v_heads // num_k_heads
    dq = scatter(dq).view(batch, num_tokens, num_k_heads, groups, k_dim).sum(3)
    dk = scatter(dk).view(batch, num_tokens, num_k_heads, groups, k_dim).sum(3)
    return dq, dk, scatter(dw), scatter(dg[..., None])[..., 0]
