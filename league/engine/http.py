"""The HTTP layer of league's server: a request handler whose every answer is JSON, with the limits a public server
needs (a read timeout, a body limit, chunked bodies and malformed JSON refused, 405 for another method, an optional
Bearer key), and the one-line errors of a failed bind.

Not responsible for routes or what they do (``server.py``), nor for TLS.
"""

import errno
import hmac
import json
import logging
import select
import socket
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger(__name__)


class HTTPError(Exception):
    """A client error with its own status (401, 404, 405, 408, 411, 413); the message says what to change."""

    def __init__(self, status: int, message: str, **extra: Any):
        super().__init__(message)
        self.status, self.extra = status, extra


class JSONHandler(BaseHTTPRequestHandler):
    """A request handler whose every answer is JSON: ``routes`` maps ``(method, path)`` to ``route(handler, body)``
    (the body of a POST is its JSON object, read within the server's ``read_timeout`` and ``max_body_bytes``);
    ``statuses`` maps exception types to the status they answer (a ``ValueError`` is a 400); ``quiet`` exceptions end
    a request without an answer. With the server's ``api_key`` set, every path but ``open_paths`` needs it."""

    routes: dict[tuple[str, str], Callable[["JSONHandler", dict], None]] = {}
    statuses: dict[type[Exception], int] = {}
    quiet: tuple[type[Exception], ...] = ()
    open_paths: frozenset[str] = frozenset()

    def setup(self) -> None:
        self.timeout = self.server.read_timeout  # every read and write of this connection
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (a malformed request line, headers too long, ...) as JSON, not HTML."""
        self.close_connection = True
        self._send_error(code, message or self.responses.get(code, ("error",))[0])

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def do_PUT(self) -> None:
        self._route("PUT")

    def do_DELETE(self) -> None:
        self._route("DELETE")

    def do_PATCH(self) -> None:
        self._route("PATCH")

    def do_HEAD(self) -> None:
        self._route("HEAD")

    def do_OPTIONS(self) -> None:
        self._route("OPTIONS")

    def _route(self, method: str) -> None:
        path = urlsplit(self.path).path
        route = self.routes.get((method, path))
        try:
            if route is None:
                allowed = sorted(m for m, p in self.routes if p == path)
                if allowed:
                    raise HTTPError(405, f"{method} {path}: use {' or '.join(allowed)}", allow=", ".join(allowed))
                raise HTTPError(404, f"no route {method} {path}; routes: {sorted({p for _, p in self.routes})}")
            self._authorize(path)
            route(self, self._body() if method == "POST" else {})
        except HTTPError as e:
            self._send_error(e.status, str(e), **e.extra)
        except ValueError as e:
            self._send_error(400, str(e))
        except self.quiet:
            log.debug("client %s went away; its requests were aborted", self.address_string())
        except tuple(self.statuses) as e:
            self._send_error(next(s for t, s in self.statuses.items() if isinstance(e, t)), str(e))
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True
            log.debug("client %s went away", self.address_string())
        except Exception as e:
            log.exception("%s %s failed", method, path)
            self._send_error(500, f"internal error: {e!r}")

    def _authorize(self, path: str) -> None:
        """With the server's ``api_key``, every path but ``open_paths`` needs ``Authorization: Bearer KEY``."""
        key = self.server.api_key
        if key is None or path in self.open_paths:
            return
        given = self.headers.get("Authorization") or ""
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise HTTPError(401, "missing or wrong API key: send the header `Authorization: Bearer <api key>`")

    def _body(self) -> dict:
        """The JSON object of a POST body, read with the server's time limit and size limit."""
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            raise HTTPError(411, "chunked request bodies are not accepted: send a Content-Length header")
        raw_length = self.headers.get("Content-Length") or "0"
        if not raw_length.strip().isdecimal():
            raise ValueError(f"Content-Length {raw_length!r:.40} is not a number of bytes")
        length, limit = int(raw_length), self.server.max_body_bytes
        if length > limit:
            self.close_connection = True
            raise HTTPError(413, f"the request body has {length} bytes; this server takes up to {limit}")
        try:
            data = self.rfile.read(length) if length else b""
        except TimeoutError:
            self.close_connection = True
            raise HTTPError(
                408, f"the request body did not arrive within {self.server.read_timeout:g} s (Content-Length {length})"
            ) from None
        if len(data) < length:
            self.close_connection = True
            raise ValueError(f"the request body ended after {len(data)} of its {length} bytes (Content-Length)")
        try:
            body = json.loads(data) if length else {}
            json.dumps(body, ensure_ascii=False).encode()  # lone surrogates ("\ud800") cannot be encoded
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"the request body is not valid JSON: {e}") from None
        except UnicodeEncodeError:
            raise ValueError("the request body holds a lone UTF-16 surrogate (e.g. \\ud800) in a string") from None
        except RecursionError:
            raise ValueError("the request body is nested too deeply") from None
        if not isinstance(body, dict):
            raise ValueError(f"the request body must be a JSON object, got {type(body).__name__}")
        return body

    def _send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _send_error(self, status: int, text: str, allow: str | None = None, **extra: Any) -> None:
        kind = "authentication_error" if status == 401 else "invalid_request_error" if status < 500 else "server_error"
        error = {"message": text, "type": kind, "code": status} | {k: extra.pop(k) for k in ("param",) if k in extra}
        self._send_json(status, {**extra, "error": error}, {"Allow": allow} if allow else None)

    def _gone(self) -> bool:
        """Whether the client has closed its connection (checked while its request waits on the engine)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _event(self, obj: dict) -> None:
        """One server-sent event."""
        self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
        self.wfile.flush()


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
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
        try:
            probe.bind((host, port))
        except OSError as e:
            raise bind_error(host, port, e) from None
