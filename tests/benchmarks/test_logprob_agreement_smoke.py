"""Smoke test of ``benchmarks/logprob_agreement_gpu.py --routing-replay`` on CPU (tiny preset, fp32): it runs, writes
its JSON, and in fp32 the trainer routes as the rollout did, so replaying the rollout's experts changes no log-prob
and both gaps are fp32 rounding. Not a measurement of the bf16 GPU gap."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "logprob_agreement_gpu.py"


def test_logprob_agreement_with_routing_replay_smoke(tmp_path):
    out = tmp_path / "agreement.json"
    command = [sys.executable, str(SCRIPT), "--preset", "tiny", "--device", "cpu", "--dtype", "float32"]
    command += ["--batch", "4", "--new-tokens", "16", "--routing-replay", "--out", str(out)]
    subprocess.run(command, check=True, capture_output=True, cwd=SCRIPT.parent)
    block = json.loads(out.read_text())["results"][0]
    replay = block["routing_replay"]
    assert replay["with"]["rollout_vs_trainer"] == replay["without"]["rollout_vs_trainer"]
    assert replay["without"]["rollout_vs_trainer"] == block["rollout_vs_trainer"]
    assert block["rollout_vs_trainer"]["max_abs_diff"] < 1e-4 and abs(replay["with"]["kl_low_var"]) < 1e-8
