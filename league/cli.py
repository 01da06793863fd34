"""The ``league`` command line: a thin Typer shell over library functions.

One function per command: it parses its flags, calls one library function and prints the result. A user
error (``ValueError``) or an I/O failure (``OSError``) is printed as one red ``error: ...`` line with exit code 1,
no traceback. Imports
of torch and the library happen inside the commands so that ``league --help`` starts quickly. Not
responsible for any logic: that lives in the function each command calls.
"""

import dataclasses
import json
import os
import sys
import typing
from pathlib import Path
from typing import Annotated

import typer
import typer.core
from rich.table import Table

from league.cli_convert import convert_app
from league.cli_output import stderr, stdout, user_errors
from league.engine.config import EngineConfig


class _ReferenceSpelling(typer.core.TyperGroup):
    """Takes the reference system's spelling of a command line before parsing it (``flags.reference_argv``):
    ``--sglang-<name>`` engine options and space-separated list values."""

    def parse_args(self, ctx, args):
        if args and args[0] in ("train", "eval", "serve", "generate", "bench"):
            from league.flags import all_flags, base_type, reference_argv

            fields = {f.name for f in dataclasses.fields(EngineConfig)}
            lists = {f.option for f in all_flags() if typing.get_origin(base_type(f.annotation)) is list}
            with user_errors():
                rest = reference_argv(args[1:], fields, lists)
            if args[0] in ("serve", "generate", "bench"):  # SGLang's launch_server name of the model folder
                rest = ["--model" if a == "--model-path" else a for a in rest]
            args = [args[0], *rest]
        return super().parse_args(ctx, args)


class _GroupedOptions(typer.core.TyperCommand):
    """Plain help with the options in sections, one per group (``rich_help_panel``), in the order they appear."""

    def format_options(self, ctx, formatter) -> None:
        sections: dict[str, list] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:
                sections.setdefault(getattr(param, "rich_help_panel", None) or "Options", []).append(record)
        for title, records in sections.items():
            with formatter.section(title):
                formatter.write_dl(records)


