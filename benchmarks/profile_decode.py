"""Where a decode step's time goes: the engine decodes a batch on random weights under torch.profiler, and the
kernel time is summed by what it belongs to (MoE expert GEMMs, GDN recurrence, attention, norms, other matmuls,
sampling and log-probs, the rest), beside the step's wall time without the profiler (the same number of steps
just before). Writes ``benchmarks/results/profile_decode.json`` and a Chrome trace beside it.

Also the routing's spread over the experts, which sets how often the Triton expert kernels stream an expert's
weights more than once (once per ``block_m`` rows): the token-expert choices of two decode steps run eagerly
after the timed ones (captured graphs record nothing), layer by layer, and the rows each expert gets are
summarised (mean, the 99th percentile, the max, and the share of experts past 16 and 32 rows).
``--moe-block-m`` overrides the kernels' rows per tile (``ops.moe.triton.CONFIGS``) and ``--moe-row-splits`` the
programs sharing an expert's tiles, to measure their effect on the step.

The step is timed twice without the profiler: back to back (``step_ms``, the engine's own pace) and with each step
waited for (``step_ms_synchronized``, the profiled steps' pattern); from the trace, the kernels per step and the
GPU's idle time between kernels (gaps up to 50 µs: inside a step's graphs; longer: between steps). Then the
back-to-back steps split into the host's own work and its waits for the device (``host_ms_per_step``: past the
device's time, the step is bound by the host), and the captured forward replayed with no host work between
(``graph_replay_ms``: the device's time for the forward and head alone).
``--by-op`` adds the torch ops (with input shapes) that launch the most kernel time in eager steps (``ops_eager``).
``--sample-clocks`` records the SM and memory clocks and the power that ``nvidia-smi`` reads during both timings.

    python benchmarks/profile_decode.py [--num-layers 40] [--batch 256] [--prompt-len 200] [--steps 8]
        [--disable-cuda-graph] [--mamba-ssm-dtype bfloat16] [--moe-block-m 32]
        [--moe-row-splits 4] [--spec-steps 3] [--sample-clocks] [--by-op] [--out results/profile_decode.json]
    python benchmarks/profile_decode.py --preset tiny --device cpu --num-layers 4 --batch 8   (a smoke test)
"""

import argparse
import contextlib
import gzip
import json
import platform
import shutil
import subprocess
import time
from pathlib import Path

import torch
from common import kernel_summary, override_moe_tiles, random_model
from torch.profiler import ProfilerActivity, profile, schedule

import league
from league.engine.config import EngineConfig
from league.engine.engine import LLMEngine
from league.engine.request import SamplingParams
from league.models.qwen3_5_moe import model as model_py
from league.models.qwen3_5_moe.presets import PRESETS, with_num_layers


def record_routing(calls: list[torch.Tensor]):
    """Wrap ``model.py``'s ``route_topk`` so that each call appends its expert ids ``[T, A]`` (on the CPU) to
    ``calls``; returns the function that unwraps it."""
    original = model_py.route_topk

    def recorded(logits, top_k):
        weights, experts = original(logits, top_k)
        if not (experts.is_cuda and torch.cuda.is_current_stream_capturing()):
            calls.append(experts.cpu())
        return weights, experts

    model_py.route_topk = recorded
    return lambda: setattr(model_py, "route_topk", original)


