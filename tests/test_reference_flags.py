"""The reference recipe's command lines, as its users type them: ``--sglang-<name>`` engine options and argparse-style
space-separated lists reach league's config (no value lost), SGLang options league does not have are errors naming
them, and what the engine cannot do yet (several GPUs per engine) is refused at start with the flag's name."""

import json
import re

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
    "--sglang-speculative-num-draft-tokens 3 --sglang-max-running-requests 256 "
    "--sglang-mamba-scheduler-strategy extra_buffer"
).split()
GRAPH_SIZES = [1, 2, 4, 8, *range(16, 129, 8)]
ONE_RANK = ("--ep", "1", "--rollout-num-gpus-per-engine", "1", "--sglang-ep-size", "1")
"""The recipe brought to one process: its trainer's EP8 and its engine over 8 ranks set back to one rank."""


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
        assert engine["mamba_scheduler_strategy"] == "extra_buffer" and engine["disable_radix_cache"] is False
        assert config["rollout"]["rollout_num_gpus_per_engine"] == 8
    # then the run's own start-up error: the recipe's EP8 needs 8 processes
    assert result.exit_code == 1 and "start a multiple of 8 processes" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--rollout-num-gpus-per-engine", "8"],
            "an engine over 8 ranks (`--rollout-num-gpus-per-engine` 8, `--sglang-tp-size` 8, `--sglang-ep-size` 1) "
            "needs a multiple of 8 ranks; the run has 1",
        ),
        (
            ["--sglang-ep-size", "8"],
            "an engine over 8 ranks (`--rollout-num-gpus-per-engine` 1, `--sglang-tp-size` 1, `--sglang-ep-size` 8) "
            "needs a multiple of 8 ranks; the run has 1",
        ),
        (
            ["--rollout-num-gpus-per-engine", "4", "--sglang-ep-size", "8"],
            "`--rollout-num-gpus-per-engine` 4 with the engine's `--sglang-tp-size` 1 and `--sglang-ep-size` 8",
        ),
    ],
)
def test_an_engine_layout_the_ranks_cannot_hold_is_refused_by_name(args, message):
    result, config = dry_run(*ONE_RANK, *args)
    assert config is not None and result.exit_code == 1 and message in result.stderr


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("--sglang-chunked-prefill-size", "league's engine has no option `chunked_prefill_size`"),
    ],
)
def test_sglang_options_league_lacks_are_errors_naming_them(flag, message):
    result = CliRunner().invoke(app, ["train", "--dry-run", flag, "4"])
    assert result.exit_code == 1 and message in result.stderr and flag in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sglang-mamba-scheduler-strategy", "ping_pong"], "`mamba_scheduler_strategy` 'ping_pong'"),
        (["--sglang-mamba-scheduler-strategy", "no_buffer"], "needs `page_size` 1 (got 16)"),
        (["--sglang-mamba-track-interval", "100"], "must be a multiple of `page_size` (16)"),
    ],
)
def test_prefix_cache_settings_are_checked_by_name(args, message):
    result, _ = dry_run(*args)
    assert result.exit_code != 0 and message in result.output + result.stderr


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


MODEL = (
    "--spec miles_plugins.models.qwen3_5 get_qwen3_5_spec --disable-bias-linear --qk-layernorm "
    "--group-query-attention --num-attention-heads 16 --num-query-groups 2 --kv-channels 256 "
    "--num-layers 40 --hidden-size 2048 --ffn-hidden-size 512 --normalization RMSNorm "
    "--apply-layernorm-1p --position-embedding-type rope --norm-epsilon 1e-6 --rotary-percent 0.25 "
    "--swiglu --untie-embeddings-and-output-weights --vocab-size 248320 --rotary-base 10000000 "
    "--moe-ffn-hidden-size 512 --moe-shared-expert-intermediate-size 512 "
    "--moe-router-score-function softmax --moe-token-dispatcher-type alltoall --moe-router-topk 8 "
    "--moe-layer-freq [1]*40 --num-experts 256 --moe-grouped-gemm --moe-token-drop-policy probs "
    "--moe-router-dtype fp32 --moe-permute-fusion --moe-aux-loss-coeff 0 --attention-output-gate "
    "--moe-shared-expert-gate --mtp-num-layers 1"
).split()


