"""An HTTP server in front of one LLMEngine, speaking the subset of SGLang's API that RL loops use.

Handler threads (``ThreadingHTTPServer``) parse a request (``protocol.py``), hand its prompts to the
``EngineWorker`` whose single thread drives the engine, and wait for the outputs. Routes: ``POST /generate``,
``GET /health``, ``GET /get_model_info``, ``POST /update_weights_from_disk``, ``POST /flush_cache``,
``POST /abort_request``, and OpenAI-style ``POST /v1/completions``, ``POST /v1/chat/completions``,
``GET /v1/models``. A ValueError becomes HTTP 400, a stopped or failed engine 503. Not responsible for
scheduling or sampling (the engine), authentication, or TLS.
"""

import contextlib
import dataclasses
import errno
import json
import logging
import signal
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from league.engine import protocol
from league.engine.engine import EngineConfig, LLMEngine
from league.engine.request import GenerateOutput
from league.engine.worker import EngineUnavailable, EngineWorker, Submission
from league.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 256 << 20


class EngineServer(ThreadingHTTPServer):
    """An HTTP server over one engine; ``start()`` serves from a thread, ``shutdown()`` stops both threads.

    Args:
        engine (LLMEngine): the engine to serve; the server's worker thread drives it from now on.
        host (str): address to bind, e.g. ``127.0.0.1``.
        port (int): port to bind; 0 lets the OS pick a free one (read it back from ``port``).
        model_path (str, Optional): reported by ``/get_model_info`` and OpenAI answers. Default: "".
        tokenizer (Optional): a transformers tokenizer for ``text`` prompts, output text and chat. Default: None.
    """

    daemon_threads = True
    request_queue_size = 1024

    def __init__(self, engine: LLMEngine, host: str, port: int, model_path: str = "", tokenizer=None):
        try:
            super().__init__((host, port), _Handler)
        except OSError as e:
            raise bind_error(host, port, e) from None
        self.engine, self.model_path, self.tokenizer = engine, model_path, tokenizer
        self.weight_version = "default"
        self.worker = EngineWorker(engine)
        self._tokenizer_lock = threading.Lock()
        self._serving = False

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
        with self._tokenizer_lock:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if self.tokenizer is None:
            return ""
        with self._tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def chat_prompt(self, messages: Any, template_kwargs: Any) -> list[int]:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("`messages` needs a tokenizer with a chat template; this server has none")
        if not (isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages)):
            raise ValueError(f"`messages` must be a non-empty list of {{role, content}} objects, got {messages!r}")
        if not isinstance(template_kwargs, dict):
            raise ValueError(f"`chat_template_kwargs` must be an object, got {template_kwargs!r}")
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
            "weight_version": self.weight_version,
        }