app = typer.Typer(
    cls=_ReferenceSpelling,
    name="league",
    help="GRPO post-training for Qwen3.5 / Qwen3.6 MoE models (Gated DeltaNet + MoE + MTP), with its own engine.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
app.add_typer(convert_app, name="convert")


NUMERICS_HELP = (
    "How forwards compute: fast; batch_invariant (every token independent of the batch: bitwise equal to `league "
    "score` and the trainer, slower); decode_parity (prefill and training compute as decode does: the trainer's "
    "log-probs equal the sampled ones). Default: fast."
)
NumericsOption = Annotated[str | None, typer.Option(help=NUMERICS_HELP)]
NprocOption = Annotated[
    int,
    typer.Option(
        min=1,
        help="Processes to run one engine over (torchrun on this machine; one GPU each), laid out by --tp-size and "
        "--ep-size (both left at 1: the heads split over all of them). Under torchrun: 1 or torchrun's count.",
    ),
]


def on_engine_ranks(nproc_per_node: int, device: str | None):
    """The ranks of an engine command (``generate``, ``serve``, ``bench``): with ``--nproc-per-node`` N > 1 outside
    torchrun, this process becomes torchrun running the same command in N processes; otherwise a
    context of the process group (a one-process ``Ranks`` without torchrun)."""
    from league.checkpoint.hf import resolve_device_dtype
    from league.parallel.launch import become_torchrun, distributed, run_world_size, under_torchrun

    if nproc_per_node > 1 and not under_torchrun():
        become_torchrun(nproc_per_node, sys.argv[1:])
    with user_errors():
        run_world_size(nproc_per_node)
        device_type = resolve_device_dtype(device, None)[0].type
    return distributed(device_type)


BatchInvariantAlias = Annotated[
    bool, typer.Option("--batch-invariant", help="Alias of --numerics batch_invariant.", show_default=False)
]
DecodeParityAlias = Annotated[
    bool, typer.Option("--decode-parity", help="Alias of --numerics decode_parity.", show_default=False)
]


def numerics_of(numerics: str | None, batch_invariant: bool, decode_parity: bool) -> str:
    """The numerics mode from ``--numerics`` and its aliases ``--batch-invariant`` / ``--decode-parity``."""
    from league.ops.numerics import Numerics

    given = [m for m, on in (("batch_invariant", batch_invariant), ("decode_parity", decode_parity)) if on]
    if numerics is not None:
        given.append(Numerics(numerics).mode)
    if len(set(given)) > 1:
        raise ValueError(f"`--numerics` is given twice ({' and '.join(given)}); choose one")
    return given[0] if given else "fast"


@app.command()
def init(
    preset: Annotated[
        str,
        typer.Option(
            help="Architecture: 'tiny' (a small model for CPU, written with a tiny character tokenizer) or "
            "'qwen3.6-35b-a3b' (the published 35B-A3B architecture, about 71 GB in bfloat16)."
        ),
    ],
    out: Annotated[Path, typer.Option(help="Folder to create; it must be absent or empty unless --force.")],
    num_layers: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Decoder layers, repeating the preset's pattern (every 4th layer is full attention). "
            "Default: the preset's (tiny 4, qwen3.6-35b-a3b 40).",
        ),
    ] = None,
    mtp_num_layers: Annotated[
        int | None, typer.Option(min=0, help="Layers of the multi-token-prediction head; 0 for none. Default: 1.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random initialisation.")] = 0,
    dtype: Annotated[
        str | None,
        typer.Option(
            help="float32, bfloat16 or float16; fp8: bf16 with the projections in block-quantised FP8 (the FP8 "
            "release's layout). Default: the preset's (tiny float32, 35B bfloat16)."
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace --out if it is not empty.")] = False,
) -> None:
    """Write a randomly initialised checkpoint in Hugging Face format (config.json, safetensors, and for
    tiny a tokenizer), streaming tensor by tensor, so anything can be tried with no download."""
    with user_errors():
        from league.checkpoint.init import init_checkpoint

        path = init_checkpoint(
            preset, out, num_layers=num_layers, mtp_num_layers=mtp_num_layers, seed=seed, dtype=dtype, force=force
        )
    stdout.print(f"wrote {path}")


@app.command()
def score(
    model: Annotated[Path, typer.Option(help="Hugging Face checkpoint folder (config.json and safetensors).")],
    input: Annotated[Path, typer.Option("--input", help='JSON Lines file, one {"input_ids": [x0, x1, ...]} per line.')],
    json_lines: Annotated[
        bool, typer.Option("--json", help="Print one JSON line per input line instead of a summary table.")
    ] = False,
    output: Annotated[
        Path | None, typer.Option(help="Also write the JSON lines to this file (written whole or not at all).")
    ] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda. Default: cuda when available.")] = None,
    dtype: Annotated[
        str | None, typer.Option(help="Parameter dtype. Default: bfloat16 on GPU, float32 on CPU.")
    ] = None,
    numerics: NumericsOption = None,
    batch_invariant: BatchInvariantAlias = False,
    decode_parity: DecodeParityAlias = False,
) -> None:
    """Teacher-forced per-token log-probabilities of given token sequences.

    For an input line {"input_ids": [x0, ..., x(n-1)]} the result is {"input_ids": [...],
    "token_logprobs": [log p(x1 | x0), ..., log p(x(n-1) | x0..x(n-2))]}: n - 1 numbers, none for the
    first token, from an fp32 log-softmax of the raw logits (the same function the engine and the trainer use).
    """
    with user_errors():
        from league.score import score_file

        mode = numerics_of(numerics, batch_invariant, decode_parity)
        results = score_file(model, input, output, device=device, dtype=dtype, numerics=mode)
    if json_lines:
        for record in results:
            typer.echo(json.dumps(record))
        return
    table = Table("sequence", "tokens", "sum log-prob", "mean log-prob")
    for i, record in enumerate(results, start=1):
        lps = record["token_logprobs"]
        mean = f"{sum(lps) / len(lps):.4f}" if lps else "-"
        table.add_row(str(i), str(len(record["input_ids"])), f"{sum(lps):.4f}", mean)
    stdout.print(table)
    if output is not None:
        stdout.print(f"wrote {output}")


def generate(
    model: Annotated[Path, typer.Option(help="Hugging Face checkpoint folder (SGLang's --model-path is taken too).")],
    prompt: Annotated[str | None, typer.Option(help="A text prompt (needs the checkpoint's tokenizer).")] = None,
    input_ids: Annotated[str | None, typer.Option(help="A prompt as comma-separated token ids, e.g. 1,2,3.")] = None,
    input_file: Annotated[
        Path | None, typer.Option(help='JSON Lines of prompts: {"input_ids": [...]} or {"text": "..."} per line.')
    ] = None,
    chat: Annotated[bool, typer.Option("--chat", help="Wrap --prompt in the tokenizer's chat template.")] = False,
    max_new_tokens: Annotated[int, typer.Option(min=0, help="Most tokens to generate per sample.")] = 64,
    temperature: Annotated[float, typer.Option(min=0.0, help="Sampling temperature; 0 is greedy.")] = 1.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass in (0, 1].")] = 1.0,
    top_k: Annotated[int, typer.Option(help="Keep the k most likely tokens; -1 keeps all.")] = -1,
    min_p: Annotated[float, typer.Option(help="Drop tokens below min_p times the top probability.")] = 0.0,
    seed: Annotated[int | None, typer.Option(help="Sampling seed (sample i of a prompt uses seed + i).")] = None,
    n: Annotated[int, typer.Option(min=1, help="Samples per prompt (the prompt is prefilled once).")] = 1,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos", help="Keep generating past EOS.")] = False,
    device: Annotated[str | None, typer.Option(help="cpu or cuda. Default: cuda when available.")] = None,
    dtype: Annotated[
        str | None, typer.Option(help="Parameter dtype. Default: bfloat16 on GPU, float32 on CPU.")
    ] = None,
    json_lines: Annotated[bool, typer.Option("--json", help="Print one JSON object per sample.")] = False,
    nproc_per_node: NprocOption = 1,
    config: EngineConfig = None,
) -> None:
    """Generate from a checkpoint with league's engine (continuous batching, optional MTP speculation),
    then print throughput and speculative acceptance. Takes every engine option of `league serve`."""
    with user_errors():
        from league.checks import check_seed
        from league.engine.request import SamplingParams

        if seed is not None:
            check_seed("--seed", seed)
        params = SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            seed=seed,
            ignore_eos=ignore_eos,
        )
    with on_engine_ranks(nproc_per_node, device) as ranks:
        with user_errors():
            from league.generate import generate as run

            report, _ = run(
                model, prompt, input_ids, input_file, params, n, config, device, dtype, chat, world=ranks.world
            )
    if not ranks.main:  # every rank has the outputs; one prints them
        return
    for out in report.outputs:
        if json_lines:
            record = {
                "id": out.rid,
                "output_ids": out.output_ids,
                "output_token_logprobs": out.output_logprobs,
                "finish_reason": out.finish_reason,
            }
            if out.text is not None:
                record["text"] = out.text
            typer.echo(json.dumps(record))
        else:
            stdout.print(
                f"[{out.rid}] ({out.finish_reason}) "
                + (out.text if out.text is not None else " ".join(map(str, out.output_ids)))
            )
    summary = (
        f"{report.generated_tokens} tokens in {report.seconds:.2f} s "
        f"({report.generated_tokens / max(report.seconds, 1e-9):.1f} tokens/s)"
    )
    if report.accept_length:
        summary += f", speculative acceptance length {report.accept_length:.2f}"
    stderr.print(summary)