def test_the_reference_model_arguments_agree_with_the_architecture():
    """The reference's model file, as it is, passes the checks against the policy's architecture (here the preset
    its checkpoint is planned from); all lists together reach the run's own start-up error."""
    result, config = dry_run(*ONE_RANK, *MODEL)
    # the checks pass; what stops this machine's dry run is the checkpoint it does not have
    assert config is not None and "`--hf-checkpoint`" in result.stderr and "no such folder" in result.stderr
    arch = config["architecture"]
    assert arch["num_layers"] == 40 and arch["spec"] == ["miles_plugins.models.qwen3_5", "get_qwen3_5_spec"]
    assert arch["rotary_base"] == 1e7 and arch["moe_layer_freq"] == "[1]*40" and arch["swiglu"] is True
    optimizer = ["--optimizer-cpu-offload", "--overlap-cpu-optimizer-d2h-h2d", "--use-precision-aware-optimizer"]
    recompute = "--recompute-granularity full --recompute-method uniform --recompute-num-layers 1".split()
    result, config = dry_run(*MODEL, *ALGORITHM, *SGLANG, *optimizer, *recompute)
    assert config is not None and result.exit_code == 1 and "start a multiple of 8 processes" in result.stderr
    assert config["engine"]["cuda_graph_bs"] == GRAPH_SIZES and config["architecture"]["moe_router_topk"] == 8
    assert config["optim"]["overlap_cpu_optimizer_d2h_h2d"] and config["optim"]["use_precision_aware_optimizer"]
    assert (config["train"]["recompute_method"], config["train"]["recompute_num_layers"]) == ("uniform", 1)
    assert config["algo"]["eps_clip_high"] == 0.28 and config["rollout"]["rollout_num_gpus_per_engine"] == 8


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--num-layers", "48"], "`--num-layers` 48 differs from the policy's architecture: 40 in the preset"),
        (["--rotary-base", "1000000"], "`--rotary-base` 1000000.0 differs from the policy's architecture: 10000000.0"),
        (["--moe-aux-loss-coeff", "0.001"], "`--moe-aux-loss-coeff` 0.001 differs"),
        (["--no-swiglu"], "`--swiglu` False differs"),
        (["--normalization", "LayerNorm"], "`--normalization` 'LayerNorm' differs"),
        (["--moe-layer-freq", "[1]*20"], "every layer of the preset qwen3.6-35b-a3b"),
    ],
)
def test_a_model_argument_that_differs_is_named_with_both_values(args, message):
    result, config = dry_run(*ONE_RANK, *args)
    assert result.exit_code == 1 and message in result.stderr, result.stderr


def test_train_help_groups_the_options_and_names_the_reference_spelling():
    result = CliRunner().invoke(app, ["train", "--help"], terminal_width=200)
    text = re.sub(r"(?<=\w)- (?=[a-z])", "-", " ".join(result.output.split()))  # the wrapped help, one line
    titles = ["Model:", "Data:", "Rollout:", "Engine (SGLang's names", "Algorithm:", "Optimizer:", "Parallel layout:"]
    titles += ["Checkpoints:", "Run and logging:", "Model: the reference's architecture arguments"]
    positions = [text.index(title) for title in titles]
    assert positions[:-1] == sorted(positions[:-1])
    engine = text[text.index("Engine (SGLang's names") : text.index("Algorithm:")]
    assert "--cuda-graph-bs" in engine and "(also --sglang-cuda-graph-bs)" in engine
    assert "--eps-clip-high" in text[text.index("Algorithm:") : text.index("Training:")]
    assert "--rotary-base" in text[positions[-1] :]


def test_serve_and_generate_take_sglangs_launch_names(tmp_path):
    """SGLang's launch_server spelling (``--model-path``, ``--tp-size``, space-separated ``--cuda-graph-bs``) reaches
    the same options as league's."""
    from league.checkpoint.init import init_checkpoint

    folder = init_checkpoint("tiny", tmp_path / "tiny", seed=0)
    args = ["generate", "--model-path", str(folder), "--input-ids", "5,6", "--max-new-tokens", "2", "--device", "cpu"]
    result = CliRunner().invoke(app, [*args, "--tp-size", "1", "--cuda-graph-bs", "1", "2"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, [*args, "--tp-size", "2"])
    assert result.exit_code == 1
    assert "`--tp-size` 2 / `--ep-size` 1 ask for an engine over 2 ranks" in result.stderr
    assert "start 2 processes (`--nproc-per-node 2` or torchrun)" in result.stderr


def test_the_reference_optimizer_flags():
    result, config = dry_run(*ONE_RANK, "--optimizer-cpu-offload", "--use-precision-aware-optimizer")
    assert config["optim"]["optimizer_cpu_offload"] is True and config["optim"]["use_precision_aware_optimizer"] is True
    assert "no such folder" in result.stderr  # the checks pass; this machine lacks the checkpoint
    result, config = dry_run(*ONE_RANK, "--overlap-cpu-optimizer-d2h-h2d")
    assert config["optim"]["overlap_cpu_optimizer_d2h_h2d"] is True
    assert "no such folder" in result.stderr  # accepted (the recipe offloads its optimizer)
    result = CliRunner().invoke(app, ["train", "--dry-run", "--overlap-cpu-optimizer-d2h-h2d"])
    assert result.exit_code == 1 and "it needs `--optimizer-cpu-offload`" in result.stderr
