"""The pure helpers of ``benchmarks/profile_decode.py``, on hand-made inputs: the timeline's gaps from a Chrome
trace, and the routing's spread over the experts."""

import gzip
import json

import torch

from tests.benchmarks import load_benchmark


def test_timeline_gaps_splits_short_and_long_idle(tmp_path):
    profile_decode = load_benchmark("profile_decode")
    # kernels (ts, dur) in µs: [0, 10), [10.5, 15.5) -> 0.5 idle; [12, 14) inside the previous; [100, 101) -> 84.5
    kernels = [(0, 10), (10.5, 5), (12, 2), (100, 1)]
    events = [{"cat": "kernel", "ts": ts, "dur": dur} for ts, dur in kernels] + [{"cat": "cpu_op", "ts": 50, "dur": 9}]
    trace = tmp_path / "t.json.gz"
    with gzip.open(trace, "wt") as f:
        json.dump({"traceEvents": events}, f)
    gaps = profile_decode.timeline_gaps(trace, steps=2)
    assert gaps["kernels_per_step"] == 2.0
    assert abs(gaps["gaps_up_to_50us_ms_per_step"] - 0.5e-3 / 2) < 1e-12
    assert abs(gaps["longer_gaps_ms_per_step"] - 84.5e-3 / 2) < 1e-12


def test_routing_spread_counts_rows_per_expert():
    profile_decode = load_benchmark("profile_decode")
    # 4 tokens, top-2 over 4 experts: expert 0 chosen by every token; drawn in sets of all 4 tokens
    experts = torch.tensor([[0, 1], [0, 2], [0, 1], [0, 3]])
    spread = profile_decode.routing_spread([experts], num_experts=4, batch=4, draws=3)
    assert spread["sets"] == 3 and spread["mean_rows"] == 2.0  # 8 pairs over 4 experts
    assert spread["max_rows"] == 4.0 and spread["max_rows_mean_over_sets"] == 4.0
    assert spread["idle_experts_share"] == 0.0 and spread["share_of_experts_over_16_rows"] == 0.0
    # a call with fewer tokens than the batch is skipped
    assert profile_decode.routing_spread([experts[:2]], num_experts=4, batch=4) == {}
