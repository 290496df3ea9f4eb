"""The agent's HTTP/1.1 server: routing, access-token check, error containment.

One thread per connection (``ThreadingHTTPServer``), keep-alive, chunked responses for
streams. Routes:

* ``GET /health`` -> 204 (never needs the token)
* ``POST /init``, ``GET /envs``, ``GET /metrics``
* ``GET|POST /files``
* ``POST /process.Process/<Method>``, ``POST /filesystem.Filesystem/<Method>`` (Connect)
* ``POST /freeze`` ``{"thawAfterSeconds": N}``, ``POST /thaw``: hold the writable filesystems still
  for a pause to disk (:mod:`.freeze`); ``/init`` thaws them first
* ``POST /ports/forward`` ``{"port": N}``: relay a port bound to the guest's loopback to the
  address the request arrived on (:mod:`.ports`); ``GET /ports/forward`` lists the relays

After ``/init`` set an access token, every other request must carry it in
``X-Access-Token`` (``/files`` also takes a signed URL in its place). No request, however
malformed, takes the agent down: each failure becomes an error response (or a closed
connection when the framing itself is broken).
"""

from __future__ import annotations

import json
import logging
import queue
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from . import ENVD_COMPAT_VERSION, __version__
from .connect import ConnectError, Rpc, RpcContext, serve_rpc
from .files import FilesApi
from .freeze import FreezeUnavailable, Freezer, thaw_after
from .filesystem import FilesystemService
from .httpio import BadRequest, BodyTooLarge, Exchange
from .identity import InitApi, SystemIdentity
from .metrics import Metrics
from .ports import NoGuestAddress, NothingListens, PortForwarder, TooManyRelays
from .process import ProcessService
from .state import AgentState
from .users import basic_auth_user

log = logging.getLogger("trenvx_agent.server")

DEFAULT_KEEPALIVE_S = 30.0
MAX_INIT_BYTES = 4 << 20
MAX_FORWARD_BYTES = 4096
MAX_FREEZE_BYTES = 4096


