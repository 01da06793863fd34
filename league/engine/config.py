"""EngineConfig: the engine's sizes, numerics and speculative decoding, with SGLang's server-argument names.

Not responsible for what the settings do (``engine.LLMEngine`` and its model runner).
"""

from dataclasses import dataclass

from league.checks import check_int, check_seed
from league.ops.numerics import Numerics


@dataclass(kw_only=True, slots=True)
class EngineConfig:
    """Engine sizes and speculative decoding. Names follow SGLang's server arguments."""

    max_running_requests: int = 64
    """Requests decoded at once; more wait for a free slot."""
    max_num_batched_tokens: int = 4096
    """Prompt tokens prefilled per step; longer prompts are prefilled in chunks."""
    admission_batch: int = 1
    """While requests are decoding, admit waiting ones only once this many fit at once (or all that wait fit).
    1 admits each as soon as a slot frees. A prefill is a forward of its own that the whole batch waits for, so when
    requests finish one by one (sampling, stop tokens, speculation) larger values make fewer, larger prefills, at
    the cost of a few steps' wait for the requests admitted together."""
    context_length: int = 4096
    """Prompt plus generated tokens a request may reach (capped by the model's max_position_embeddings)."""
    num_slots: int | None = None
    """State slots of running requests (GDN states and a row of the block table each); default:
    max_running_requests."""
    mem_fraction_static: float = 0.7
    """Fraction of GPU memory for weights plus caches (on a GPU, the KV pool takes what the weights and the GDN
    states leave)."""
    page_size: int = 16
    """Positions per block of the paged KV cache (attention keys and values, trunk and MTP, and routed experts)."""
    max_total_tokens: int | None = None
    """Positions the KV pool holds (rounded up to whole blocks). Default: on a GPU what mem_fraction_static leaves;
    elsewhere every running request's whole context. Requests reserve blocks as they grow; when none are left the
    prefix cache is evicted, then the newest requests are preempted (computed again later, their outputs
    unchanged)."""
    disable_radix_cache: bool = False
    """Turn off the prefix cache (a radix tree of cached prompt and output blocks, with GDN state snapshots) by
    which a request reuses the longest cached prefix it can resume from."""
    mamba_scheduler_strategy: str = "extra_buffer"
    """Where the prefix cache keeps GDN state snapshots (a prefix is reusable only up to a snapshot), as SGLang's:
    ``extra_buffer``: a prompt's prefill stops to snapshot at the last multiple of mamba_track_interval before its
    last token and where it leaves the cached prefixes (a branch point), and decoding snapshots at every multiple of
    the interval (without speculation); works with speculation and the overlap schedule. ``no_buffer``: a snapshot
    at the end of each prompt and of each request only, no extra prefill stops; needs page_size 1 and no
    speculation."""
    mamba_track_interval: int = 256
    """Tokens between GDN snapshots under extra_buffer (a multiple of page_size)."""
    max_mamba_cache_size: int | None = None
    """GDN state snapshots the prefix cache may hold (each the size of a running request's states). Default: a
    quarter of max_running_requests, at least 1 (none with disable_radix_cache)."""
    speculative_algorithm: str | None = None
    """``EAGLE`` or ``NEXTN`` (both: the model's own MTP head) or None."""
    speculative_num_steps: int = 2
    """Draft tokens the MTP head proposes per verify."""
    speculative_max_batch: int | None = None
    """Speculate only in steps that decode at most this many requests; a step over more decodes one token a request
    without drafts (an RL rollout's large first steps run best without, its long tail with them). Those steps feed
    the MTP layer each new token, so drafting resumes with its whole context, and run without the overlap schedule.
    A seeded request's tokens then depend on which of its steps speculated, and so on the batch. Default: every
    step speculates."""
    speculative_eagle_topk: int = 1
    """Branching of the draft tree; league drafts chains (1)."""
    speculative_num_draft_tokens: int | None = None
    """Tokens per verify: must be speculative_num_steps + 1 (the default)."""
    random_seed: int = 0
    """Seeds the engine's choice of a seed for each request that brings none."""
    numerics: str = "fast"
    """How forwards compute (``ops.numerics``; ``league train``'s trainer computes the same way): ``fast``;
    ``batch_invariant``, every token independently of the rest of the batch, so sampled log-probs equal the
    trainer's bitwise and never depend on batch composition (slower); ``decode_parity``, prefill and training compute
    the token mixers as decode does, so the trainer recomputes the log-probs the engine sampled with (slower prefill
    and training forward). The exact modes need ``mamba_ssm_dtype`` float32."""
    cuda_graph_bs: list[int] | None = None
    """Batch sizes of captured CUDA-graph decode steps (or draft-and-verify steps, with speculation). Default: 1, 2,
    4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256 up to max_running_requests (which is always one). Graphs
    serve a bf16 model on a Hopper/Blackwell GPU, with numerics other than batch_invariant."""
    disable_cuda_graph: bool = False
    """Launch decode kernels one by one instead of replaying captured graphs."""
    disable_overlap_schedule: bool = False
    """Turn off the overlap schedule. With it (the default), each decode step's tokens are read back only after the
    next step is launched, so the GPU runs step k + 1 while the host appends step k's tokens, checks stops and
    schedules (a request that stops on a token of step k has already run one more row in step k + 1, which is
    dropped; a request that will reach its length limit does not). Without speculation only; the tokens are the
    same either way."""
    enable_return_routed_experts: bool = False
    """Keep the experts each MoE layer chose for every token (an int32 ``[slots, context, layers, top_k]`` buffer),
    so that a request may ask for them (``return_routed_experts``: routing replay in the trainer)."""
    tp_size: int = 1
    """Ranks the engine splits its attention and GDN heads over (SGLang's ``--tp-size``); each gathers the heads'
    outputs and projects them whole (``parallel.inference``). An engine spans max(tp_size, ep_size) ranks, started
    by --nproc-per-node or torchrun."""
    ep_size: int = 1
    """Ranks the engine splits its routed experts over (SGLang's ``--ep-size``), each holding a block of them; the
    smaller of tp_size and ep_size divides the larger."""
    mamba_ssm_dtype: str = "float32"
    """dtype of the cached GDN recurrent states, ``float32`` or ``bfloat16`` (half the state memory and traffic;
    the recurrence still computes in fp32). With bfloat16, decode rounds the state after every token but verify
    once per verify, so speculative and plain greedy decoding may differ slightly."""

    def __post_init__(self) -> None:
        for name in ("max_running_requests", "max_num_batched_tokens", "context_length", "admission_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        if self.mamba_ssm_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"`mamba_ssm_dtype` {self.mamba_ssm_dtype!r}: expected float32 or bfloat16")
        if Numerics(self.numerics).step_by_step and self.mamba_ssm_dtype != "float32":
            raise ValueError(
                f"`numerics` {self.numerics} needs `mamba_ssm_dtype` float32 (the trainer keeps fp32 states)"
            )
        if not 0 < self.mem_fraction_static <= 1:
            raise ValueError(f"`mem_fraction_static` must be in (0, 1], got {self.mem_fraction_static}")
        if self.speculative_max_batch is not None and self.speculative_max_batch < 1:
            raise ValueError(f"`speculative_max_batch` must be >= 1, got {self.speculative_max_batch}")
        if self.num_slots is not None:
            check_int("num_slots", self.num_slots, 1)
        check_int("page_size", self.page_size, 1)
        check_int("mamba_track_interval", self.mamba_track_interval, 1)
        for name in ("max_total_tokens", "max_mamba_cache_size"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 1)
        if self.mamba_scheduler_strategy not in ("extra_buffer", "no_buffer"):
            raise ValueError(
                f"`mamba_scheduler_strategy` {self.mamba_scheduler_strategy!r}: expected extra_buffer or no_buffer"
            )
        if self.mamba_track_interval % self.page_size:
            raise ValueError(
                f"`mamba_track_interval` ({self.mamba_track_interval}) must be a multiple of `page_size` "
                f"({self.page_size}): snapshots are taken at block boundaries"
            )
        if self.mamba_scheduler_strategy == "no_buffer" and not self.disable_radix_cache:
            if self.page_size != 1:
                raise ValueError(
                    f"`mamba_scheduler_strategy` no_buffer snapshots where prompts and requests end, which needs "
                    f"`page_size` 1 (got {self.page_size}); use extra_buffer, or page_size 1"
                )
            if self.speculative_algorithm is not None:
                raise ValueError(
                    "speculative decoding needs `mamba_scheduler_strategy` extra_buffer with the prefix cache "
                    "(no_buffer snapshots states the MTP layer has not caught up with); use extra_buffer, or "
                    "disable_radix_cache"
                )
        check_seed("random_seed", self.random_seed)
        check_int("speculative_num_steps", self.speculative_num_steps, 1)
        check_int("tp_size", self.tp_size, 1)
        check_int("ep_size", self.ep_size, 1)
        if self.cuda_graph_bs is not None and (not self.cuda_graph_bs or min(self.cuda_graph_bs) < 1):
            raise ValueError(f"`cuda_graph_bs` must be batch sizes >= 1, got {self.cuda_graph_bs}")
        if self.speculative_algorithm is not None:
            if self.speculative_algorithm.upper() not in ("EAGLE", "NEXTN", "MTP"):
                raise ValueError(
                    f"`speculative_algorithm` {self.speculative_algorithm!r}: expected EAGLE, NEXTN or None"
                )
            if self.speculative_eagle_topk != 1:
                raise ValueError(f"`speculative_eagle_topk` {self.speculative_eagle_topk}: league drafts chains (1)")
            expected = self.speculative_num_steps + 1
            if self.speculative_num_draft_tokens not in (None, expected):
                raise ValueError(
                    f"`speculative_num_draft_tokens` ({self.speculative_num_draft_tokens}) must be "
                    f"speculative_num_steps + 1 ({expected}) with topk 1"
                )

    def check_layout(self, tp: int, ep: int, tp_flag: str = "--tp-size", ep_flag: str = "--ep-size") -> None:
        """The engine's ranks are laid out as these settings ask (``tp`` x ``ep`` as placed): a ValueError naming
        the flags otherwise."""
        if (self.tp_size, self.ep_size) != (tp, ep):
            size = max(self.tp_size, self.ep_size)
            raise ValueError(
                f"`{tp_flag}` {self.tp_size} / `{ep_flag}` {self.ep_size} ask for an engine over {size} ranks, but "
                f"this engine's model is laid out as tp {tp}, ep {ep}"
                + (f"; start {size} processes (`--nproc-per-node {size}` or torchrun)" if size > max(tp, ep) else "")
            )

    @property
    def num_snapshots(self) -> int:
        """Slots of GDN state snapshots the prefix cache holds (``max_mamba_cache_size``)."""
        if self.disable_radix_cache:
            return 0
        return self.max_mamba_cache_size or max(1, self.max_running_requests // 4)

    @property
    def num_spec_steps(self) -> int:
        return self.speculative_num_steps if self.speculative_algorithm else 0
