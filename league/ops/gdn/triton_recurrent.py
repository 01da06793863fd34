"""Triton kernel of the gated delta rule stepped a few tokens at a time (decode and speculative verify).

Computes exactly what ``recurrent.recurrent_gated_delta_rule`` defines, in two forms: states passed in and
returned (``recurrent_gated_delta_rule_fwd``), or read from (and, but in verify, written back to) a slot-indexed
state cache in place (``recurrent_gated_delta_rule_slots_fwd``). It does not decide which states to commit after
a verify, nor does it have a backward: ``gdn.recurrent_gated_delta_rule_kernel`` differentiates through the torch
reference.

Imported only when Triton is installed. Runs on CUDA, or on CPU tensors under ``TRITON_INTERPRET=1``. Launches
read no device value on the host, so they can be captured in CUDA graphs. One program owns one request, one value
head and BV columns of its state: the ``[K, BV]`` block stays in registers (fp32) while the program loops over
the request's T tokens, so a request's numbers do not depend on the rest of the batch, nor on how its tokens are
split across calls.

Legend: B requests, T tokens per request, Hk key heads, Hv value heads, K key dim, V value dim; inside the kernel
BK and BV are the padded K and the V block.
"""

import torch
import triton
import triton.language as tl

from league.ops.triton_rounding import round_to

_NORM_EPS = 1e-6  # the L2-norm eps of naive.l2norm
# fixed (not tuned per shape), so that the arithmetic of a state column never depends on the batch
# 64 columns, 2 warps, state streamed past the L2: the fastest of the settings timed over the 30 GDN layers of a
# decode step at batch 256 on an H200 (benchmarks/results/gdn_state_gpu.json: 8.9 ms a step against 9.95 for
# 32 columns and 1 warp without streaming)
_BLOCK_V = 64
_NUM_WARPS = 2
# state loads marked evict-first and stores streaming (``.cs``): a decode step moves ~1 GiB of state a layer
# through the 50 MB L2, which would otherwise push out the weights and activations the next kernels read
_STREAM_STATE = True