class Agent:
    """The agent application: state, services and the route table."""

    def __init__(self, *, system: SystemIdentity | None = None, force_polling_watch: bool = False,
                 freezer: Freezer | None = None) -> None:
        self.state = AgentState()
        self.freezer = freezer or Freezer()
        self.processes = ProcessService(self.state)
        self.filesystem = FilesystemService(self.state, force_polling=force_polling_watch)
        self.files = FilesApi(self.state)
        self.init_api = InitApi(self.state, system or SystemIdentity())
        self.metrics = Metrics()
        self.ports = PortForwarder()
        p, f = self.processes, self.filesystem
        self.rpcs: dict[str, Rpc] = {
            "/process.Process/Start": Rpc("server_stream", p.start),
            "/process.Process/Connect": Rpc("server_stream", p.connect),
            "/process.Process/List": Rpc("unary", p.list),
            "/process.Process/SendInput": Rpc("unary", p.send_input),
            "/process.Process/StreamInput": Rpc("client_stream", p.stream_input),
            "/process.Process/SendSignal": Rpc("unary", p.send_signal),
            "/process.Process/CloseStdin": Rpc("unary", p.close_stdin),
            "/process.Process/Update": Rpc("unary", p.update),
            "/filesystem.Filesystem/Stat": Rpc("unary", f.stat),
            "/filesystem.Filesystem/ListDir": Rpc("unary", f.list_dir),
            "/filesystem.Filesystem/MakeDir": Rpc("unary", f.make_dir),
            "/filesystem.Filesystem/Move": Rpc("unary", f.move),
            "/filesystem.Filesystem/Remove": Rpc("unary", f.remove),
            "/filesystem.Filesystem/WatchDir": Rpc("server_stream", f.watch_dir),
            "/filesystem.Filesystem/CreateWatcher": Rpc("unary", f.create_watcher),
            "/filesystem.Filesystem/GetWatcherEvents": Rpc("unary", f.get_watcher_events),
            "/filesystem.Filesystem/RemoveWatcher": Rpc("unary", f.remove_watcher),
        }

    # ------------------------------------------------------------------ dispatch
    def dispatch(self, ex: Exchange) -> None:
        path = ex.path
        if ex.method == "OPTIONS":  # CORS preflight; never needs the token
            ex.body.drain()
            ex.respond(204, headers={
                "Access-Control-Allow-Methods": "GET, POST, PUT, DELETE, OPTIONS",
                "Access-Control-Allow-Headers": "*",
                "Access-Control-Max-Age": "7200",
            })
            return
        if path == "/health":
            ex.body.drain()
            ex.respond(204, headers={"X-Envd-Version": ENVD_COMPAT_VERSION})
            return
        # /files judges its own access: the token, or a signed URL in its place (files.FilesApi.authorize).
        if path != "/files" and not self.state.token_matches(ex.header("X-Access-Token")):
            if not ex.body.drain():
                ex.close_after()
            message = "missing or invalid access token (X-Access-Token header)"
            if path in self.rpcs:
                ex.respond_json(401, {"code": "unauthenticated", "message": message})
            else:
                ex.respond_json(401, {"code": 401, "message": message})
            return
        rpc = self.rpcs.get(path)
        if rpc is not None:
            serve_rpc(ex, rpc, self._context)
        elif path == "/files":
            self.files.handle(ex)
        elif path == "/init":
            self._init(ex)
        elif path == "/envs":
            self._simple_get(ex, lambda: self.state.env_snapshot())
        elif path == "/metrics":
            self._simple_get(ex, self.metrics.snapshot)
        elif path == "/ports/forward":
            self._forward_port(ex)
        elif path in ("/freeze", "/thaw"):
            self._freeze(ex, path)
        else:
            ex.body.drain()
            if path.count("/") == 2 and path[1:].split("/")[0].count(".") >= 1:
                ex.respond_json(404, {"code": "unimplemented", "message": f"unknown RPC method {path}"})
            else:
                ex.respond_json(404, {"code": 404, "message": f"no such endpoint: {path}"})

    def _context(self, ex: Exchange, deadline: float | None) -> RpcContext:
        keepalive = DEFAULT_KEEPALIVE_S
        header = ex.header("Keepalive-Ping-Interval")
        if header:
            try:
                keepalive = max(0.05, float(header))
            except ValueError:
                pass
        return RpcContext(
            exchange=ex,
            basic_user=basic_auth_user(ex.header("Authorization")),
            deadline=deadline,
            keepalive_interval=keepalive,
        )

    def _simple_get(self, ex: Exchange, fn: Any) -> None:
        ex.body.drain()
        if ex.method != "GET":
            ex.respond_json(405, {"code": 405, "message": f"method {ex.method} not allowed"}, headers={"Allow": "GET"})
            return
        ex.respond_json(200, fn())

    def _init(self, ex: Exchange) -> None:
        if ex.method != "POST":
            ex.body.drain()
            ex.respond_json(405, {"code": 405, "message": f"method {ex.method} not allowed"}, headers={"Allow": "POST"})
            return
        body = self._json_object(ex, MAX_INIT_BYTES, "/init")
        if body is None:
            return
        # A resumed sandbox is frozen (its pause froze it): /init writes /etc, so it thaws first.
        thawed = self.freezer.thaw() if self.freezer.frozen else None
        if thawed and thawed["errors"]:
            log.warning("init: thawing failed: %s", thawed["errors"])
        try:
            warnings = self.init_api.init(body)
        except ConnectError as err:
            ex.respond_json(400, {"code": 400, "message": err.message})
            return
        headers = {"X-Init-Warnings": "; ".join(warnings)[:1000]} if warnings else None
        ex.respond(204, headers=headers)

    def _forward_port(self, ex: Exchange) -> None:
        """``POST /ports/forward {"port": N}``: 200 with the relay (or why none is needed), 404 when
        nothing listens on the guest's loopback port N. ``GET``: the relays alive."""
        if ex.method == "GET":
            ex.body.drain()
            ex.respond_json(200, {"relays": [r.describe() for r in self.ports.relays()]})
            return
        if ex.method != "POST":
            ex.body.drain()
            ex.respond_json(405, {"code": 405, "message": f"method {ex.method} not allowed"},
                            headers={"Allow": "GET, POST"})
            return
        body = self._json_object(ex, MAX_FORWARD_BYTES, "/ports/forward")
        if body is None:
            return
        port = body.get("port")
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            ex.respond_json(400, {"code": 400, "message": 'invalid /ports/forward body: give {"port": N} '
                                                          "with N a TCP port (1-65535)"})
            return
        try:
            result = self.ports.forward(port, ex.local_address())
        except NothingListens as exc:
            ex.respond_json(404, {"code": 404, "message": str(exc)})
            return
        except TooManyRelays as exc:
            ex.respond_json(429, {"code": 429, "message": str(exc)})
            return
        except (NoGuestAddress, OSError) as exc:
            ex.respond_json(503, {"code": 503, "message": f"cannot relay port {port}: {exc}"})
            return
        ex.respond_json(200, result.as_json())

    def _freeze(self, ex: Exchange, path: str) -> None:
        """``POST /freeze``: sync and freeze the writable filesystems (thawed by ``/thaw``, ``/init``
        or after ``thawAfterSeconds``); ``POST /thaw``. 200 with what was done and what failed."""
        if ex.method != "POST":
            ex.body.drain()
            ex.respond_json(405, {"code": 405, "message": f"method {ex.method} not allowed"}, headers={"Allow": "POST"})
            return
        body = self._json_object(ex, MAX_FREEZE_BYTES, path)
        if body is None:
            return
        if path == "/thaw":
            ex.respond_json(200, self.freezer.thaw())
            return
        try:
            seconds = thaw_after(body)
        except ValueError as exc:
            ex.respond_json(400, {"code": 400, "message": f"invalid /freeze body: {exc}"})
            return
        try:
            ex.respond_json(200, self.freezer.freeze(seconds))
        except FreezeUnavailable as exc:
            ex.respond_json(501, {"code": 501, "message": str(exc)})

    @staticmethod
    def _json_object(ex: Exchange, limit: int, route: str) -> dict | None:
        """The request's body as a JSON object (empty: ``{}``); None once a 413/400 was answered."""
        try:
            raw = ex.body.read_all(limit)
        except BodyTooLarge as exc:
            ex.close_after()
            ex.respond_json(413, {"code": 413, "message": str(exc)})
            return None
        try:
            body = json.loads(raw) if raw.strip() else {}
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
        except (ValueError, UnicodeDecodeError) as exc:
            ex.respond_json(400, {"code": 400, "message": f"invalid {route} body: {exc}"})
            return None
        return body

    def shutdown(self) -> None:
        if self.freezer.frozen:
            self.freezer.thaw()
        self.ports.shutdown()
        self.filesystem.shutdown()
        self.processes.shutdown()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = f"trenvx-agent/{__version__}"
    sys_version = ""
    disable_nagle_algorithm = True
    #: Idle keep-alive connections (and stalled transfers) are dropped after this.
    timeout = 900
    server: AgentHTTPServer

    def version_string(self) -> str:
        return self.server_version

    def _handle(self) -> None:
        try:
            ex = Exchange(self)
        except BadRequest as exc:
            self.close_connection = True
            self._plain_error(400, str(exc))
            return
        try:
            self.server.agent.dispatch(ex)
        except (BadRequest, ConnectionError, TimeoutError) as exc:
            log.info("%s %s: connection problem: %s", self.command, ex.path, exc)
            self.close_connection = True
            if not ex.headers_sent and isinstance(exc, BadRequest):
                self._plain_error(400, str(exc))
            return
        except Exception as exc:
            log.exception("%s %s failed", self.command, ex.path)
            self.close_connection = True
            if not ex.headers_sent:
                try:
                    ex.respond_json(500, {"code": "internal", "message": f"internal error: {exc}"})
                except OSError:
                    pass
            return
        if not ex.body.finished and not ex.body.drain():
            self.close_connection = True

    def _plain_error(self, status: int, message: str) -> None:
        data = json.dumps({"code": status, "message": message}).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            pass

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _handle

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def log_error(self, format: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), format % args)