def serve(
    model: Annotated[Path, typer.Option(help="Hugging Face checkpoint folder (SGLang's --model-path is taken too).")],
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to bind (0 picks a free one).")] = 30000,
    served_model_name: Annotated[
        str | None,
        typer.Option(help="The model's name in the OpenAI API (`model` must be it or --model). Default: --model."),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="LEAGUE_API_KEY",
            help="Require `Authorization: Bearer KEY` on every route but /health and /health_generate (as SGLang's "
            "--api-key). Default: no key.",
        ),
    ] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda. Default: cuda when available.")] = None,
    dtype: Annotated[
        str | None, typer.Option(help="Parameter dtype. Default: bfloat16 on GPU, float32 on CPU.")
    ] = None,
    nproc_per_node: NprocOption = 1,
    config: EngineConfig = None,
) -> None:
    """Serve a checkpoint over HTTP with SGLang's /generate API and the OpenAI API (/v1/completions,
    /v1/chat/completions, /v1/models). Every engine option has SGLang's server-argument name."""
    with on_engine_ranks(nproc_per_node, device) as ranks, user_errors():
        from league.engine.server import serve as run

        run(
            str(model),
            host,
            port,
            config,
            device=device,
            dtype=dtype,
            served_model_name=served_model_name,
            api_key=api_key,
            world=ranks.world,
        )


