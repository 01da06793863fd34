"""Gated DeltaNet, the model's linear-attention token mixer: projections, a causal depthwise conv, the gated delta
rule over each sequence (continuing from its cache slot, or from zeros), and a gated output norm.

The path of the rule (chunked for training and prefill, recurrent for decode and verify, the decode kernel over
whole sequences under decode parity) is picked once per forward by ``ops.gdn.gdn_path``; the steps of the forward are
the methods below, in order. Knows nothing of parallelism or of how slots are allocated.

Legend: T packed tokens, N sequences, D model dim, C conv channels, L conv input length, H / Hv value heads,
K key head dim, V value head dim.
"""

import functools

import torch
from torch import nn

from league.models.qwen3_5_moe.args import ModelArgs
from league.models.qwen3_5_moe.batch import ForwardBatch, GDNCache
from league.ops.conv import causal_conv1d_batched, causal_conv1d_slots
from league.ops.gdn import (
    chunk_gated_delta_rule_padded,
    chunk_gated_delta_rule_varlen,
    gdn_path,
    recurrent_gated_delta_rule,
    recurrent_gated_delta_rule_slots,
    states_in_slots,
)
from league.ops.gdn.gates import gdn_gates
from league.ops.gdn.parity import gated_delta_rule_as_decode
from league.ops.norm import gated_rms_norm
from league.ops.numerics import FAST, Numerics
from league.ops.rows import copy_rows


def _pad(x_T: torch.Tensor, fill: float = 0.0, *, num_seqs: int, longest: int, rows: torch.Tensor | None):
    """Packed ``[T, ...]`` -> ``[N, longest, ...]``, ``fill`` in the padding (``rows``: ``ForwardBatch.pad_rows``)."""
    if rows is None:  # all sequences have the same length
        return x_T.view(num_seqs, longest, *x_T.shape[1:])
    out = x_T.new_full((num_seqs * longest, *x_T.shape[1:]), fill)
    out[rows] = x_T
    return out.view(num_seqs, longest, *x_T.shape[1:])