IDLE_WORKERS = 4
"""Connection threads kept waiting for the next connection (started with the agent, so they are
in the template's snapshot). Under TCG a new thread is expensive the first time in each VM: QEMU
translates the guest's clone and CPython's thread start anew in every restored sandbox (~9,000
blocks, ~100 ms); handing a connection to a waiting thread is a lock release."""


class AgentHTTPServer(ThreadingHTTPServer):
    """The listening server: each connection gets a thread of its own, a waiting one when there is
    one (up to IDLE_WORKERS wait between connections), else a new one."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, address: tuple[str, int], agent: Agent, idle_workers: int = IDLE_WORKERS) -> None:
        self.agent = agent
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)
        self.start_workers(idle_workers)

    def start_workers(self, idle_workers: int) -> None:
        """Start the waiting connection threads (a subclass that skips __init__ calls it)."""
        self._handoff: queue.SimpleQueue[tuple[Any, Any] | None] = queue.SimpleQueue()
        self._waiting = 0
        self._max_idle = idle_workers
        self._workers_lock = threading.Lock()
        self._closing = False
        for _ in range(idle_workers):
            with self._workers_lock:
                self._waiting += 1
            threading.Thread(target=self._work, args=(None,), daemon=True, name="agent-conn").start()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._workers_lock:
            if self._waiting > 0:
                self._waiting -= 1
                self._handoff.put((request, client_address))
                return
        threading.Thread(target=self._work, args=((request, client_address),), daemon=True,
                         name="agent-conn").start()

    def _work(self, first: tuple[Any, Any] | None) -> None:
        """Serve ``first`` (or wait for a connection, counted as waiting), then wait for the next
        while fewer than the idle bound wait."""
        item = first if first is not None else self._handoff.get()
        while item is not None:
            self.process_request_thread(*item)
            with self._workers_lock:
                if self._closing or self._waiting >= self._max_idle:
                    return
                self._waiting += 1
            item = self._handoff.get()

    def server_close(self) -> None:
        with self._workers_lock:
            self._closing = True
            waiting, self._waiting = self._waiting, 0
        for _ in range(waiting):
            self._handoff.put(None)
        super().server_close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError, socket.timeout)):
            log.debug("connection from %s dropped: %s", client_address, exc)
            return
        log.exception("unhandled error on connection from %s", client_address)