@triton.jit(do_not_specialize=["T"])
def _recurrent_gated_delta_rule_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    g_ptr,
    beta_ptr,
    o_ptr,
    h0_ptr,
    ht_ptr,
    hs_ptr,
    slots_ptr,
    fresh_ptr,
    a_log_ptr,
    dt_bias_ptr,
    scale,
    T,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_gb,
    stride_gt,
    stride_gh,
    stride_bb,
    stride_bt,
    stride_bh,
    stride_hsb,
    stride_hst,
    HK: tl.constexpr,
    HV: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    EPS: tl.constexpr,
    USE_SLOTS: tl.constexpr,
    HAS_FRESH: tl.constexpr,
    SAVE_ALL: tl.constexpr,
    STORE_FINAL: tl.constexpr,
    RAW_GATES: tl.constexpr,
    STREAM_STATE: tl.constexpr,
):
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // HV
    i_hv = i_bh % HV
    i_hk = i_hv // (HV // HK)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    offs_kv = o_k[:, None] * V + o_v[None, :]

    if USE_SLOTS:
        row = tl.load(slots_ptr + i_b).to(tl.int64)
        writes = row >= 0
    else:
        row = i_b
        writes = i_b >= 0
    reads = writes
    if HAS_FRESH:
        reads = reads & (tl.load(fresh_ptr + i_b) == 0)
    p_state = (row * HV + i_hv) * K * V + offs_kv
    if STREAM_STATE:
        b_h = tl.load(h0_ptr + p_state, mask=m_kv & reads, other=0.0, eviction_policy="evict_first")
    else:
        b_h = tl.load(h0_ptr + p_state, mask=m_kv & reads, other=0.0)
    b_h = b_h.to(tl.float32)

    p_q = q_ptr + i_b * stride_qb + i_hk * stride_qh + o_k
    p_k = k_ptr + i_b * stride_kb + i_hk * stride_kh + o_k
    p_v = v_ptr + i_b * stride_vb + i_hv * stride_vh + o_v
    p_g = g_ptr + i_b * stride_gb + i_hv * stride_gh
    p_beta = beta_ptr + i_b * stride_bb + i_hv * stride_bh
    p_o = o_ptr + (i_b * T * HV + i_hv) * V + o_v
    if RAW_GATES:  # g and beta hold the projections a and b; the gates are gates.gdn_gates of them
        b_decay = -tl.exp(tl.load(a_log_ptr + i_hv).to(tl.float32))
        b_dt = tl.load(dt_bias_ptr + i_hv).to(tl.float32)
    # a while loop, not range(T): the interpreter cannot turn a runtime scalar into a Python int
    t = 0
    while t < T:
        b_q = tl.load(p_q + t * stride_qt, mask=m_k, other=0.0).to(tl.float32)
        b_k = tl.load(p_k + t * stride_kt, mask=m_k, other=0.0).to(tl.float32)
        b_v = tl.load(p_v + t * stride_vt, mask=m_v, other=0.0).to(tl.float32)
        b_g = tl.load(p_g + t * stride_gt).to(tl.float32)
        b_beta = tl.load(p_beta + t * stride_bt).to(tl.float32)
        if RAW_GATES:
            b_a = b_g + b_dt
            b_g = b_decay * tl.where(b_a > 20.0, b_a, tl.log(1.0 + tl.exp(tl.minimum(b_a, 20.0))))
            # rounded to b's dtype, as torch's sigmoid of the projection is
            b_beta = round_to(tl.math.div_rn(1.0, 1.0 + tl.exp(-b_beta)), beta_ptr.dtype.element_ty)
        b_q = b_q * tl.rsqrt(tl.sum(b_q * b_q) + EPS) * scale
        b_k = b_k * tl.rsqrt(tl.sum(b_k * b_k) + EPS)
        b_h = b_h * tl.exp(b_g)
        b_delta = b_beta * (b_v - tl.sum(b_h * b_k[:, None], 0))
        b_h = b_h + b_k[:, None] * b_delta[None, :]
        b_o = tl.sum(b_h * b_q[:, None], 0)
        tl.store(p_o + t * HV * V, b_o.to(o_ptr.dtype.element_ty), mask=m_v)
        if SAVE_ALL:
            p_hs = hs_ptr + i_b * stride_hsb + t * stride_hst + i_hv * K * V + offs_kv
            tl.store(p_hs, b_h.to(hs_ptr.dtype.element_ty), mask=m_kv)
        t += 1
    if STORE_FINAL:
        if STREAM_STATE:
            tl.store(ht_ptr + p_state, b_h.to(ht_ptr.dtype.element_ty), mask=m_kv & writes, cache_modifier=".cs")
        else:
            tl.store(ht_ptr + p_state, b_h.to(ht_ptr.dtype.element_ty), mask=m_kv & writes)


def _launch(q, k, v, g, beta, o, h0, ht, hs, slots, fresh, scale, use_slots, save_all, store_final, gate_params=None):
    num_reqs, num_tokens, num_v_heads, v_dim = v.shape
    num_k_heads, k_dim = q.shape[2], q.shape[3]
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    scale = k_dim**-0.5 if scale is None else scale
    block_v = min(_BLOCK_V, triton.next_power_of_2(v_dim))
    grid = (triton.cdiv(v_dim, block_v), num_reqs * num_v_heads)
    _recurrent_gated_delta_rule_kernel[grid](
        q,
        k,
        v,
        g,
        beta,
        o,
        h0,
        ht,
        hs,
        slots,
        fresh,
        *(gate_params if gate_params is not None else (None, None)),
        scale,
        num_tokens,
        *q.stride()[:3],
        *k.stride()[:3],
        *v.stride()[:3],
        *g.stride(),
        *beta.stride(),
        hs.stride(0) if hs is not None else 0,
        hs.stride(1) if hs is not None else 0,
        HK=num_k_heads,
        HV=num_v_heads,
        K=k_dim,
        V=v_dim,
        BK=triton.next_power_of_2(k_dim),
        BV=block_v,
        EPS=_NORM_EPS,
        USE_SLOTS=use_slots,
        HAS_FRESH=fresh is not None,
        SAVE_ALL=save_all,
        STORE_FINAL=store_final,
        RAW_GATES=gate_params is not None,
        STREAM_STATE=_STREAM_STATE,
        num_warps=_NUM_WARPS,
    )


