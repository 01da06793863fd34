"""An HTTP server in front of one LLMEngine, speaking SGLang's API as RL loops use it, and the OpenAI API.

Handler threads (``ThreadingHTTPServer``) parse a request (``protocol.py``, ``openai.py``, ``control.py``), hand its
prompts to the ``EngineWorker`` whose single thread drives the engine, and wait for the outputs. Routes: SGLang's
``POST /generate`` (every field of SGLang's request: those league implements take effect, the others are accepted
when they ask for nothing), ``GET /health``, ``GET /health_generate``, ``GET /get_model_info`` (``/model_info``),
``POST /flush_cache``, ``POST /abort_request``; SGLang's control plane (``control.py``: server info, weight
version, pause / continue, update windows, weight updates from disk, by tensor reference or by a broadcast group,
release / resume of memory); and the OpenAI API's ``POST /v1/completions``, ``POST /v1/chat/completions``,
``GET /v1/models``. Every answer is JSON (or server-sent events): a client error
is a 4xx naming the field (400, or 401/404/405/408/411/413), a failed engine step a 500 for its requests only, a
stopped engine 503. A request whose client leaves is aborted. Not responsible for scheduling or sampling (the
engine), or TLS.
"""

import contextlib
import dataclasses
import logging
import signal
import threading
import time
import uuid
from collections.abc import Callable
from http.server import ThreadingHTTPServer
from typing import Any

from league.engine import control, openai, protocol
from league.engine.config import EngineConfig
from league.engine.engine import LLMEngine
from league.engine.http import HTTPError, JSONHandler, bind_error, check_address
from league.engine.request import GenerateOutput, SamplingParams
from league.engine.worker import ClientGone, EngineStepFailed, EngineUnavailable, EngineWorker, Submission
from league.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


MAX_BODY_BYTES = 256 << 20
READ_TIMEOUT_S = 30.0


class EngineServer(ThreadingHTTPServer):
    """An HTTP server over one engine; ``start()`` serves from a thread, ``shutdown()`` stops both threads.

    Args:
        engine (LLMEngine): the engine to serve; the server's worker thread drives it from now on.
        host (str): address to bind, e.g. ``127.0.0.1``.
        port (int): port to bind; 0 lets the OS pick a free one (read it back from ``port``).
        model_path (str, Optional): reported by ``/get_model_info`` and OpenAI answers. Default: "".
        tokenizer (Optional): a transformers tokenizer for ``text`` prompts, output text and chat. Default: None.
        served_model_name (str, Optional): the model's name in the OpenAI API (``model`` must be it or
            ``model_path``). Default: ``model_path``.
        api_key (str, Optional): when set, every route but /health and /health_generate needs the header
            ``Authorization: Bearer <api_key>`` (as SGLang's ``--api-key``). Default: None (no key).
        read_timeout (float, Optional): seconds a connection may take to send its request (and to take each
            write of the answer). Default: 30.
        max_body_bytes (int, Optional): the largest request body accepted (HTTP 413 above). Default: 256 MiB.
    """

    daemon_threads = True
    request_queue_size = 1024

    def __init__(
        self,
        engine: LLMEngine,
        host: str,
        port: int,
        model_path: str = "",
        tokenizer=None,
        served_model_name: str | None = None,
        api_key: str | None = None,
        read_timeout: float = READ_TIMEOUT_S,
        max_body_bytes: int = MAX_BODY_BYTES,
    ):
        try:
            super().__init__((host, port), _Handler)
        except OSError as e:
            raise bind_error(host, port, e) from None
        self.engine, self.model_path, self.tokenizer = engine, model_path, tokenizer
        self.model_name = served_model_name or model_path
        self.api_key, self.read_timeout, self.max_body_bytes = api_key or None, read_timeout, max_body_bytes
        self.started = time.time()
        self.groups: dict = {}
        """Weight-update process groups joined by /init_weights_update_group, by name."""
        self.worker = EngineWorker(engine)
        self._tokenizer_lock = threading.Lock()
        self._serving = False

    @property
    def model_names(self) -> set[str]:
        """The names the OpenAI routes answer to."""
        return {name for name in (self.model_name, self.model_path) if name}

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{self.server_address[0]}:{self.port}"

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        self._serving = True
        try:
            super().serve_forever(poll_interval)
        finally:
            self._serving = False

    def start(self) -> "EngineServer":
        """Serve from a background thread; returns at once."""
        self._serving = True
        threading.Thread(target=self.serve_forever, args=(0.05,), name="league-http", daemon=True).start()
        return self

    def shutdown(self) -> None:
        """Stop accepting requests, stop the engine thread (waiting requests get HTTP 503), close the socket."""
        if self._serving:
            super().shutdown()
        self.worker.stop()
        self.server_close()

    def encode(self, text: str, field: str, add_special_tokens: bool = True) -> list[int]:
        if self.tokenizer is None:
            raise ValueError(f"`{field}` is text but the server has no tokenizer: send token ids instead")
        try:
            with self._tokenizer_lock:
                return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        except Exception as e:
            raise ValueError(f"`{field}`: the tokenizer could not encode it: {e}") from None

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if self.tokenizer is None:
            return ""
        with self._tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def chat_prompt(self, messages: list[dict], template_kwargs: Any) -> list[int]:
        if not isinstance(template_kwargs, dict):
            raise ValueError(f"`chat_template_kwargs` must be an object, got {template_kwargs!r:.100}")
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("`messages` needs a tokenizer with a chat template; this server has none")
        try:
            with self._tokenizer_lock:
                text = self.tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=True, **template_kwargs
                )
        except Exception as e:
            raise ValueError(f"`messages`: the chat template failed: {e}") from None
        return self.encode(text, "messages", add_special_tokens=False)

    def model_info(self) -> dict:
        engine = self.engine
        return {
            "model_path": self.model_path,
            "tokenizer_path": self.model_path if self.tokenizer is not None else None,
            "is_generation": True,
            "architectures": ["Qwen3_5MoeForCausalLM"],
            "model_args": dataclasses.asdict(engine.args),
            "engine_config": dataclasses.asdict(engine.config),
            "context_length": engine.context_length,
            "device": str(engine.device),
            "dtype": str(engine.dtype).removeprefix("torch."),
            "weight_version": self.worker.weight_version,
            "preferred_sampling_params": None,
            "model_type": "qwen3_5_moe",
            "has_image_understanding": False,
            "has_audio_understanding": False,
        }


