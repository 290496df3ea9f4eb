"""The interpreter's HTTP/1.1 server: E2B's code-interpreter routes over :class:`.contexts.Contexts`.

Routes (errors are JSON ``{"error": "..."}`` with 400, 404, 405, 411, 413 or 503):

* ``GET /health``: 200 ``OK`` once the default python context runs; 503 while it starts
  or when it could not start (the reason in ``error``)
* ``POST /execute`` ``{"code", "context_id"?, "language"?, "env_vars"?, "timeout"?}``: 200
  ``application/x-ndjson``, chunked, one output object per line as it happens
  (:mod:`.outputs`). ``context_id`` and ``language`` exclude each other; neither: the
  default python context. ``timeout`` (seconds, a trenvx addition E2B's SDKs do not send)
  bounds this cell below the server's ``--max-execution-s``; ``silent`` (trenvx's too) runs it
  as Jupyter's silent cell, no output and no execution count (trenvx's pools warm the request
  path with one). A client that disconnects interrupts its cell.
* ``POST /contexts`` ``{"language"?, "cwd"?}``: 201 ``{"id", "language", "cwd"}``
* ``GET /contexts``: 200, the list of contexts (the default ones included)
* ``DELETE /contexts/{id}``: 204; ``POST /contexts/{id}/restart``: 204

Each connection has a thread (``ThreadingHTTPServer``); no request, however malformed,
takes the server down.
"""

from __future__ import annotations

import json
import logging
import queue
import select
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from . import __version__
from .contexts import Context, Contexts, KernelNotInstalled, UnknownContext
from .kernel import CLIENT_GONE, Execution, KernelStartError
from .languages import PYTHON, UnknownLanguage, check_env, language_named

log = logging.getLogger("trenvx_interpreter.server")

MAX_BODY_BYTES = 16 << 20
LINE_WAIT_S = 0.25
"""How often a streaming /execute checks, while its cell prints nothing, whether its client left."""
NDJSON = "application/x-ndjson"