def recurrent_gated_delta_rule_fwd(
    q_BTHK: torch.Tensor,
    k_BTHK: torch.Tensor,
    v_BTHV: torch.Tensor,
    g_BTH: torch.Tensor,
    beta_BTH: torch.Tensor,
    state_BHKV: torch.Tensor,
    scale: float | None = None,
    return_all_states: bool = False,
    gate_params: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel behind :func:`league.ops.gdn.recurrent.recurrent_gated_delta_rule`; same arguments and results.

    Inputs may be fp32, bf16 or fp16 and strided (the last dim of q, k, v contiguous is best); the state is
    read in its dtype and computed in fp32, and the states returned are new fp32 tensors. No autograd. With
    ``gate_params`` ``(A_log_H, dt_bias_H)``, g and beta are the raw projections a and b (see
    :func:`recurrent_gated_delta_rule_slots_fwd`).
    """
    num_reqs, num_tokens, num_v_heads, v_dim = v_BTHV.shape
    k_dim = q_BTHK.shape[-1]
    out = v_BTHV.new_empty(num_reqs, num_tokens, num_v_heads, v_dim)
    state_BHKV = state_BHKV.contiguous()
    if return_all_states:
        states = state_BHKV.new_empty(num_reqs, num_tokens, num_v_heads, k_dim, v_dim, dtype=torch.float32)
        final, all_states = None, states
    else:
        states = state_BHKV.new_empty(num_reqs, num_v_heads, k_dim, v_dim, dtype=torch.float32)
        final, all_states = states, None
    if num_tokens > 0:
        _launch(
            q_BTHK,
            k_BTHK,
            v_BTHV,
            g_BTH,
            beta_BTH,
            out,
            state_BHKV,
            final,
            all_states,
            None,
            None,
            scale,
            use_slots=False,
            save_all=return_all_states,
            store_final=not return_all_states,
            gate_params=gate_params,
        )
    elif final is not None:
        final.copy_(state_BHKV)
    return out, states


def recurrent_gated_delta_rule_slots_fwd(
    q_BTHK: torch.Tensor,
    k_BTHK: torch.Tensor,
    v_BTHV: torch.Tensor,
    g_BTH: torch.Tensor,
    beta_BTH: torch.Tensor,
    state_cache: torch.Tensor,
    slots_B: torch.Tensor,
    scale: float | None = None,
    fresh_B: torch.Tensor | None = None,
    commit: bool = True,
    gate_params: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The kernel behind :func:`league.ops.gdn.recurrent.recurrent_gated_delta_rule_slots`; same contract. With
    ``gate_params`` the kernel computes the gates from the raw projections (one launch instead of ~9). Without
    ``commit`` (verify) it reads each state once and writes none."""
    num_reqs, num_tokens, num_v_heads, v_dim = v_BTHV.shape
    k_dim = q_BTHK.shape[-1]
    assert state_cache.is_contiguous() and state_cache.shape[1:] == (num_v_heads, k_dim, v_dim)
    out = v_BTHV.new_empty(num_reqs, num_tokens, num_v_heads, v_dim)
    if num_tokens > 0:
        _launch(
            q_BTHK,
            k_BTHK,
            v_BTHV,
            g_BTH,
            beta_BTH,
            out,
            state_cache,
            state_cache,
            None,
            slots_B,
            fresh_B,
            scale,
            use_slots=True,
            save_all=False,
            store_final=commit,
            gate_params=gate_params,
        )
    return out