class _Handler(BaseHTTPRequestHandler):
    server: EngineServer

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def _route(self, method: str) -> None:
        path = urlsplit(self.path).path
        route = _ROUTES.get((method, path))
        try:
            if route is None:
                self._send_error(404, f"no route {method} {path}; routes: {sorted(p for _, p in _ROUTES)}")
                return
            route(self, self._body() if method == "POST" else {})
        except ValueError as e:
            self._send_error(400, str(e))
        except EngineUnavailable as e:
            self._send_error(503, str(e))
        except (BrokenPipeError, ConnectionResetError):
            log.debug("client %s went away", self.address_string())
        except Exception as e:
            log.exception("%s %s failed", method, path)
            self._send_error(500, f"internal error: {e!r}")

    def _body(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 <= length <= MAX_BODY_BYTES:
            raise ValueError(f"Content-Length {length}: the request body may have up to {MAX_BODY_BYTES} bytes")
        try:
            body = json.loads(self.rfile.read(length)) if length else {}
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise ValueError(f"the request body must be a JSON object, got {type(body).__name__}")
        return body

    def _send_json(self, status: int, obj: Any) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, status: int, text: str, **extra: Any) -> None:
        self._send_json(status, {**extra, "error": {"message": text, "code": status}})

    def _prompts(self, value: Any, field: str, text: bool, ids: bool) -> tuple[list[list[int]], bool]:
        return protocol.parse_prompts(value, field, lambda s: self.server.encode(s, field), text, ids)

    def _submit(
        self, prompts: list[list[int]], options: protocol.SamplingOptions, field: str, rids=None, stream=False
    ) -> Submission:
        if options.fields.get("stop") and self.server.tokenizer is None:
            raise ValueError("sampling_params.stop (strings) needs a tokenizer; this server has none")
        context_length = self.server.engine.context_length
        params = [protocol.params_for(options, len(p), context_length, field) for p in prompts]
        rids = rids or protocol.parse_rids(None, len(prompts), True)
        return self.server.worker.submit(prompts, params, options.n, rids, stream)

    def _text(
        self, sub: Submission, i: int, out: GenerateOutput, options: protocol.SamplingOptions, finished: bool = True
    ) -> str:
        text = self.server.decode(out.output_ids, options.skip_special_tokens)
        return protocol.trim(text, out, sub.params[i // sub.n], options) if finished else text

    def _generate(self, body: dict) -> None:
        protocol.check_fields(body, protocol.GENERATE_FIELDS, "the /generate body")
        if ("text" in body) == ("input_ids" in body):
            raise ValueError("give exactly one of `text` or `input_ids`")
        field = "text" if "text" in body else "input_ids"
        prompts, batched = self._prompts(body[field], field, text=field == "text", ids=field == "input_ids")
        options = protocol.parse_sampling(body.get("sampling_params") or {}, "sampling_params", 128)
        return_logprob, stream = protocol.flag(body, "return_logprob"), protocol.flag(body, "stream")
        rids = protocol.parse_rids(body.get("rid"), len(prompts), batched)
        sub = self._submit(prompts, options, field, rids, stream)

        def render(i: int, out: GenerateOutput, finished: bool) -> dict:
            text = self._text(sub, i, out, options, finished)
            return protocol.generate_result(out, sub.params[i // sub.n], text, return_logprob, finished)

        if stream:
            self._stream(sub, render)
            return
        results = [render(i, out, True) for i, out in enumerate(sub.outputs())]
        self._send_json(200, results if batched or options.n > 1 else results[0])

    def _stream(self, sub: Submission, render: Callable[[int, GenerateOutput, bool], dict]) -> None:
        """Server-sent events: a cumulative snapshot per update, ``index`` naming the sample; then [DONE]."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        try:
            try:
                for i, out, finished in sub.updates():
                    self._event({**render(i, out, finished), "index": i})
            except EngineUnavailable as e:
                self._event({"error": {"message": str(e), "code": 503}})
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            with contextlib.suppress(EngineUnavailable):
                for rid in sub.rids:
                    self.server.worker.abort(rid)

    def _event(self, obj: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
        self.wfile.flush()

    def _openai(self, body: dict, chat: bool) -> None:
        fields = protocol.OPENAI_FIELDS | ({"messages", "chat_template_kwargs"} if chat else {"prompt"})
        protocol.check_fields(body, fields, "the body")
        if protocol.flag(body, "stream"):
            raise ValueError("`stream` is not supported on the OpenAI routes; stream from /generate")
        if chat:
            prompts = [self.server.chat_prompt(body.get("messages"), body.get("chat_template_kwargs") or {})]
        else:
            prompts, _ = self._prompts(body.get("prompt"), "prompt", text=True, ids=True)
        raw = {protocol.OPENAI_SAMPLING[k]: v for k, v in body.items() if k in protocol.OPENAI_SAMPLING}
        options = protocol.parse_sampling(raw, "body", None if chat else 16)
        sub = self._submit(prompts, options, "messages" if chat else "prompt")
        outs, logprobs = sub.outputs(), body.get("logprobs") not in (None, False)
        choices = [
            protocol.openai_choice(
                i,
                out,
                self._text(sub, i, out, options),
                [self.server.decode([t], False) or f"token_id:{t}" for t in out.output_ids],
                logprobs,
                chat,
            )
            for i, out in enumerate(outs)
        ]
        self._send_json(200, protocol.openai_response(choices, prompts, outs, self.server.model_path, chat))

    def _health(self, body: dict) -> None:
        if self.server.worker.error:
            raise EngineUnavailable(self.server.worker.error)
        self._send_json(200, {"status": "ok"})

    def _models(self, body: dict) -> None:
        model = {"id": self.server.model_path, "object": "model", "owned_by": "league"}
        self._send_json(200, {"object": "list", "data": [model | {"max_model_len": self.server.engine.context_length}]})

    def _update_weights(self, body: dict) -> None:
        protocol.check_fields(body, {"model_path", "abort_all_requests", "weight_version"}, "the body")
        path = body.get("model_path")
        if not isinstance(path, str) or not path:
            raise ValueError(f"`model_path` must be a checkpoint folder, got {path!r}")
        try:
            in_flight = self.server.worker.update_weights_from_disk(path, protocol.flag(body, "abort_all_requests"))
        except (ValueError, OSError) as e:
            self._send_error(400, f"model_path {path!r}: {e}", success=False, message=str(e))
            return
        self.server.weight_version = str(body.get("weight_version") or path)
        message = f"loaded {path} between two engine steps; {in_flight} requests in flight go on with it"
        self._send_json(200, {"success": True, "message": message, "num_paused_requests": in_flight})

    def _flush_cache(self, body: dict) -> None:
        self._send_json(200, {"success": True, "message": "league keeps no prefix cache; there is nothing to flush"})

    def _abort_request(self, body: dict) -> None:
        protocol.check_fields(body, {"rid", "abort_all"}, "the body")
        abort_all, rid = protocol.flag(body, "abort_all"), body.get("rid")
        if not abort_all and not isinstance(rid, str):
            raise ValueError(f"`rid` must be a string (or send abort_all: true), got {rid!r}")
        self._send_json(200, {"success": True, "num_aborted": self.server.worker.abort(None if abort_all else rid)})


_ROUTES: dict[tuple[str, str], Callable[[_Handler, dict], None]] = {
    ("POST", "/generate"): _Handler._generate,
    ("GET", "/health"): _Handler._health,
    ("GET", "/get_model_info"): lambda h, body: h._send_json(200, h.server.model_info()),
    ("POST", "/update_weights_from_disk"): _Handler._update_weights,
    ("GET", "/flush_cache"): _Handler._flush_cache,
    ("POST", "/flush_cache"): _Handler._flush_cache,
    ("POST", "/abort_request"): _Handler._abort_request,
    ("POST", "/v1/completions"): lambda h, body: h._openai(body, chat=False),
    ("POST", "/v1/chat/completions"): lambda h, body: h._openai(body, chat=True),
    ("GET", "/v1/models"): _Handler._models,
}


def bind_error(host: str, port: int, error: OSError) -> ValueError:
    """A user error naming ``--host`` or ``--port`` for a failed bind, and what to do."""
    if isinstance(error, socket.gaierror) or error.errno == errno.EADDRNOTAVAIL:
        why = f"`--host` {host!r} is not an address of this machine ({error.strerror}); try 127.0.0.1 or 0.0.0.0"
    elif error.errno == errno.EADDRINUSE:
        why = f"`--port` {port} is in use; pick another (0 picks a free one)"
    elif error.errno == errno.EACCES:
        why = f"no permission to bind `--port` {port} (ports below 1024 need privileges); pick another"
    else:
        why = error.strerror or str(error)
    return ValueError(f"cannot serve on {host}:{port}: {why}")


def check_address(host: str, port: int) -> None:
    """Raise :func:`bind_error`'s error now if ``(host, port)`` cannot be bound, before a model is loaded."""
    with socket.socket(EngineServer.address_family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
        try:
            probe.bind((host, port))
        except OSError as e:
            raise bind_error(host, port, e) from None


def build_server(
    model_dir: str,
    host: str,
    port: int,
    engine_config: EngineConfig,
    device: str | None = None,
    dtype: str | None = None,
    tokenizer_dir: str | None = None,
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
    """
    from league.checkpoint.hf import load_model, resolve_device_dtype

    check_address(host, port)
    torch_device, torch_dtype = resolve_device_dtype(device, dtype)
    model = load_model(model_dir, torch_device, torch_dtype).eval()
    tokenizer = load_tokenizer(tokenizer_dir or model_dir)
    engine = LLMEngine(model, engine_config, tokenizer)
    return EngineServer(engine, host, port, model_path=model_dir, tokenizer=tokenizer)


def serve(
    model_dir: str,
    host: str,
    port: int,
    engine_config: EngineConfig,
    device: str | None = None,
    dtype: str | None = None,
    tokenizer_dir: str | None = None,
) -> None:
    """``build_server`` with the same arguments, then serve in this thread until Ctrl-C or SIGTERM."""
    server = build_server(model_dir, host, port, engine_config, device, dtype, tokenizer_dir)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    print(f"league serve: {model_dir} on {server.url}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
