"""``league bench``: the bytes a decode step must move (by hand), a timed rollout of the tiny preset on the CPU, the
command's table and JSON, and its errors."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from league.bench import BenchSettings, bench_model, param_counts, rollout_rates, step_bytes
from league.cli import app
from league.models.qwen3_5_moe.presets import PRESETS

runner = CliRunner()


def test_step_bytes_by_hand():
    args = PRESETS["tiny"]  # 3 GDN + 1 attention layers, 8 experts of 3 x 128 x 64, top-2
    expert = 3 * 128 * 64 * 2
    counts = param_counts(args)
    assert counts["experts"] == 4 * 8 * 3 * 128 * 64 and counts["embedding"] == 128 * 128
    dense = counts["other"] * 2
    # one token routes to exactly top-k experts in each layer
    assert step_bytes(args, 1, 0.0) == pytest.approx(4 * 2 * expert + dense + per_request(args, 0.0))
    # keys and values: 1 attention layer x (k, v) x 2 heads x 32 dims x 2 bytes, per context token
    assert step_bytes(args, 1, 10.0) - step_bytes(args, 1, 0.0) == pytest.approx(10 * 2 * 2 * 32 * 2)
    # every expert of every layer once the batch is large; each request adds its own state, window and keys
    many = step_bytes(args, 10_000, 5.0)
    assert many == pytest.approx(4 * 8 * expert + dense + 10_000 * per_request(args, 5.0), rel=1e-9)


def per_request(args, context: float) -> float:
    """A request's bytes by hand for the tiny preset: fp32 GDN state (4 value heads of 32 x 32) and the conv
    window (conv dim 2 x 2 x 32 + 4 x 32 = 256 channels, 3 columns, bf16), each read and written, in 3 layers;
    its keys and values read at ``context``."""
    state = 3 * 4 * 32 * 32 * 4
    conv = 3 * 256 * 3 * 2
    assert args.gdn_conv_dim == 256
    return 2 * state + 2 * conv + 2 * 2 * 32 * 2 * context


def test_a_tiny_rollout_is_timed_beside_its_roofline():
    model, _ = bench_model(preset="tiny", num_layers=2, device="cpu", dtype="float32")
    assert model.args.num_layers == 2
    settings = BenchSettings(batch=2, prompt_len=4, new_tokens=3, temperature=0.0, memory_bytes_per_s=1e9)
    record = rollout_rates(model, settings)
    assert record["seconds"] > 0 and record["prefill_seconds"] > 0
    assert record["tokens_per_s"] == pytest.approx(2 * 3 / record["seconds"])
    decode_s = record["seconds"] - record["prefill_seconds"]  # may be <= 0 on a busy CPU: then the rate is NaN
    rate = record["decode_tokens_per_s"]
    assert rate == pytest.approx(2 * 2 / decode_s) if decode_s > 0 else math.isnan(rate)
    # fp32 weights: 4 bytes an element; mean context 4 + 3 / 2
    moved = step_bytes(model.args, 2, 5.5, state_bytes=4, weight_bytes=4)
    assert record["roofline_tokens_per_s"] == pytest.approx(2 / (moved / 1e9))
    assert record["roofline_fraction"] == pytest.approx(rate / record["roofline_tokens_per_s"], nan_ok=True)
    assert "spec_accept_length" not in record


def test_speculation_reports_its_acceptance():
    torch.manual_seed(0)
    model, _ = bench_model(preset="tiny", num_layers=2, mtp_num_layers=1, device="cpu", dtype="float32")
    record = rollout_rates(model, BenchSettings(batch=2, prompt_len=3, new_tokens=5, temperature=0.0, spec_steps=2))
    assert 1.0 <= record["spec_accept_length"] <= 3.0


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(), "exactly one of --model"),
        (dict(preset="tiny", model_dir="x"), "exactly one of --model"),
        (dict(preset="nope"), "preset 'nope'"),
        (dict(preset="tiny", num_layers=0), "at least 1"),
        (dict(preset="qwen3.6-35b-a3b", num_layers=400, dtype="float32"), "GiB in float32"),
    ],
)
def test_bad_models_are_user_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        bench_model(device="cpu", **kwargs)


def test_bad_settings_are_user_errors():
    args = PRESETS["tiny"].replace(mtp_num_layers=0)
    for settings, message in [
        (BenchSettings(new_tokens=1), "new_tokens at least 2"),
        (BenchSettings(spec_steps=2), "MTP layer"),
        (BenchSettings(mamba_ssm_dtype="float16"), "float32 or bfloat16"),
        (BenchSettings(memory_bytes_per_s=0), "memory_bytes_per_s"),
    ]:
        with pytest.raises(ValueError, match=message):
            settings.check(args)


def test_the_command_prints_a_table_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    args = ["bench", "--preset", "tiny", "--num-layers", "2", "--batch", "1,2", "--prompt-len", "3"]
    args += ["--new-tokens", "3", "--temperature", "0", "--device", "cpu", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "roofline" in result.output and "wrote" in result.output
    record = json.loads(out.read_text())
    assert set(record["results"]) == {"b1", "b2"} and record["settings"]["num_layers"] == 2
    assert record["results"]["b2"]["tokens_per_s"] > 0


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--batch", "a,b"], "comma-separated integers"),
        (["--speculative-num-steps", "2", "--mtp-num-layers", "0"], "MTP layer"),
        (["--memory-bandwidth", "0"], "`--memory-bandwidth` must be a finite number > 0"),
        (["--memory-bandwidth", "nan"], "`--memory-bandwidth` must be a finite number > 0"),
        (["--out", "/dev/null/result.json"], "`--out` /dev/null is not a folder"),
    ],
)
def test_the_command_reports_bad_input_in_one_line(extra, message):
    result = runner.invoke(app, ["bench", "--preset", "tiny", "--device", "cpu", *extra])
    assert result.exit_code == 1
    assert message in result.output