class _Handler(control.ControlRoutes, JSONHandler):
    server: EngineServer
    statuses = {EngineUnavailable: 503, EngineStepFailed: 500}
    quiet = (ClientGone,)
    open_paths = frozenset({"/health", "/health_generate"})

    def _wait(self, sub: Submission) -> list[GenerateOutput]:
        """Every output of a submission; if the client leaves first, its requests are aborted (ClientGone)."""
        try:
            return sub.outputs(self._gone)
        except ClientGone:
            self._abort(sub)
            raise

    def _abort(self, sub: Submission) -> None:
        with contextlib.suppress(EngineUnavailable):
            for rid in sub.rids:
                self.server.worker.abort(rid)

    def _prompts(self, value: Any, field: str, text: bool, ids: bool) -> tuple[list[list[int]], bool]:
        vocab = self.server.engine.args.vocab_size
        return protocol.parse_prompts(value, field, lambda s: self.server.encode(s, field), text, ids, vocab)

    def _submit(
        self,
        prompts: list[list[int]],
        options: protocol.SamplingOptions,
        field: str,
        rids=None,
        stream=False,
        top_logprobs_num: int = 0,
        logprob_start_len: int = -1,
        routed_experts_start_len: int | None = None,
    ) -> Submission:
        context_length = self.server.engine.context_length
        params = [protocol.params_for(options, len(p), context_length, field) for p in prompts]
        if params[0].stop and self.server.tokenizer is None:
            raise ValueError("sampling_params.stop (strings) needs a tokenizer; this server has none")
        rids = rids or protocol.parse_rids(None, len(prompts), True)
        return self.server.worker.submit(
            prompts, params, options.n, rids, stream, top_logprobs_num, logprob_start_len, routed_experts_start_len
        )

    def _text(
        self, sub: Submission, i: int, out: GenerateOutput, options: protocol.SamplingOptions, finished: bool = True
    ) -> str:
        text = self.server.decode(out.output_ids, options.skip_special_tokens)
        return protocol.trim(text, out, sub.params[i // sub.n], options) if finished else text

    def _token_text(self, token: int) -> str:
        return self.server.decode([token], False) or f"token_id:{token}"

    def _generate(self, body: dict) -> None:
        known = protocol.GENERATE_FIELDS | protocol.GENERATE_INERT | protocol.GENERATE_UNSUPPORTED.keys()
        protocol.check_fields(body, set(known), "the /generate body")
        protocol.check_unsupported(body, protocol.GENERATE_UNSUPPORTED, "", protocol.UNSUPPORTED_DEFAULTS)
        if ("text" in body) == ("input_ids" in body):
            raise ValueError("give exactly one of `text` or `input_ids`")
        field = "text" if "text" in body else "input_ids"
        prompts, batched = self._prompts(body[field], field, text=field == "text", ids=field == "input_ids")
        options = protocol.parse_sampling(body.get("sampling_params") or {}, "sampling_params", 128)
        logprobs, stream = protocol.parse_logprob_options(body), protocol.flag(body, "stream")
        rids = protocol.parse_rids(body.get("rid"), len(prompts), batched)
        routes = protocol.parse_routed_experts(body)
        sub = self._submit(
            prompts, options, field, rids, stream, logprobs.top_logprobs_num, logprobs.logprob_start_len, routes
        )

        prompt_ids = protocol.flag(body, "return_prompt_token_ids")

        def render(i: int, out: GenerateOutput, finished: bool) -> dict:
            text = self._text(sub, i, out, options, finished)
            served = protocol.ServedFacts(
                weight_version=self.server.worker.weight_version,
                weight_versions=sub.weight_versions(i, len(out.output_ids)),
                e2e_latency=time.monotonic() - sub.arrived,
                prompt_token_ids=prompt_ids,
            )
            return protocol.generate_result(
                out, sub.params[i // sub.n], text, finished, logprobs, self._token_text, served
            )

        if stream:
            self._stream(
                sub, lambda i, out, finished: [] if out is None else [{**render(i, out, finished), "index": i}]
            )
            return
        results = [render(i, out, True) for i, out in enumerate(self._wait(sub))]
        self._send_json(200, results if batched or options.n > 1 else results[0])

    def _stream(self, sub: Submission, events: Callable[[int, GenerateOutput | None, bool], list[dict]]) -> None:
        """Server-sent events: ``events(i, output, finished)`` for each update of member i (and once with
        ``(-1, None, True)`` after the last, for closing events), then ``[DONE]``. A client that leaves aborts
        the submission."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        try:
            try:
                for i, out, finished in sub.updates(self._gone):
                    for event in events(i, out, finished):
                        self._event(event)
                for event in events(-1, None, True):
                    self._event(event)
            except (EngineUnavailable, EngineStepFailed) as e:
                code = 503 if isinstance(e, EngineUnavailable) else 500
                self._event({"error": {"message": str(e), "type": "server_error", "code": code}})
            except (BrokenPipeError, ConnectionResetError, TimeoutError, ClientGone):
                raise
            except Exception as e:  # the status line is sent: the error goes out as an event
                log.exception("streaming failed")
                self._event({"error": {"message": f"internal error: {e!r}", "type": "server_error", "code": 500}})
                self._abort(sub)
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, TimeoutError, ClientGone):
            self.close_connection = True
            self._abort(sub)

    def _openai(self, body: dict, chat: bool) -> None:
        request = openai.parse_request(body, chat, None if chat else 16)
        if request.model is not None and request.model not in self.server.model_names:
            raise HTTPError(
                404,
                f"The model `{request.model}` does not exist; this server serves {sorted(self.server.model_names)}",
                param="model",
            )
        if chat:
            messages = openai.message_text(body.get("messages"))
            prompts = [self.server.chat_prompt(messages, body.get("chat_template_kwargs") or {})]
        else:
            prompts, _ = self._prompts(body.get("prompt"), "prompt", text=True, ids=True)
        field, options = "messages" if chat else "prompt", request.options
        top = request.top_logprobs if request.logprobs else 0
        try:
            sub = self._submit(prompts, options, field, None, request.stream, top, 0 if request.echo else -1)
        except ValueError as e:
            raise openai.openai_names(e) from None
        ident, model = openai.completion_id(chat), request.model or self.server.model_name
        if request.stream:
            self._stream(sub, self._openai_chunks(sub, request, chat, ident, model, prompts))
            return
        outs = self._wait(sub)
        choices = []
        for i, out in enumerate(outs):
            text, prefix = self._text(sub, i, out, options), self._echo(sub, i, request)
            facts = openai.token_logprobs_of(out, 0, request.echo)
            logprobs = None
            if request.logprobs:
                logprobs = (
                    openai.chat_logprobs(facts, self._token_text)
                    if chat
                    else openai.completion_logprobs(facts, self._token_text, 0)
                )
            choices.append(openai.choice(i, prefix + text, chat, logprobs, out.finish_reason))
        answer = openai.envelope(ident, chat, model) | {"choices": choices, "usage": openai.usage(prompts, outs)}
        self._send_json(200, answer)

    def _echo(self, sub: Submission, i: int, request: "openai.OpenAIRequest") -> str:
        """The prompt's text that an echoing completion begins with ("" without echo)."""
        if not request.echo:
            return ""
        return self.server.decode(sub.prompts[i // sub.n], request.options.skip_special_tokens)

    def _openai_chunks(self, sub, request, chat: bool, ident: str, model: str, prompts):
        """The stream events of an OpenAI request: per update, the choice's new text and its tokens' log-probs;
        a last chunk per choice with its finish reason; with ``include_usage``, a usage chunk."""
        options = request.options
        texts = [openai.TextStream(sub.params[i // sub.n].stop, options.trim_stop) for i in range(len(sub.members))]
        tokens_sent, finals = [0] * len(sub.members), {}

        def events(i: int, out: GenerateOutput | None, finished: bool) -> list[dict]:
            if out is None:
                if not request.include_usage:
                    return []
                outs = [finals[k] for k in range(len(sub.members))]
                return [
                    openai.envelope(ident, chat, model, True) | {"choices": [], "usage": openai.usage(prompts, outs)}
                ]
            first = tokens_sent[i] == 0 and texts[i].sent == 0
            text = self._text(sub, i, out, options, finished)
            delta = (self._echo(sub, i, request) if first else "") + texts[i].delta(text, finished)
            new_tokens = openai.token_logprobs_of(out, tokens_sent[i], request.echo and first)
            tokens_sent[i] = len(out.output_ids)
            logprobs = None
            if request.logprobs and new_tokens.ids:
                logprobs = (
                    openai.chat_logprobs(new_tokens, self._token_text)
                    if chat
                    else openai.completion_logprobs(new_tokens, self._token_text, 0)
                )
            if finished:
                finals[i] = out
            if not (delta or logprobs or finished or first):
                return []
            piece = openai.chunk_choice(i, delta, chat, logprobs, out.finish_reason if finished else None, first)
            return [openai.envelope(ident, chat, model, True) | {"choices": [piece]}]

        return events

    def _health(self, body: dict) -> None:
        """200 while the engine serves. After a failed step with no good step since, a probe generation decides:
        200 if it runs (the engine recovered), else 503 with the failure."""
        worker = self.server.worker
        if worker.error:
            raise EngineUnavailable(worker.error)
        if worker.failure:
            try:
                self._probe()
            except (EngineStepFailed, EngineUnavailable) as e:
                raise EngineUnavailable(f"the engine is failing: {e}") from None
        self._send_json(200, {"status": "ok", "failed_steps": worker.num_failed_steps})

    def _health_generate(self, body: dict) -> None:
        """SGLang's ``/health_generate``: 200 once a probe generation has run through the engine."""
        if self.server.worker.error:
            raise EngineUnavailable(self.server.worker.error)
        try:
            self._probe()
        except EngineStepFailed as e:
            raise EngineUnavailable(f"the engine is failing: {e}") from None
        self._send_json(200, {"status": "ok"})

    def _probe(self) -> None:
        """Two greedy tokens from a one-token prompt: a prefill and a decode (or verify) step."""
        params = SamplingParams(max_new_tokens=2, temperature=0.0, ignore_eos=True)
        self._wait(self.server.worker.submit([[0]], [params], 1, [f"health-{uuid.uuid4().hex}"]))

    def _models(self, body: dict) -> None:
        created = int(self.server.started)
        models = [
            {"id": name, "object": "model", "created": created, "owned_by": "league", "root": self.server.model_path}
            | {"max_model_len": self.server.engine.context_length}
            for name in sorted(self.server.model_names)
        ]
        self._send_json(200, {"object": "list", "data": models})

    def _flush_cache(self, body: dict) -> None:
        """Empty the prefix cache between two engine steps (running requests keep the blocks they hold)."""
        self.server.worker.call(self.server.engine.flush_cache)
        self._send_json(200, {"success": True, "message": "the prefix cache is empty"})

    def _abort_request(self, body: dict) -> None:
        protocol.check_fields(body, {"rid", "abort_all"}, "the body")
        abort_all, rid = protocol.flag(body, "abort_all"), body.get("rid")
        if not abort_all and not isinstance(rid, str):
            raise ValueError(f"`rid` must be a string (or send abort_all: true), got {rid!r}")
        self._send_json(200, {"success": True, "num_aborted": self.server.worker.abort(None if abort_all else rid)})


_Handler.routes = {
    **control.ROUTES,
    ("POST", "/generate"): _Handler._generate,
    ("GET", "/health"): _Handler._health,
    ("GET", "/health_generate"): _Handler._health_generate,
    ("GET", "/get_model_info"): lambda h, body: h._send_json(200, h.server.model_info()),
    ("GET", "/model_info"): lambda h, body: h._send_json(200, h.server.model_info()),
    ("GET", "/flush_cache"): _Handler._flush_cache,
    ("POST", "/flush_cache"): _Handler._flush_cache,
    ("POST", "/abort_request"): _Handler._abort_request,
    ("POST", "/v1/completions"): lambda h, body: h._openai(body, chat=False),
    ("POST", "/v1/chat/completions"): lambda h, body: h._openai(body, chat=True),
    ("GET", "/v1/models"): _Handler._models,
}


def load_engine(
    model_dir: str,
    engine_config: EngineConfig,
    device: str | None = None,
    dtype: str | None = None,
    tokenizer_dir: str | None = None,
    world: int = 1,
) -> LLMEngine:
    """A checkpoint folder's engine (``world`` > 1: this process's part of one engine over that many processes,
    laid out by ``--tp-size`` / ``--ep-size``; every process calls this together)."""
    from league.checkpoint.hf import resolve_device_dtype
    from league.parallel.inference import laid_out_model

    torch_device, torch_dtype = resolve_device_dtype(device, dtype)
    tp, ep = engine_config.tp_size, engine_config.ep_size
    model, layout, (tp, ep) = laid_out_model(model_dir, torch_device, torch_dtype, tp, ep, world)
    engine_config = dataclasses.replace(engine_config, tp_size=tp, ep_size=ep)
    return LLMEngine(model, engine_config, load_tokenizer(tokenizer_dir or model_dir), layout)


def build_server(
    model_dir: str,
    host: str,
    port: int,
    engine_config: EngineConfig,
    device: str | None = None,
    dtype: str | None = None,
    tokenizer_dir: str | None = None,
    served_model_name: str | None = None,
    api_key: str | None = None,
    engine: LLMEngine | None = None,
) -> EngineServer:
    """Load a checkpoint folder into an engine behind a bound server (``start()`` or ``serve_forever()`` it).

    Args:
        model_dir (str): a Hugging Face checkpoint folder (config.json and safetensors).
        host (str): address to bind, e.g. ``127.0.0.1``.
        port (int): port to bind; 0 picks a free one (``server.port`` names it).
        engine_config (EngineConfig): engine sizes and speculative decoding.
        device (str, Optional): Default: ``cuda`` when available, else ``cpu``.
        dtype (str, Optional): parameter dtype, e.g. ``bfloat16``. Default: bfloat16 on GPU, float32 on CPU.
        tokenizer_dir (str, Optional): where the tokenizer is. Default: ``model_dir`` (none if it has none).
        served_model_name (str, Optional): the model's name in the OpenAI API. Default: ``model_dir``.
        api_key (str, Optional): the key every route but the health checks needs. Default: None (none).
        engine (LLMEngine, Optional): the engine, already loaded (``load_engine``). Default: loaded here.
    """
    check_address(host, port)
    engine = engine or load_engine(model_dir, engine_config, device, dtype, tokenizer_dir)
    return EngineServer(
        engine,
        host,
        port,
        model_path=model_dir,
        tokenizer=engine.tokenizer,
        served_model_name=served_model_name,
        api_key=api_key,
    )


def serve(
    model_dir: str,
    host: str,
    port: int,
    engine_config: EngineConfig,
    device: str | None = None,
    dtype: str | None = None,
    tokenizer_dir: str | None = None,
    served_model_name: str | None = None,
    api_key: str | None = None,
    world: int = 1,
) -> None:
    """``build_server`` with the same arguments, then serve in this thread until Ctrl-C or SIGTERM. ``world`` > 1:
    this is one of that many processes (torchrun) running one engine; the first serves and sends its engine calls
    to the others (``engine.lockstep``), which make them until it stops."""
    from league.engine.lockstep import LeadingEngine, follow

    check_address(host, port)
    engine = load_engine(model_dir, engine_config, device, dtype, tokenizer_dir, world)
    if not engine.layout.leads:  # stops when the leading rank does (which a signal to the job stops first)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        follow(engine, engine.layout)
        return
    served = engine if world == 1 else LeadingEngine(engine, engine.layout)
    server = build_server(
        model_dir, host, port, engine_config, served_model_name=served_model_name, api_key=api_key, engine=served
    )
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    ranks = f" over {world} processes" if world > 1 else ""
    print(f"league serve: {model_dir} on {server.url}{ranks}" + (" (API key required)" if api_key else ""), flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        if world > 1:
            served.close()
