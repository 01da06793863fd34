"""``league generate`` and ``league serve`` as a user runs them: greedy output equal to transformers' ``generate``,
log-probs equal to ``league score``, speculative flags, JSONL input, bad input, and the real server process."""

import json
import socket

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from league.checkpoint.hf import load_model
from league.cli import app
from league.engine.config import EngineConfig
from league.engine.engine import LLMEngine
from league.engine.request import SamplingParams
from league.engine.server import EngineServer
from tests.engine.servers import league_serve

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "tiny"
    result = invoke("init", "--preset", "tiny", "--out", out, "--seed", "3")
    assert result.exit_code == 0, result.output
    return out


def generate_json(tiny_dir, *args):
    result = invoke("generate", "--model", tiny_dir, "--json", "--ignore-eos", *args)
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("spec", [[], ["--speculative-algorithm", "EAGLE", "--speculative-num-steps", "2"]])
def test_greedy_generate_equals_transformers_and_score(tiny_dir, tmp_path, spec):
    prompt = [5, 17, 23, 42, 8, 60]
    [out] = generate_json(
        tiny_dir,
        "--input-ids",
        ",".join(map(str, prompt)),
        "--temperature",
        "0",
        "--max-new-tokens",
        "16",
        "--batch-invariant",
        *spec,
    )
    hf = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    expected = hf.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        do_sample=False,
        max_new_tokens=16,
        min_new_tokens=16,
        pad_token_id=0,
        eos_token_id=None,
    )
    assert out["output_ids"] == expected[0, len(prompt) :].tolist()
    seqs = tmp_path / "seq.jsonl"
    seqs.write_text(json.dumps({"input_ids": prompt + out["output_ids"]}) + "\n")
    scored = invoke("score", "--model", tiny_dir, "--input", seqs, "--json", "--batch-invariant")
    assert scored.exit_code == 0, scored.output
    token_logprobs = json.loads(scored.stdout.strip().splitlines()[-1])["token_logprobs"]
    assert token_logprobs[len(prompt) - 1 :] == out["output_token_logprobs"]  # bitwise


def test_generate_from_a_jsonl_file_with_n_samples(tiny_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"text": "12+7="}) + "\n" + json.dumps({"input_ids": [3, 4, 5]}) + "\n")
    outs = generate_json(tiny_dir, "--input-file", prompts, "--n", "3", "--seed", "1", "--max-new-tokens", "5")
    assert len(outs) == 6 and all(len(o["output_ids"]) == 5 for o in outs)
    assert all("text" in o for o in outs)
    result = invoke(
        "generate",
        "--model",
        tiny_dir,
        "--input-ids",
        "1,2",
        "--max-new-tokens",
        "4",
        "--speculative-algorithm",
        "EAGLE",
    )
    assert result.exit_code == 0 and "tokens/s" in result.output and "acceptance length" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--input-ids", "1,2,99999"], "outside"),
        (["--input-ids", "1,x"], "comma-separated"),
        (["--prompt", "a", "--input-ids", "1"], "exactly one"),
        (["--input-file", "/nonexistent.jsonl"], "no such file"),
        (["--input-ids", "1", "--temperature", "0", "--top-p", "0"], "top_p"),
        (["--input-ids", "1", "--seed", str(2**63)], "`--seed` must be an integer in [0, 2**63 - 1]"),
        (["--input-ids", "1", "--seed", str(2**63 - 1), "--n", "2"], "exceeds 2**63 - 1"),
    ],
)
def test_generate_bad_input(tiny_dir, args, message):
    result = invoke("generate", "--model", tiny_dir, *args)
    assert result.exit_code == 1 and message in result.output


def test_league_serve_process_answers_like_the_engine(tiny_dir):
    args = ["--model", str(tiny_dir), "--port", "0", "--context-length", "64", "--device", "cpu"]
    with league_serve(args) as (_, client):
        gen = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, 80, (int(n),), generator=gen).tolist() for n in torch.randint(2, 12, (64,))]
        params = [
            SamplingParams(max_new_tokens=6, temperature=[0.0, 1.0][i % 2], seed=i, ignore_eos=True) for i in range(64)
        ]
        outs = client.generate(prompts, params)  # 64 requests in flight at once
        engine = LLMEngine(load_model(tiny_dir), EngineConfig(max_running_requests=64, context_length=64))
        expected = engine.generate(prompts, params)
        assert [o.output_ids for o in outs] == [o.output_ids for o in expected]


def test_serve_on_a_port_in_use_or_a_bad_host_is_one_error_line(tiny_dir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = invoke("serve", "--model", tiny_dir, "--port", port)
        assert result.exit_code == 1
        expected = f"cannot serve on 127.0.0.1:{port}: `--port` {port} is in use; pick another (0 picks a free one)"
        assert result.stderr == f"error: {expected}\n"
        with pytest.raises(ValueError, match="is in use"):  # the server's own bind says the same
            EngineServer(None, "127.0.0.1", port)
    for host in ("999.1.1.1", "8.8.8.8"):  # not an address at all; not one of this machine's
        result = invoke("serve", "--model", tiny_dir, "--host", host, "--port", 0)
        assert result.exit_code == 1 and f"`--host` '{host}' is not an address of this machine" in result.stderr
        assert len(result.stderr.splitlines()) == 1
