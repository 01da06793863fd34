"""The reference recipe's command lines, as its users type them: ``--sglang-<name>`` engine options and argparse-style
space-separated lists reach league's config (no value lost), SGLang options league does not have are errors naming
them, and what the engine cannot do yet (several GPUs per engine) is refused at start with the flag's name."""

import json

import pytest
from typer.testing import CliRunner

from league.cli import app
from league.flags import reference_argv

ALGORITHM = (
    "--tp 1 --ep 8 --cp 1 --pp 1 --etp 1 --num-rollout 10 --advantage-estimator grpo --use-kl-loss --kl-loss-coef 0.00 "
    "--kl-loss-type low_var_kl --entropy-coef 0.00 --eps-clip 0.2 --eps-clip-high 0.28 "
    "--enable-mtp-training --mtp-num-layers 1 --mtp-loss-scaling-factor 0.2"
).split()
SGLANG = (
    "--rollout-num-gpus-per-engine 8 --sglang-mem-fraction-static 0.7 --sglang-ep-size 8 "
    "--sglang-cuda-graph-bs 1 2 4 8 16 24 32 40 48 56 64 72 80 88 96 104 112 120 128 "
    "--sglang-speculative-algorithm EAGLE --sglang-speculative-num-steps 2 --sglang-speculative-eagle-topk 1 "
    "--sglang-speculative-num-draft-tokens 3 --sglang-max-running-requests 256"
).split()
GRAPH_SIZES = [1, 2, 4, 8, *range(16, 129, 8)]


def dry_run(*args: str):
    result = CliRunner().invoke(app, ["train", "--recipe", "qwen3_6_35b_a3b_mtp", "--dry-run", *args])
    config = json.loads(result.stdout) if result.stdout.lstrip().startswith("{") else None
    return result, config


@pytest.mark.parametrize("lists", [[ALGORITHM], [SGLANG], [ALGORITHM, SGLANG]], ids=["algorithm", "sglang", "both"])
def test_the_reference_lists_resolve_into_the_config(lists):
    result, config = dry_run(*(arg for flags in lists for arg in flags))
    assert config is not None, result.output
    if ALGORITHM in lists:
        assert {k: config["parallel"][k] for k in ("tp", "ep", "cp", "pp", "etp")} == dict(
            tp=1, ep=8, cp=1, pp=1, etp=1
        )
        assert config["algo"]["use_kl_loss"] is True and config["algo"]["kl_loss_type"] == "low_var_kl"
        assert config["algo"]["eps_clip_high"] == 0.28 and config["algo"]["enable_mtp_training"] is True
        assert config["model"]["mtp_num_layers"] == 1 and config["algo"]["mtp_loss_scaling_factor"] == 0.2
        assert config["rollout"]["num_rollout"] == 10
    if SGLANG in lists:
        engine = config["engine"]
        assert engine["cuda_graph_bs"] == GRAPH_SIZES and engine["mem_fraction_static"] == 0.7
        assert engine["ep_size"] == 8 and engine["max_running_requests"] == 256
        assert engine["speculative_algorithm"] == "EAGLE" and engine["speculative_num_steps"] == 2
        assert engine["speculative_eagle_topk"] == 1 and engine["speculative_num_draft_tokens"] == 3
        assert config["rollout"]["rollout_num_gpus_per_engine"] == 8
    # then the run's own start-up error: the recipe's EP8 needs 8 processes
    assert result.exit_code == 1 and "start a multiple of 8 processes" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rollout-num-gpus-per-engine", "8"], "`--rollout-num-gpus-per-engine` 8: league's engine runs in one"),
        (["--sglang-ep-size", "8"], "`--sglang-tp-size` 1 / `--sglang-ep-size` 8: league's engine runs in one"),
    ],
)
def test_an_engine_over_several_gpus_is_refused_by_name(args, message):
    result, config = dry_run("--ep", "1", *args)
    assert config is not None and result.exit_code == 1 and message in result.stderr


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("--sglang-chunked-prefill-size", "league's engine has no option `chunked_prefill_size`"),
        ("--sglang-mamba-scheduler-strategy", "is not supported yet: the engine's prefix cache"),
    ],
)
def test_sglang_options_league_lacks_are_errors_naming_them(flag, message):
    result = CliRunner().invoke(app, ["train", "--dry-run", flag, "4"])
    assert result.exit_code == 1 and message in result.stderr and flag in result.stderr


def test_reference_argv():
    fields, lists = {"cuda_graph_bs", "mem_fraction_static"}, {"--cuda-graph-bs"}
    argv = ["--sglang-cuda-graph-bs", "1", "2", "4", "--sglang-mem-fraction-static=0.7", "--lr", "1e-6", "-x"]
    assert reference_argv(argv, fields, lists) == [
        "--cuda-graph-bs",
        "1,2,4",
        "--mem-fraction-static=0.7",
        "--lr",
        "1e-6",
        "-x",
    ]
    assert reference_argv(["--cuda-graph-bs", "1,2", "--x"], fields, lists) == ["--cuda-graph-bs", "1,2", "--x"]
    with pytest.raises(ValueError, match="no option `tp_sizes`"):
        reference_argv(["--sglang-tp-sizes", "2"], fields, lists)