class HttpError(Exception):
    """A request answered with an error status and ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def _allow(methods: str) -> HttpError:
    return HttpError(405, f"method not allowed here; allowed: {methods}", {"Allow": methods})


class Request:
    """One request and its response, as the routes see it."""

    def __init__(self, handler: BaseHTTPRequestHandler) -> None:
        self._h = handler
        self.method = handler.command
        self.path = handler.path.split("?", 1)[0]
        self.headers_sent = False
        self._chunked = False

    def body_json(self, route: str, *, required: bool = True) -> dict[str, Any]:
        """The body as a JSON object (empty body: ``{}`` unless ``required``)."""
        h = self._h
        if "chunked" in (h.headers.get("Transfer-Encoding") or "").lower():
            h.close_connection = True
            raise HttpError(411, "send the request body with a Content-Length, not chunked")
        length_text = h.headers.get("Content-Length") or "0"
        try:
            length = int(length_text)
            if length < 0:
                raise ValueError
        except ValueError:
            h.close_connection = True
            raise HttpError(400, f"invalid Content-Length: {length_text!r}") from None
        if length > MAX_BODY_BYTES:
            h.close_connection = True  # the body is not read
            raise HttpError(413, f"request body of {length} bytes is larger than the limit of {MAX_BODY_BYTES} bytes")
        raw = h.rfile.read(length) if length else b""
        if len(raw) < length:
            h.close_connection = True
            raise HttpError(400, "connection closed before the end of the request body")
        if not raw.strip():
            if required:
                raise HttpError(400, f"{route} needs a JSON object body")
            return {}
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise HttpError(400, f"invalid JSON body for {route}: {exc}") from None
        if not isinstance(body, dict):
            raise HttpError(400, f"the body of {route} must be a JSON object, not {type(body).__name__}")
        return body

    def discard_body(self) -> None:
        length_text = self._h.headers.get("Content-Length") or "0"
        try:
            length = int(length_text)
        except ValueError:
            length = -1
        if "chunked" in (self._h.headers.get("Transfer-Encoding") or "").lower() or not 0 <= length <= MAX_BODY_BYTES:
            self._h.close_connection = True
        elif length:
            self._h.rfile.read(length)

    def _head(self, status: int, headers: dict[str, str]) -> None:
        h = self._h
        h.send_response(status)
        for key, value in headers.items():
            h.send_header(key, value)
        if h.close_connection:
            h.send_header("Connection", "close")
        h.end_headers()
        self.headers_sent = True

    def respond(self, status: int, body: bytes = b"", content_type: str | None = None,
                headers: dict[str, str] | None = None) -> None:
        out = dict(headers or {})
        if content_type:
            out["Content-Type"] = content_type
        if status != 204:
            out["Content-Length"] = str(len(body))
        self._head(status, out)
        if body and status != 204 and self.method != "HEAD":
            self._h.wfile.write(body)

    def respond_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self.respond(status, json.dumps(obj, ensure_ascii=False).encode("utf-8"), "application/json", headers)

    def start_stream(self, content_type: str) -> None:
        self._head(200, {"Content-Type": content_type, "Transfer-Encoding": "chunked",
                         "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._chunked = True

    def write_line(self, obj: Any) -> None:
        """One JSON line as one chunk, sent now. OSError when the client is gone."""
        data = json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n"
        self._h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def end_stream(self) -> None:
        if self._chunked:
            self._h.wfile.write(b"0\r\n\r\n")
            self._chunked = False

    def client_gone(self) -> bool:
        """Whether the client closed its side of the connection."""
        sock = self._h.connection
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            if not readable:
                return False
            return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except (OSError, ValueError):
            return True


class Interpreter:
    """The application: the contexts, whether the default one is up, the route table."""

    def __init__(self, contexts: Contexts, max_execution_s: float | None = None) -> None:
        self.contexts = contexts
        self.max_execution_s = max_execution_s if max_execution_s and max_execution_s > 0 else None
        self._ready = threading.Event()
        self._startup_error: str | None = None

    # ------------------------------------------------------------------ start-up
    def start_default(self) -> None:
        """Start the default python context (blocking); /health says 200 once it runs."""
        try:
            self.contexts.default(PYTHON)
        except Exception as exc:
            self._startup_error = str(exc)
            log.error("the default python context did not start: %s", exc)
            return
        self._startup_error = None
        self._ready.set()

    def start_default_in_background(self) -> threading.Thread:
        thread = threading.Thread(target=self.start_default, name="default-context", daemon=True)
        thread.start()
        return thread

    # ------------------------------------------------------------------ dispatch
    def dispatch(self, req: Request) -> None:
        try:
            self._route(req)
        except HttpError as err:
            if req.headers_sent:
                raise
            req.respond_json(err.status, {"error": err.message}, err.headers)

    def _route(self, req: Request) -> None:
        path, method = req.path, req.method
        if path == "/health":
            req.discard_body()
            if method != "GET":
                raise _allow("GET")
            self._health(req)
        elif path == "/execute":
            if method != "POST":
                req.discard_body()
                raise _allow("POST")
            self._execute(req)
        elif path == "/contexts":
            if method == "GET":
                req.discard_body()
                req.respond_json(200, [ctx.as_json() for ctx in self.contexts.list()])
            elif method == "POST":
                self._create_context(req)
            else:
                req.discard_body()
                raise _allow("GET, POST")
        elif path.startswith("/contexts/"):
            req.discard_body()
            parts = path[len("/contexts/"):].split("/")
            if len(parts) == 1 and parts[0]:
                if method != "DELETE":
                    raise _allow("DELETE")
                self._context_call(req, parts[0], self.contexts.delete)
            elif len(parts) == 2 and parts[0] and parts[1] == "restart":
                if method != "POST":
                    raise _allow("POST")
                self._context_call(req, parts[0], self.contexts.restart)
            else:
                raise HttpError(404, f"no such endpoint: {path}")
        else:
            req.discard_body()
            raise HttpError(404, f"no such endpoint: {path}")

    def _health(self, req: Request) -> None:
        if self._ready.is_set() or self.contexts.default_started(PYTHON):  # (a later /execute may have started it)
            req.respond(200, b"OK", "text/plain; charset=utf-8")
        elif self._startup_error is not None:
            raise HttpError(503, f"the default python kernel did not start: {self._startup_error}")
        else:
            raise HttpError(503, "the default python kernel is starting")

    def _context_call(self, req: Request, context_id: str, action: Any) -> None:
        try:
            action(context_id)
        except UnknownContext as exc:
            raise HttpError(404, str(exc)) from None
        except (KernelStartError, TimeoutError) as exc:
            raise HttpError(500, f"context {context_id}: {exc}") from None
        req.respond(204)

    def _create_context(self, req: Request) -> None:
        body = req.body_json("POST /contexts", required=False)
        cwd = body.get("cwd")
        if cwd is not None and (not isinstance(cwd, str) or not cwd.startswith("/") or "\x00" in cwd):
            raise HttpError(400, f"cwd must be an absolute path (a string starting with '/'), not {cwd!r}")
        language = self._language(body.get("language"))
        try:
            ctx = self.contexts.create(language, cwd)
        except KernelNotInstalled as exc:
            raise HttpError(400, str(exc)) from None
        except (KernelStartError, TimeoutError) as exc:
            raise HttpError(503, f"could not start the {language.name} kernel: {exc}") from None
        req.respond_json(201, ctx.as_json())

    @staticmethod
    def _language(name: Any) -> Any:
        if name == "":
            raise HttpError(400, "language must not be empty; give a name or null")
        try:
            return language_named(name)
        except UnknownLanguage as exc:
            raise HttpError(400, str(exc)) from None

    def _execute(self, req: Request) -> None:
        body = req.body_json("POST /execute")
        code = body.get("code")
        if not isinstance(code, str):
            raise HttpError(400, "code is required and must be a string")
        context_id = body.get("context_id")
        language_name = body.get("language")
        if context_id is not None and language_name is not None:
            raise HttpError(400, "give context_id or language, not both (a context has its language)")
        if context_id is not None and (not isinstance(context_id, str) or not context_id):
            raise HttpError(400, "context_id must be a non-empty string or null")
        try:
            env = check_env(body.get("env_vars"))
        except ValueError as exc:
            raise HttpError(400, str(exc)) from None
        bound = self._bound(body.get("timeout"))
        silent = body.get("silent", False)
        if not isinstance(silent, bool):
            raise HttpError(400, "silent must be true or false")
        ctx = self._context_for(context_id, language_name)
        self.contexts.before_execution()
        execution = Execution(code, env, bound, silent=silent)
        ctx.kernel.submit(execution)
        self._stream(req, execution)

    def _bound(self, timeout: Any) -> float | None:
        if timeout is None:
            return self.max_execution_s
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise HttpError(400, f"timeout must be a number of seconds > 0 (or null), not {timeout!r}")
        return min(float(timeout), self.max_execution_s or float(timeout))

    def _context_for(self, context_id: str | None, language_name: Any) -> Context:
        if context_id is not None:
            try:
                return self.contexts.get(context_id)
            except UnknownContext as exc:
                raise HttpError(404, str(exc)) from None
        language = self._language(language_name)
        try:
            return self.contexts.default(language)
        except KernelNotInstalled as exc:
            raise HttpError(400, str(exc)) from None
        except (KernelStartError, TimeoutError) as exc:
            raise HttpError(503, f"the default {language.name} kernel is not available: {exc}") from None

    def _stream(self, req: Request, execution: Execution) -> None:
        req.start_stream(NDJSON)
        while True:
            try:
                line = execution.lines.get(timeout=LINE_WAIT_S)
            except queue.Empty:
                if req.client_gone():
                    execution.cancel(CLIENT_GONE)
                    raise ConnectionResetError("the client disconnected during the cell")
                continue
            if line is None:
                break
            try:
                req.write_line(line)
            except OSError:
                execution.cancel(CLIENT_GONE)
                raise
        req.end_stream()

    def shutdown(self) -> None:
        self.contexts.shutdown()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = f"trenvx-interpreter/{__version__}"
    sys_version = ""
    disable_nagle_algorithm = True
    timeout = 900  # idle keep-alive connections are dropped after this
    server: InterpreterHTTPServer

    def version_string(self) -> str:
        return self.server_version

    def _handle(self) -> None:
        req = Request(self)
        try:
            self.server.app.dispatch(req)
        except (ConnectionError, TimeoutError, BrokenPipeError) as exc:
            log.info("%s %s: connection problem: %s", self.command, req.path, exc)
            self.close_connection = True
        except Exception as exc:
            log.exception("%s %s failed", self.command, req.path)
            self.close_connection = True
            if not req.headers_sent:
                try:
                    req.respond_json(500, {"error": f"internal error: {exc}"})
                except OSError:
                    pass

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _handle

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def log_error(self, format: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), format % args)


class InterpreterHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], app: Interpreter) -> None:
        self.app = app
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError, socket.timeout)):
            log.debug("connection from %s dropped: %s", client_address, exc)
            return
        log.exception("unhandled error on connection from %s", client_address)