@app.command()
def reward(
    label: Annotated[str, typer.Option(help="The ground-truth answer.")],
    rm_type: Annotated[str, typer.Option(help="deepscaler, dapo, math or exact.")] = "deepscaler",
    response: Annotated[str | None, typer.Option(help="The response text to grade.")] = None,
    response_file: Annotated[Path | None, typer.Option(help="A file holding the response text.")] = None,
    custom_rm_path: Annotated[
        str | None, typer.Option(help="module:function or file.py:function taking (response, label, metadata).")
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds the grader may take.")] = 10.0,
) -> None:
    """Print the reward of one response (a tool for checking graders)."""
    with user_errors():
        from league.rl.rewards import reward_one

        if (response is None) == (response_file is None):
            raise ValueError("give exactly one of --response or --response-file")
        if response_file is not None:
            if not response_file.is_file():
                raise ValueError(f"--response-file {response_file}: no such file")
            response = response_file.read_text()
        value = reward_one(rm_type, label, response, custom_rm_path=custom_rm_path, timeout_s=timeout)
    typer.echo(f"{value:g}")


@app.command()
def bench(
    model: Annotated[
        Path | None, typer.Option(help="Hugging Face checkpoint folder (or --preset for random weights).")
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option(help="Time this architecture with random weights made on the device: tiny or qwen3.6-35b-a3b."),
    ] = None,
    num_layers: Annotated[
        int | None, typer.Option(help="With --preset: decoder layers, repeating its pattern. Default: the preset's.")
    ] = None,
    mtp_num_layers: Annotated[
        int | None, typer.Option(help="With --preset: MTP layers (1 to speculate). Default: the preset's.")
    ] = None,
    batch: Annotated[str, typer.Option(help="Batch sizes, comma-separated; one rollout each.")] = "256",
    prompt_len: Annotated[int, typer.Option(help="Tokens of each random prompt.")] = 200,
    new_tokens: Annotated[int, typer.Option(help="Tokens generated for each request, EOS ignored.")] = 1024,
    temperature: Annotated[float, typer.Option(min=0.0, help="Sampling temperature; 0 is greedy.")] = 1.0,
    speculative_num_steps: Annotated[
        int, typer.Option(min=0, help="MTP draft steps per verify; 0 decodes without speculation.")
    ] = 0,
    mamba_ssm_dtype: Annotated[str, typer.Option(help="Cached GDN state dtype: float32 or bfloat16.")] = "float32",
    numerics: NumericsOption = None,
    decode_parity: DecodeParityAlias = False,
    memory_bandwidth: Annotated[
        float, typer.Option(help="The device's memory bandwidth in TB/s, for the roofline. Default: an H200's.")
    ] = 4.8,
    device: Annotated[str | None, typer.Option(help="cpu or cuda. Default: cuda when available.")] = None,
    dtype: Annotated[
        str | None, typer.Option(help="Parameter dtype. Default: bfloat16 on GPU, float32 on CPU.")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Also write the settings and results to this JSON file.")] = None,
    tp_size: Annotated[int, typer.Option(min=1, help="Ranks the engine splits its heads over (SGLang's name).")] = 1,
    ep_size: Annotated[int, typer.Option(min=1, help="Ranks the engine splits its experts over (SGLang's name).")] = 1,
    nproc_per_node: NprocOption = 1,
) -> None:
    """Time the engine's rollout at the RL shape (B random prompts, N new tokens each, EOS ignored): prefill,
    tokens/s and decode tokens/s, beside the memory roofline of a decode step (the bytes it must move at
    --memory-bandwidth). The warm-up compiles kernels and captures the decode graph before the timed calls."""
    with user_errors():
        import torch

        import league
        from league.bench import BenchSettings, bench_model, rollout_rates
        from league.checks import check_number, check_writable

        if out is not None:
            check_writable("--out", out.parent)

        try:
            batches = [int(b) for b in batch.split(",") if b.strip()]
        except ValueError:
            raise ValueError(f"--batch {batch!r}: expected comma-separated integers such as 1,16,64") from None
        if not batches:
            raise ValueError("--batch: give at least one batch size")
        check_number("--memory-bandwidth", memory_bandwidth, 0, low_open=True)
        mode = numerics_of(numerics, False, decode_parity)
        runs = [
            BenchSettings(
                batch=b,
                prompt_len=prompt_len,
                new_tokens=new_tokens,
                temperature=temperature,
                spec_steps=speculative_num_steps,
                mamba_ssm_dtype=mamba_ssm_dtype,
                numerics=mode,
                memory_bytes_per_s=memory_bandwidth * 1e12,
            )
            for b in batches
        ]
    with on_engine_ranks(nproc_per_node, device) as ranks, user_errors():
        net, layout = bench_model(
            model, preset, num_layers, mtp_num_layers, device, dtype, tp_size, ep_size, ranks.world
        )
        for settings in runs:
            settings.check(net.args)
        results = {}
        for settings in runs:
            results[settings.batch] = rollout_rates(net, settings, layout)
    if not ranks.main:
        return
    table = Table("batch", "prefill s", "total s", "tok/s", "decode tok/s", "roofline tok/s", "fraction")
    spec = speculative_num_steps > 0
    if spec:
        table.add_column("tok/verify")
    for b, r in results.items():
        row = [str(b), f"{r['prefill_seconds']:.2f}", f"{r['seconds']:.2f}", f"{r['tokens_per_s']:.0f}"]
        row += [f"{r['decode_tokens_per_s']:.0f}", f"{r['roofline_tokens_per_s']:.3g}"]
        row += [f"{r['roofline_fraction']:.1%}"]
        table.add_row(*row, *([f"{r['spec_accept_length']:.2f}"] if spec else []))
    stdout.print(table)
    if out is None:
        return
    with user_errors():
        device_name = next(net.parameters()).device
        record = {
            "benchmark": "league bench",
            "device": torch.cuda.get_device_name(device_name) if device_name.type == "cuda" else "cpu",
            "versions": {"league": league.__version__, "torch": torch.__version__},
            "settings": {
                "model": str(model) if model is not None else None,
                "preset": preset,
                "num_layers": net.args.num_layers,
                "dtype": str(next(net.parameters()).dtype).removeprefix("torch."),
                "prompt_len": prompt_len,
                "new_tokens": new_tokens,
                "temperature": temperature,
                "speculative_num_steps": speculative_num_steps,
                "mamba_ssm_dtype": mamba_ssm_dtype,
                "numerics": mode,
                "memory_bandwidth_tb_per_s": memory_bandwidth,
                "tp_size": layout.tp,
                "ep_size": layout.ep,
                "processes": ranks.world,
            },
            "results": {f"b{b}": r for b, r in results.items()},
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=2) + "\n")
        stderr.print(f"wrote {out}")


@app.command()
def plot(
    run_dir: Annotated[Path, typer.Argument(help="A run folder (with metrics.jsonl).")],
    out: Annotated[Path | None, typer.Option(help="PNG to write. Default: RUN_DIR/curves.png.")] = None,
) -> None:
    """Write PNG curves of a run's metrics (reward, MTP acceptance, losses, ...)."""
    with user_errors():
        from league.rl.metrics import plot_run

        path = plot_run(run_dir, out)
    stdout.print(f"wrote {path}")


def _run_train(job, dry_run: bool) -> None:
    from league.parallel.launch import relaunch, under_torchrun
    from league.rl.loop import train as run
    from league.rl.preflight import check_job, memory_plan, run_dir_path

    if dry_run:
        typer.echo(job.to_json())
        # above one rank, the memory plan comes before the checks, which also check this machine (its GPUs and
        # folders): it is for the machines the run is planned for
        plan = memory_plan(job)
        if plan is not None:
            typer.echo(plan)
        check_job(job)
        return
    if job.parallel.nproc_per_node > 1 and not under_torchrun():
        # the same command in --nproc-per-node processes under torchrun, once it passes every check here; its
        # rank 0 prints where the run went
        check_job(job)
        code = relaunch(job.parallel.nproc_per_node, [*sys.argv[1:], "--run-dir", str(run_dir_path(job))])
        if code:
            raise typer.Exit(code)
        return
    run_dir = run(job)
    if os.environ.get("RANK", "0") != "0":
        return
    stdout.print(f"run folder: {run_dir}  (metrics.jsonl, config.json, tensorboard/)")
    stdout.print(f"curves: {run_dir / 'curves.png'}  (redraw with `league plot {run_dir}`)")


def _run_eval(job, dry_run: bool) -> None:
    from league.evaluate import evaluate_policy
    from league.rl.preflight import check_eval_job

    if dry_run:
        typer.echo(job.to_json())
        check_eval_job(job)
        return
    metrics, run_dir = evaluate_policy(job)
    for name, value in metrics.items():
        stdout.print(f"{name}  {value:.4f}")
    stdout.print(f"wrote {run_dir / 'eval.json'}")


def _command_entry(run, doc: str):
    from league.flags import train_command

    command = train_command(run)

    def wrapped(**kwargs):
        with user_errors():
            command(**kwargs)

    wrapped.__signature__ = command.__signature__
    wrapped.__doc__ = doc or command.__doc__
    return wrapped


def _with_engine_config(run, defaults: dict | None = None):
    """``run``'s options and one per EngineConfig field (``flags.with_config``), errors as one line."""
    from league.flags import with_config

    command = with_config(run, EngineConfig, defaults)

    def wrapped(**kwargs):
        with user_errors():
            command(**kwargs)

    wrapped.__signature__ = command.__signature__
    wrapped.__doc__ = command.__doc__
    return wrapped


app.command("generate")(_with_engine_config(generate))
app.command("serve")(_with_engine_config(serve, {"max_running_requests": 256}))
app.command("train", cls=_GroupedOptions)(_command_entry(_run_train, None))
app.command("eval", cls=_GroupedOptions)(
    _command_entry(
        _run_eval,
        "Evaluate a policy: the avg@k reward on --eval-prompt-data NAME,PATH sets, scored as league train's "
        "periodic evaluation.\n\nTakes league train's options (--hf-checkpoint, --n-samples-per-eval-prompt, "
        "--eval-temperature, --rm-type, engine flags); writes eval.json and config.json to the run folder.",
    )
)


if __name__ == "__main__":
    app()