class GatedDeltaNet(nn.Module):
    """Linear attention by the gated delta rule, with a causal depthwise conv and a gated output norm."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.num_k_heads, self.num_v_heads = args.linear_num_key_heads, args.linear_num_value_heads
        self.k_dim, self.v_dim = args.linear_key_head_dim, args.linear_value_head_dim
        self.key_dim, self.value_dim = args.gdn_key_dim, args.gdn_value_dim
        # w_qkv's output channels are [q (Hk*K) | k (Hk*K) | v (Hv*V)], each head-major
        self.w_qkv = nn.Linear(args.dim, args.gdn_conv_dim, bias=False)
        self.w_z = nn.Linear(args.dim, self.value_dim, bias=False)
        self.w_b = nn.Linear(args.dim, self.num_v_heads, bias=False)
        self.w_a = nn.Linear(args.dim, self.num_v_heads, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(args.gdn_conv_dim, args.linear_conv_kernel_dim))
        self.dt_bias = nn.Parameter(torch.ones(self.num_v_heads))
        self.A_log = nn.Parameter(torch.zeros(self.num_v_heads))
        self.norm_weight = nn.Parameter(torch.ones(self.v_dim))
        self.norm_eps = args.norm_eps
        self.wo = nn.Linear(self.value_dim, args.dim, bias=False)

    def forward(self, x_TD: torch.Tensor, batch: ForwardBatch, cache: GDNCache | None) -> torch.Tensor:
        return batch.linear(self.heads(x_TD, batch, cache), self.wo.weight)

    def heads(self, x_TD: torch.Tensor, batch: ForwardBatch, cache: GDNCache | None) -> torch.Tensor:
        """The value heads' gated, normed outputs, ``[T, Hv * V]`` head by head: what ``wo`` projects."""
        num_tokens = x_TD.shape[0]
        # a_TH, b_TH: the gates' projections; gates.gdn_gates makes the gates of them (inside the decode kernel on
        # the GPU)
        mixed_TC, z_TV, a_TH, b_TH = batch.linears(
            x_TD, self.w_qkv.weight, self.w_z.weight, self.w_a.weight, self.w_b.weight
        )
        o_THV = self._mix(mixed_TC, a_TH, b_TH, batch, cache)
        z_THV = z_TV.view(num_tokens, self.num_v_heads, self.v_dim)
        y_THV = gated_rms_norm(o_THV, z_THV, self.norm_weight, self.norm_eps, batch.numerics)
        return y_THV.reshape(num_tokens, self.value_dim)

    def _split(self, conv_out_TC: torch.Tensor):
        q, k, v = conv_out_TC.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        lead = conv_out_TC.shape[:-1]
        return (
            q.reshape(*lead, self.num_k_heads, self.k_dim),
            k.reshape(*lead, self.num_k_heads, self.k_dim),
            v.reshape(*lead, self.num_v_heads, self.v_dim),
        )

    def _mix(self, mixed_TC, a_TH, b_TH, batch: ForwardBatch, cache: GDNCache | None) -> torch.Tensor:
        """Conv and gated delta rule for all sequences at once (padded to the longest), each continuing from
        its slot (or from zeros), committing the new states unless verifying. ``a_TH`` and ``b_TH`` are the
        gates' projections.

        Padding steps have k = v = beta = g = 0 (raw gate projections -inf, which make those gates), so they leave
        a state exactly as it was."""
        path = gdn_path(batch.numerics, batch.record_states, cache is not None, batch.max_seqlen, mixed_TC)
        # in the slots, the decode kernels read and write the conv windows and the states where they are and make
        # the gates of the projections themselves (one launch for ~9 small ones), as the whole-sequence forward
        # that computes as decode does; row-by-row numerics keep the torch conv (its fixed-order sum) and gates
        conv_in_slots = path == "slots" and not batch.numerics.row_by_row
        gates_in_kernel = conv_in_slots or path == "as_decode"
        pad = functools.partial(_pad, num_seqs=len(batch.seq_lens), longest=batch.max_seqlen, rows=batch.pad_rows)
        conv_NTC, full_NCL = self._conv(pad(mixed_TC), batch, cache, conv_in_slots)
        q, k, v = self._split(conv_NTC)
        if gates_in_kernel:  # -inf projections make g = 0 and beta = 0 on padding steps
            g, beta = pad(a_TH, float("-inf")), pad(b_TH, float("-inf"))
        else:
            g_TH, beta_TH = gdn_gates(a_TH, b_TH, self.A_log, self.dt_bias, batch.numerics)
            g, beta = pad(g_TH), pad(beta_TH)
        if path == "slots":
            gate_params = (self.A_log, self.dt_bias) if gates_in_kernel else None
            fresh, commit = batch.cache_lens_t == 0, not batch.record_states
            o = recurrent_gated_delta_rule_slots(
                q, k, v, g, beta, cache.ssm, batch.slots_t, None, fresh, commit, gate_params
            )
            new_states = None
        else:
            states = self._initial_states(mixed_TC, batch, cache)
            if path == "as_decode":
                o, new_states = gated_delta_rule_as_decode(q, k, v, g, beta, self.A_log, self.dt_bias, states)
            elif path == "recurrent":
                o, new_states = recurrent_gated_delta_rule(q, k, v, g, beta, states)
            elif path == "chunk_packed":
                qkv = [self._unpad(x, batch.pad_rows) for x in (q, k, v)]
                o_TV, new_states = chunk_gated_delta_rule_varlen(*qkv, g_TH, beta_TH, batch.cu_seqlens, states)
                o = None
            else:
                o, new_states = chunk_gated_delta_rule_padded(q, k, v, g, beta, states)
        if cache is not None:
            self._write_back(cache, batch, conv_NTC, full_NCL, a_TH, b_TH, new_states, conv_in_slots, pad)
        return o_TV if o is None else self._unpad(o, batch.pad_rows).contiguous()

    def _conv(self, mixed_NTC, batch: ForwardBatch, cache: GDNCache | None, in_slots: bool):
        """The causal conv of the padded inputs, from each slot's window (or zeros): in the slots' windows (which it
        then holds) with ``in_slots``, else from gathered windows; ``(conv_NTC, full_NCL)`` (None without a copy)."""
        if in_slots:
            window_steps = cache.conv_steps if batch.record_states else None
            fresh = batch.cache_lens_t == 0
            conv_NTC = causal_conv1d_slots(
                mixed_NTC, self.conv_weight, cache.conv, batch.slots_t, fresh, batch.seq_lens_t, window_steps
            )
            return conv_NTC, None
        if cache is not None and all(batch.cache_lens):  # every sequence continues (decode, verify): its window
            windows = cache.conv[batch.slots_t].to(mixed_NTC.dtype)
        else:
            windows = mixed_NTC.new_zeros(mixed_NTC.shape[0], mixed_NTC.shape[2], self.conv_weight.shape[1] - 1)
            if cache is not None:
                resume = batch.cache_lens_t > 0
                windows = torch.where(resume[:, None, None], cache.conv[batch.slots_t].to(windows.dtype), windows)
        return causal_conv1d_batched(mixed_NTC, self.conv_weight, windows, batch.numerics)

    def _initial_states(self, mixed_TC, batch: ForwardBatch, cache: GDNCache | None) -> torch.Tensor:
        """``[N, Hv, K, V]`` states to start from: the slots' (resumed sequences) or zeros, in fp32 (fp64 for fp64)."""
        acc = torch.promote_types(mixed_TC.dtype, torch.float32)
        if cache is not None and all(batch.cache_lens):  # every sequence continues: its slot's state
            return cache.ssm[batch.slots_t].to(acc)
        states = mixed_TC.new_zeros(len(batch.seq_lens), self.num_v_heads, self.k_dim, self.v_dim, dtype=acc)
        if cache is None:
            return states
        resume = batch.cache_lens_t > 0
        return torch.where(resume[:, None, None, None], cache.ssm[batch.slots_t].to(acc), states)

    def _write_back(self, cache, batch, conv_NTC, full_NCL, a_TH, b_TH, new_states, conv_in_slots, pad) -> None:
        """After the rule: a verify keeps its inputs in the scratch rows (for :meth:`commit_verified`); otherwise the
        new windows and states go to the slots (what the kernels did not already write there)."""
        num_seqs, longest, slots = len(batch.seq_lens), batch.max_seqlen, batch.slots_t
        width1 = self.conv_weight.shape[1] - 1
        if batch.record_states:
            cache.verify_mixed[:num_seqs, :longest] = conv_NTC
            cache.verify_a[:num_seqs, :longest] = pad(a_TH, float("-inf"))
            cache.verify_b[:num_seqs, :longest] = pad(b_TH, float("-inf"))
            if not conv_in_slots:
                steps = full_NCL.unfold(2, width1, 1)[:, :, 1:].transpose(1, 2)
                cache.conv_steps[:num_seqs, :longest] = steps.to(cache.conv_steps.dtype)
        elif not conv_in_slots:
            # the last W-1 inputs of each sequence
            index = batch.seq_lens_t[:, None] + torch.arange(width1, device=full_NCL.device)[None]
            new_windows = full_NCL.gather(2, index[:, None, :].expand(-1, full_NCL.shape[1], -1))
            if new_states is not None:
                cache.ssm[slots] = new_states.to(cache.ssm.dtype)
            cache.conv[slots] = new_windows.to(cache.conv.dtype)

    @torch.no_grad()
    def commit_verified(
        self,
        cache: GDNCache,
        slots_B: torch.Tensor,
        accepted_B: torch.Tensor,
        numerics: Numerics = FAST,
        rows_B: torch.Tensor | None = None,
    ) -> None:
        """After a verify of B rows (batch row b in slot ``slots_B[b]``, in the verify's row order), commit each row's
        first ``accepted_B[b] + 1`` tokens: the conv window after them copied from ``conv_steps``, the recurrent
        state stepped over them again from the slot's state, from the inputs the verify kept, by the recurrence the
        verify ran (the steps past them padded with -inf gate projections, which leave a state as it is), so it
        equals the verify's state after that token. ``numerics`` must be the verify's. ``rows_B``: the verify's rows
        to commit, into ``slots_B`` (a copy of their states, for a snapshot part-way; default: every row, in
        order)."""
        num_rows, steps = slots_B.shape[0], cache.verify_a.shape[1]
        rows = torch.arange(num_rows, device=slots_B.device) if rows_B is None else rows_B
        pick = slice(num_rows) if rows_B is None else rows_B
        copy_rows(cache.conv, slots_B, cache.conv_steps.flatten(0, 1), rows * steps + accepted_B)
        dropped = (torch.arange(steps, device=slots_B.device) > accepted_B[:, None])[..., None]  # [B, steps, 1]
        a, b = (x[pick].masked_fill(dropped, float("-inf")) for x in (cache.verify_a, cache.verify_b))
        q, k, v = self._split(cache.verify_mixed[pick])
        if states_in_slots(q):  # as the verify ran: in the kernel, on the slots' states, its gates but row by row
            if numerics.row_by_row:
                g, beta = gdn_gates(a, b, self.A_log, self.dt_bias, numerics)
                recurrent_gated_delta_rule_slots(q, k, v, g, beta, cache.ssm, slots_B)
            else:
                recurrent_gated_delta_rule_slots(
                    q, k, v, a, b, cache.ssm, slots_B, gate_params=(self.A_log, self.dt_bias)
                )
            return
        g, beta = gdn_gates(a, b, self.A_log, self.dt_bias, numerics)
        states = cache.ssm[slots_B].to(torch.promote_types(q.dtype, torch.float32))
        _, final = recurrent_gated_delta_rule(q, k, v, g, beta, states)
        cache.ssm[slots_B] = final.to(cache.ssm.dtype)

    @staticmethod
    def _unpad(x_NT: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """``[N, longest, ...]`` -> packed ``[T, ...]``."""
        x = x_NT.reshape(x_NT.shape[0] * x_NT.shape[1], *x_NT.shape[2:])
        return x if rows is None else x[rows]
