"""Smoke run of ``benchmarks/prefix_cache_gpu.py`` on CPU (tiny preset, fp32): it runs, writes its JSON, the multi-turn
workload computes fewer prefill tokens with the prefix cache and gives the same outputs, paged blocks and fixed slots
decode the same tokens, and the paged pool runs at least as many mixed-length requests at once as whole-context slots
would fit. Not a measurement (the GPU run is)."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "prefix_cache_gpu.py"


def test_prefix_cache_benchmark_smoke(tmp_path):
    out = tmp_path / "prefix_cache.json"
    command = [sys.executable, str(SCRIPT), "--preset", "tiny", "--device", "cpu", "--out", str(out)]
    command += ["--conversations", "2", "--turns", "2", "--user-tokens", "12", "--answer-tokens", "8"]
    command += ["--batch", "3", "--prompt-len", "8", "--new-tokens", "16", "--min-new", "4", "--context", "64"]
    command += ["--pool-tokens", "96", "--track-interval", "16", "--snapshots", "4"]
    subprocess.run(command, check=True, capture_output=True, cwd=SCRIPT.parent)
    results = json.loads(out.read_text())["results"]
    with_cache, without = results["multi_turn"]
    assert results["multi_turn_same_outputs"]
    assert with_cache["turns"][1]["cached_tokens"] > 0 and without["turns"][1]["cached_tokens"] == 0
    assert with_cache["prefill_tokens_computed"] < without["prefill_tokens_computed"] == without["prompt_tokens"]
    paged, fixed = results["rl_decode"]
    assert paged["tokens"] == fixed["tokens"] and paged["page_size"] < fixed["page_size"]
    capacity = results["capacity"]
    assert capacity["peak_running_paged"] >= capacity["fixed_slots_that_fit"] and capacity["requests"] == 3