class ClockSampler:
    """While open, ``nvidia-smi`` samples the GPU's SM and memory clocks (MHz) and power (W) every ``period_ms``;
    :attr:`summary` then holds their means, minima and the sample count (empty without ``nvidia-smi``)."""

    FIELDS = ("sm_clock_mhz", "mem_clock_mhz", "power_w")

    def __init__(self, period_ms: int = 20):
        self.period_ms, self.summary, self._proc = period_ms, {}, None

    def __enter__(self):
        if shutil.which("nvidia-smi"):
            self._proc = subprocess.Popen(
                [
                    "nvidia-smi",
                    "--query-gpu=clocks.sm,clocks.mem,power.draw",
                    "--format=csv,noheader,nounits",
                    f"-lms={self.period_ms}",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
        return self

    def __exit__(self, *exc):
        if self._proc is None:
            return
        self._proc.terminate()
        out, _ = self._proc.communicate()
        rows = []
        for line in out.splitlines():
            try:
                rows.append([float(v) for v in line.split(",")])
            except ValueError:
                continue
        if rows:
            cols = list(zip(*rows))
            self.summary = {"samples": len(rows)}
            for name, values in zip(self.FIELDS, cols):
                self.summary[f"{name}_mean"] = sum(values) / len(values)
                self.summary[f"{name}_min"] = min(values)


def host_split(engine: LLMEngine, steps: int) -> dict:
    """Back-to-back steps again, split into the host's own work and its waits for the device (the overlap
    schedule's ``ready.synchronize()`` on the step before): a step whose host work alone takes as long as the
    device's is bound by the host, and faster kernels then leave the GPU idle."""
    waited = [0.0]
    original = engine._land

    def land(step):
        if step.ready is not None:
            start = time.perf_counter()
            step.ready.synchronize()
            waited[0] += time.perf_counter() - start
        original(step)

    engine._land = land
    try:
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        host = time.perf_counter() - start  # without the final synchronize: the host's pace
        torch.cuda.synchronize()
    finally:
        del engine._land
    return {"host_ms_per_step": (host - waited[0]) * 1e3 / steps, "host_wait_ms_per_step": waited[0] * 1e3 / steps}


def graph_replay_ms(engine: LLMEngine, batch: int, steps: int) -> float:
    """The captured decode forward of ``batch`` rows replayed back to back with no host work between (inputs as the
    last step left them; the replays rewrite the same cache positions): the device's time for a step's forward
    and output head alone, without sampling."""
    graphs = engine.runner.graphs.graphs[min(s for s in engine.runner.graphs.sizes if s >= batch)]
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        for graph in graphs:
            graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / steps


def timeline_gaps(trace: Path, steps: float, idle_us: float = 50.0) -> dict:
    """From a Chrome trace: kernels per step, and the GPU's idle time per step between consecutive kernels, split
    into gaps up to ``idle_us`` (inside a step's graphs) and longer ones (between steps, the host)."""
    events = json.load(gzip.open(trace))["traceEvents"]
    kernels = sorted((e["ts"], e["dur"]) for e in events if e.get("cat") == "kernel")
    if not kernels:
        return {}
    short = long = 0.0
    end = kernels[0][0]
    for ts, dur in kernels:
        if ts > end:
            gap = ts - end
            short, long = (short + gap, long) if gap <= idle_us else (short, long + gap)
        end = max(end, ts + dur)
    return {
        "kernels_per_step": len(kernels) / steps,
        "gaps_up_to_50us_ms_per_step": short / 1e3 / steps,
        "longer_gaps_ms_per_step": long / 1e3 / steps,
    }


def decode_routing(engine: LLMEngine, steps: int = 2) -> list[torch.Tensor]:
    """The expert ids ``[B, A]`` of every MoE layer in ``steps`` decode steps run eagerly (not through the captured
    graphs, which record nothing on the host)."""
    calls: list[torch.Tensor] = []
    graphs = engine.runner.graphs
    engine.runner.graphs = None if graphs is None else _Uncaptured()
    unwrap = record_routing(calls)
    try:
        for _ in range(steps):
            engine.step()
    finally:
        unwrap()
        engine.runner.graphs = graphs
    return calls


def op_times(engine: LLMEngine, steps: int, top: int = 40) -> list[dict]:
    """Device time a step of the ``top`` torch ops (with their input shapes) that launch the most kernel time, in
    ``steps`` decode steps run eagerly (a graph replay hides which op launched a kernel; the eager steps launch the
    same kernels, so this names the kernels of the captured step)."""
    graphs = engine.runner.graphs
    engine.runner.graphs = None if graphs is None else _Uncaptured()
    try:
        engine.step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
            for _ in range(steps):
                engine.step()
            torch.cuda.synchronize()
    finally:
        engine.runner.graphs = graphs
    rows = [e for e in prof.key_averages(group_by_input_shape=True) if e.self_device_time_total > 0]
    rows.sort(key=lambda e: e.self_device_time_total, reverse=True)
    return [
        {
            "op": e.key,
            "shapes": str(e.input_shapes)[:200],
            "calls_per_step": e.count / steps,
            "ms_per_step": e.self_device_time_total / 1e3 / steps,
        }
        for e in rows[:top]
    ]


class _Uncaptured:
    """Stands in for an engine's ``DecodeGraphs``: no batch fits, so decode steps run eagerly."""

    def fits(self, batch: int) -> bool:
        return False


def routing_spread(calls: list[torch.Tensor], num_experts: int, batch: int, draws: int = 64) -> dict:
    """Rows per expert in ``draws`` random sets of ``batch`` tokens drawn from each recorded call (one set, the
    whole call, when it has ``batch`` tokens and ``draws`` is 1)."""
    gen = torch.Generator().manual_seed(0)
    counts = []
    for experts_TA in calls:
        if experts_TA.shape[0] < batch:
            continue
        for _ in range(draws):
            pick = torch.randperm(experts_TA.shape[0], generator=gen)[:batch]
            counts.append(torch.bincount(experts_TA[pick].flatten(), minlength=num_experts))
    if not counts:
        return {}
    rows = torch.stack(counts).float()
    per_set_max = rows.max(dim=1).values
    return {
        "sets": rows.shape[0],
        "mean_rows": rows.mean().item(),
        "p99_rows": rows.flatten().quantile(0.99).item(),
        "max_rows_mean_over_sets": per_set_max.mean().item(),
        "max_rows": per_set_max.max().item(),
        "share_of_experts_over_16_rows": (rows > 16).float().mean().item(),
        "share_of_experts_over_32_rows": (rows > 32).float().mean().item(),
        "idle_experts_share": (rows == 0).float().mean().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="qwen3.6-35b-a3b")
    parser.add_argument("--num-layers", type=int, default=40)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=200)
    parser.add_argument("--steps", type=int, default=8, help="decode steps profiled")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--disable-cuda-graph", action="store_true", help="profile eager decode steps")
    parser.add_argument("--mamba-ssm-dtype", default="float32", help="GDN state dtype: float32 or bfloat16")
    parser.add_argument("--moe-block-m", type=int, help="rows per tile of both Triton expert kernels, every batch")
    parser.add_argument("--moe-row-splits", type=int, help="programs sharing an expert's row tiles, every batch")
    parser.add_argument(
        "--spec-steps",
        type=int,
        default=0,
        help="profile MTP-speculative steps (drafts + one verify) with this many drafts; the MTP layer is random, so "
        "few drafts are kept: this times the step, not the speedup",
    )
    parser.add_argument(
        "--by-op",
        action="store_true",
        help="also profile eager steps with input shapes and list the ops that launch the most kernel time",
    )
    parser.add_argument(
        "--sample-clocks", action="store_true", help="sample SM/memory clocks and power with nvidia-smi while timing"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "profile_decode.json")
    opts = parser.parse_args()
    cuda = opts.device == "cuda"
    override_moe_tiles(block_m=opts.moe_block_m, row_splits=opts.moe_row_splits)
    args = with_num_layers(PRESETS[opts.preset], opts.num_layers).replace(mtp_num_layers=int(opts.spec_steps > 0))
    model = random_model(args, opts.device, torch.bfloat16 if cuda else torch.float32).eval()
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, args.vocab_size, (opts.batch, opts.prompt_len), generator=gen).tolist()
    warm = 4
    # every decode step below and the ones the prefill's steps make meanwhile (the prompts take prompt tokens /
    # 8,192 steps): no request may finish before the last one
    new_tokens = warm + 6 * (opts.steps + 1) + opts.batch * opts.prompt_len // 8192 + 16
    config = EngineConfig(
        max_running_requests=opts.batch,
        num_slots=opts.batch,
        context_length=opts.prompt_len + new_tokens * (opts.spec_steps + 1) + 8,
        max_num_batched_tokens=8192,
        cuda_graph_bs=None if opts.disable_cuda_graph else [opts.batch],
        disable_cuda_graph=opts.disable_cuda_graph,
        mamba_ssm_dtype=opts.mamba_ssm_dtype,
        speculative_algorithm="EAGLE" if opts.spec_steps else None,
        speculative_num_steps=max(opts.spec_steps, 1),
    )
    engine = LLMEngine(model, config)
    params = SamplingParams(
        max_new_tokens=new_tokens * (opts.spec_steps + 1),
        temperature=opts.temperature,
        ignore_eos=True,
    )
    for prompt in prompts:
        engine.add_request(prompt, params)
    while any(r.num_prefilled < len(r.prompt_ids) for r in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()  # prefill everything first
    for _ in range(warm):
        engine.step()
    if cuda:
        torch.cuda.synchronize()
    clocks = {}
    with ClockSampler() if cuda and opts.sample_clocks else contextlib.nullcontext() as sampler:
        start, generated = time.perf_counter(), engine.stats.generated_tokens
        for _ in range(opts.steps):  # unprofiled, back to back: the true step time
            engine.step()
        if cuda:
            torch.cuda.synchronize()
        unprofiled = (time.perf_counter() - start) / opts.steps
        tokens_per_step = (engine.stats.generated_tokens - generated) / opts.steps
    clocks["back_to_back"] = sampler.summary if sampler is not None else {}
    with ClockSampler() if cuda and opts.sample_clocks else contextlib.nullcontext() as sampler:
        start = time.perf_counter()
        for _ in range(opts.steps):  # unprofiled, each step waited for, as the profiled steps below
            engine.step()
            if cuda:
                torch.cuda.synchronize()
        synchronized = (time.perf_counter() - start) / opts.steps
    clocks["synchronized"] = sampler.summary if sampler is not None else {}
    host = host_split(engine, opts.steps) if cuda else {}
    replay = graph_replay_ms(engine, opts.batch, opts.steps) if cuda and engine.runner.graphs is not None else None
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    trace = opts.out.with_suffix(".trace.json.gz")
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    # one warm-up step inside the profiler: the first profiled step's kernels can be missed otherwise
    with profile(
        activities=activities,
        schedule=schedule(wait=0, warmup=1, active=opts.steps),
        acc_events=True,
        on_trace_ready=lambda done: done.export_chrome_trace(str(trace)),
    ) as prof:
        for _ in range(opts.steps + 1):
            engine.step()
            if cuda:
                torch.cuda.synchronize()
            prof.step()
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    num_gdn = sum(kind == "linear_attention" for kind in args.layer_types)
    marker = ("_recurrent_gated_delta_rule_kernel", num_gdn) if cuda and num_gdn and not opts.spec_steps else None
    summary = kernel_summary(prof, opts.steps, cuda, marker=marker)
    record = {
        "benchmark": "profile_decode",
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "versions": {"league": league.__version__, "torch": torch.__version__, "python": platform.python_version()},
        "settings": {k: v for k, v in vars(opts).items() if k != "out"},
        "results": {
            "step_ms": unprofiled * 1e3,
            "tokens_per_s": tokens_per_step / unprofiled,  # with the overlap schedule, landed a step late
            "step_ms_synchronized": synchronized * 1e3,
            **host,
            **({"graph_replay_ms": replay} if replay is not None else {}),
            **summary,
            **(timeline_gaps(trace, summary["steps_recorded"]) if cuda and trace.exists() else {}),
            **({"clocks": clocks} if opts.sample_clocks else {}),
            "routing_rows_per_expert": routing_spread(decode_routing(engine), args.num_experts, opts.batch, draws=1),
            **({"ops_eager": op_times(engine, opts.steps)} if cuda and opts.by_op else {}),
        },
    }
    opts.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record["results"], indent=2))


if __name__ == "__main__":
    main()
