"""The cluster in front of one node's API: any node answers for every sandbox of the cluster.

ASGI middleware, outermost (before the sandbox proxy), active only with ``[cluster]``:

- **Creates** (``POST /sandboxes``, ``/v2/sandboxes``) are placed (:mod:`trenvx.cluster.placement`):
  the best of K nodes, tried in order; a node that answers 429/503 (full) or cannot be reached
  hands the create to the next. The chosen node gets the request with ``X-Trenvx-Placed``; a create
  placed here first gets the template's build from another node if this one lacks it.
- **A sandbox's requests** (the API's ``/sandboxes/{id}/...``, the proxy's Host, headers and path
  forms, websockets included) are handled here when the sandbox is this node's, else passed to the
  node that owns it, streamed both ways. A sandbox of a dead node is lost: 404 saying so, and a kill
  marks it ended (its node kills it if it comes back).
- **A resume or connect with ``?node=NAME``** resumes a paused sandbox on that node: held
  elsewhere, it is moved there first (:mod:`trenvx.cluster.sandbox_move`).
- **A snapshot's delete** (``DELETE /templates/{id}``) goes to the node that holds it; creates from
  a snapshot are placed only on such nodes.
- **Lists** read the cluster's entries (in :mod:`.routes_sandboxes`).
- Requests between nodes carry ``X-Trenvx-Node`` (who sends it) and ``X-Trenvx-Cluster`` (the
  cluster's secret); such a request is never passed on again, and the headers are dropped from
  any request that does not prove the secret.
- Without etcd: this node's sandboxes are served as ever; creates and other nodes' sandboxes get a
  503 that says the cluster's store is out of reach.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
from typing import Any

import httpx

from ..cluster.node import ClusterNode, ClusterUnavailable
from ..cluster.placement import NoNodeAvailable, candidates
from ..cluster.records import LOST_REASON, NodeRecord
from ..cluster.sandbox_move import SandboxMoveError, message_of
from ..cluster.template_copy import TemplateCopyError
from ..sandbox.manager import SandboxManager
from ..sandbox.snapshots import InvalidSnapshotRequest, template_name_of
from .auth import is_loopback
from .asgi_replies import header_of as _header
from .asgi_replies import respond_error as _respond
from .port_paths import BadPortPath, port_path
from .proxy import HOP_BY_HOP as PROXY_HOP_BY_HOP
from .proxy import BadTarget, target_of
from .routes_sandboxes import E2B_DEFAULT_TEMPLATE
from .ws_bridge import relay_websocket

log = logging.getLogger(__name__)

NODE_HEADER = b"x-trenvx-node"
SECRET_HEADER = b"x-trenvx-cluster"
PLACED_HEADER = b"x-trenvx-placed"
INTERNAL_HEADERS = {NODE_HEADER, SECRET_HEADER, PLACED_HEADER}
HOP_BY_HOP = PROXY_HOP_BY_HOP | {b"host", b"content-length"}
"""Not passed between nodes: the proxy's hop-by-hop headers, and what the client sets anew."""
WS_DROP = HOP_BY_HOP | {b"sec-websocket-key", b"sec-websocket-version", b"sec-websocket-extensions",
                        b"sec-websocket-protocol"}
CREATE_PATHS = ("/sandboxes", "/v2/sandboxes")
SANDBOX_PATH_RE = re.compile(r"^/(?:v2/)?sandboxes/([A-Za-z0-9][A-Za-z0-9_-]{0,127})(?:/.*)?$")
SNAPSHOT_DELETE_RE = re.compile(r"^/templates/([^/]+)/?$")
NOT_A_SANDBOX = {"metrics"}
"""``/sandboxes/metrics`` is a route, not a sandbox."""
FULL = (429, 503)
"""A placed node's answers that hand a create to the next candidate."""
TIMEOUT = httpx.Timeout(connect=5.0, read=None, write=None, pool=None)


def is_internal(scope: dict[str, Any], secret: str) -> bool:
    """Whether the request comes from another node of the cluster (it proves the secret; without a
    secret: it comes from loopback)."""
    got = _header(scope, SECRET_HEADER)
    if got is None:
        return False
    if secret:
        return hmac.compare_digest(got, secret.encode())
    client = scope.get("client") or ("", 0)
    return is_loopback(str(client[0]))


class ClusterRouter:
    """ASGI middleware (see the module's text)."""

    def __init__(self, app: Any, node: ClusterNode, manager: SandboxManager, domain: str) -> None:
        self.app = app
        self.node = node
        self.manager = manager
        self.domain = domain
        self._client: httpx.AsyncClient | None = None

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=TIMEOUT, follow_redirects=False,
                                             limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        internal = is_internal(scope, self.node.secret)
        if not internal:
            # nobody but a node may claim to be one
            scope["headers"] = [(k, v) for k, v in scope["headers"] if k not in INTERNAL_HEADERS]
        scope.setdefault("state", {})["cluster_internal"] = internal
        sid = self._sandbox_of(scope)
        if sid is None and not internal and scope["type"] == "http":
            holder = await self._snapshot_holder(scope)
            if holder is not None:
                await self._forward(scope, receive, send, holder)
                return
        if sid is None:
            if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].rstrip("/") in CREATE_PATHS:
                if internal and _header(scope, PLACED_HEADER) is not None:
                    return await self._create_here(scope, receive, send)
                if not internal:
                    return await self._place(scope, receive, send)
            return await self.app(scope, receive, send)
        wanted = None if internal else _resume_on(scope)
        if wanted is not None:
            return await self._resume_on(scope, receive, send, sid, wanted)
        if internal or self._is_local(sid):
            return await self._here(scope, receive, send)
        try:
            loc = await self.node.locate(sid)
        except ClusterUnavailable as e:
            return await _refuse(scope, receive, send, 503, f"sandbox {sid} is not on this node, and {e}; "
                                 "ask the node that runs it, or try again when etcd answers")
        if loc is None or loc.entry.node == self.node.name:
            return await self._here(scope, receive, send)  # unknown to the cluster: the local 404
        if loc.node is None or loc.entry.state == "exited":
            return await self._ended(scope, receive, send, sid, loc.entry)
        if await self._forward(scope, receive, send, loc.node, retry=True):
            return
        # the owner did not answer: read again where the sandbox is (its node may be gone)
        self.node.forget(sid)
        with contextlib.suppress(ClusterUnavailable):
            await self.node.live_nodes(max_age_s=0)
            loc = await self.node.locate(sid)
            if loc is not None and (loc.node is None or loc.entry.state == "exited"):
                return await self._ended(scope, receive, send, sid, loc.entry)
            if loc is not None and loc.node is not None:
                await self._forward(scope, receive, send, loc.node)
                return
        await _respond(send, 502, f"node {loc.entry.node if loc else '?'}, which runs sandbox {sid}, did not "
                       "answer; it may be stopping (try again in a few seconds)")

    # -- which sandbox ----------------------------------------------------------------------------

    def _sandbox_of(self, scope: dict[str, Any]) -> str | None:
        try:
            target = target_of(scope, self.domain)
            if target is not None:
                return target[0]
            via = port_path(scope)
            if via is not None:
                return via.sandbox_id
        except (BadTarget, BadPortPath):
            return None  # the proxy answers it
        m = SANDBOX_PATH_RE.match(scope["path"])
        if m and m.group(1) not in NOT_A_SANDBOX:
            return m.group(1)
        return None

    async def _snapshot_holder(self, scope: dict[str, Any]) -> NodeRecord | None:
        """The node that holds the snapshot a ``DELETE /templates/{id}`` names, when not this one."""
        m = SNAPSHOT_DELETE_RE.match(scope["path"])
        if scope["method"] != "DELETE" or m is None:
            return None
        try:
            name = template_name_of(m.group(1))
        except InvalidSnapshotRequest:
            return None
        if name in self.manager.templates.names():
            return None
        try:
            nodes = await self.node.live_nodes()
        except ClusterUnavailable:
            return None  # the local answer (404) stands
        return next((n for n in nodes.values() if name in n.snapshots and n.name != self.node.name), None)

    def _is_local(self, sid: str) -> bool:
        try:
            self.manager.get(sid)
            return True
        except KeyError:
            return False

    # -- here -------------------------------------------------------------------------------------

    async def _here(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Handled by this node; an API call that may have changed a sandbox writes its entry before
        the answer leaves (a list through another node right after it sees the change)."""
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD") or target_of_safe(scope, self.domain):
            return await self.app(scope, receive, send)

        touched = self._sandbox_of(scope) or ""

        async def send_after_sync(msg: dict[str, Any]) -> None:
            if msg["type"] == "http.response.start":
                await self.node.sync_soon(touched)
            await send(msg)

        await self.app(scope, receive, send_after_sync)

    async def _create_here(self, scope: dict[str, Any], receive: Any, send: Any, body: bytes | None = None) -> None:
        if body is None:
            body = await _read_body(receive)
        template = self._template_of(body)
        if template is not None:
            try:
                await self.node.ensure_template(template)
            except TemplateCopyError as e:
                return await _respond(send, 404 if e.missing else 500, str(e))
            except ClusterUnavailable as e:
                return await _respond(send, 503, str(e))
        await self._here(scope, _replay(body), send)

    def _template_of(self, body: bytes) -> str | None:
        try:
            data = json.loads(body or b"{}")
        except ValueError:
            return None  # the route answers 422
        name = data.get("templateID") if isinstance(data, dict) else None
        if not isinstance(name, str) or not name:
            return self.manager.config.default_template
        try:
            name = template_name_of(name)
        except InvalidSnapshotRequest:
            return None
        local = self.manager.templates.names()
        if name == E2B_DEFAULT_TEMPLATE and name not in local and name not in self.node.template_named_set():
            return self.manager.config.default_template  # as the create route reads E2B's default
        name = self.manager.template_name(name)
        return name if name in local else self.node.template_named(name)

    # -- placement --------------------------------------------------------------------------------

    async def _place(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = await _read_body(receive)
        template = self._template_of(body)
        if template is None:  # not JSON or a bad id: the route says what is wrong
            return await self.app(scope, _replay(body), send)
        try:
            await self.node.check_store()
            nodes = await self.node.live_nodes()
            mem_mb = self._mem_mb(template)
            ranked = candidates(list(nodes.values()), template, mem_mb, self.node.cfg.candidates)
        except ClusterUnavailable as e:
            return await _respond(send, 503, f"cannot place a sandbox: {e}; running sandboxes go on, try the create "
                                  "again when etcd answers")
        except NoNodeAvailable as e:
            return await _respond(send, 503, f"cannot place a sandbox: {e}")
        last: tuple[int, list[tuple[bytes, bytes]], bytes] | None = None
        for i, target in enumerate(ranked):
            final = i == len(ranked) - 1
            if target.name == self.node.name:
                answer = await _capture(lambda s: self._create_here(scope, receive, s, body))
            else:
                answer = await self._create_on(scope, body, target)
            if answer is None:
                continue  # unreachable: the next one
            last = answer
            if answer[0] == 201:
                self.node.note_placed(target.name, mem_mb)
            if answer[0] not in FULL or final:
                break
            log.info("cluster: node %s refused a sandbox of %s (%d); trying the next candidate", target.name,
                     template, answer[0])
        if last is None:
            names = ", ".join(n.name for n in ranked)
            return await _respond(send, 503, f"cannot place a sandbox: no candidate node answered ({names})")
        status, headers, content = last
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": content})

    def _mem_mb(self, template: str) -> int:
        with contextlib.suppress(Exception):
            return self.manager.templates.current(template).machine.mem_mb
        tpl = self.manager.config.template.get(template)
        return tpl.mem_mb if tpl is not None else 0

    async def _create_on(self, scope: dict[str, Any], body: bytes, node: NodeRecord
                         ) -> tuple[int, list[tuple[bytes, bytes]], bytes] | None:
        headers = self._outgoing_headers(scope) + [(PLACED_HEADER, b"1")]
        url = node.url + scope.get("root_path", "") + scope["path"]
        try:
            r = await self.client.request("POST", url, headers=headers, content=body,
                                          params=scope.get("query_string", b"").decode("latin-1") or None)
        except httpx.HTTPError as e:
            log.warning("cluster: node %s (%s) did not take a create: %r", node.name, node.url, e)
            return None
        out = [(k.lower(), v) for k, v in r.headers.raw if k.lower() not in HOP_BY_HOP]
        out.append((b"content-length", str(len(r.content)).encode()))
        return r.status_code, out, r.content

    # -- elsewhere --------------------------------------------------------------------------------

    def _outgoing_headers(self, scope: dict[str, Any], drop: set[bytes] = HOP_BY_HOP) -> list[tuple[bytes, bytes]]:
        headers = [(k, v) for k, v in scope["headers"] if k not in drop and k not in INTERNAL_HEADERS]
        host = _header(scope, b"host")
        if host is not None:
            headers.append((b"host", host))  # the proxy's Host form routes by it
        headers.append((NODE_HEADER, self.node.name.encode()))
        headers.append((SECRET_HEADER, self.node.secret.encode()))
        return headers

    async def _forward(self, scope: dict[str, Any], receive: Any, send: Any, node: NodeRecord,
                       retry: bool = False) -> bool:
        """Pass the request to ``node`` and its answer back. With ``retry``, a node that cannot be
        connected to is not answered for: False (nothing was sent; the caller decides), only for
        requests without a body (a body being read cannot be sent twice)."""
        if scope["type"] == "websocket":
            await self._forward_websocket(scope, receive, send, node)
            return True
        url = httpx.URL(node.url, raw_path=(scope.get("raw_path") or scope["path"].encode()) +
                        (b"?" + scope["query_string"] if scope.get("query_string") else b""))
        has_body = any(k in (b"content-length", b"transfer-encoding") for k, _ in scope["headers"])

        async def body() -> Any:
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    return
                yield msg.get("body", b"")
                if not msg.get("more_body", False):
                    return

        request = self.client.build_request(scope["method"], url, headers=self._outgoing_headers(scope),
                                            content=body() if has_body else None)
        try:
            upstream = await self.client.send(request, stream=True)
        except httpx.HTTPError as e:
            self.node.forget(_sandbox_id_for_log(scope))
            if retry and not has_body and isinstance(e, httpx.ConnectError):
                return False
            await _respond(send, 502, f"node {node.name} ({node.url}), which runs this sandbox, did not "
                           f"answer: {type(e).__name__}; it may be stopping (try again in a few seconds)")
            return True
        try:
            headers = [(k.lower(), v) for k, v in upstream.headers.raw if k.lower() not in HOP_BY_HOP - {b"content-length"}]
            await send({"type": "http.response.start", "status": upstream.status_code, "headers": headers})
            async for chunk in upstream.aiter_raw():
                if chunk:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except httpx.HTTPError as e:
            log.info("cluster: a stream from node %s was cut: %r", node.name, e)  # the client sees a cut body
        finally:
            await upstream.aclose()
        return True

    async def _forward_websocket(self, scope: dict[str, Any], receive: Any, send: Any, node: NodeRecord) -> None:
        from websockets.asyncio.client import connect
        from websockets.exceptions import InvalidHandshake

        first = await receive()
        if first["type"] != "websocket.connect":
            return
        path = scope.get("raw_path") or scope["path"].encode()
        query = b"?" + scope["query_string"] if scope.get("query_string") else b""
        uri = "ws" + node.url.removeprefix("http") + (path + query).decode("latin-1")
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in self._outgoing_headers(scope, WS_DROP)
                   if k != b"host"]
        try:
            # The websocket client sets Host to the node's address: a sandbox port named by the Host
            # form travels in E2B's headers form instead, which the owner's proxy reads first.
            target = target_of(scope, self.domain)
        except BadTarget:
            target = None
        if target is not None and _header(scope, b"e2b-sandbox-id") is None:
            headers += [("e2b-sandbox-id", target[0]), ("e2b-sandbox-port", str(target[1]))]
        try:
            upstream = await connect(uri, additional_headers=headers, subprotocols=scope.get("subprotocols") or None,
                                     open_timeout=10, max_size=None, ping_interval=None, compression=None)
        except (OSError, InvalidHandshake, asyncio.TimeoutError) as e:
            await send({"type": "websocket.close", "code": 1011, "reason": f"node {node.name}: {e}"[:120]})
            return
        await send({"type": "websocket.accept", "subprotocol": upstream.subprotocol})
        await relay_websocket(receive, send, upstream)

    async def _resume_on(self, scope: dict[str, Any], receive: Any, send: Any, sid: str, wanted: str) -> None:
        """A resume (or connect) that names the node to resume on: a paused sandbox held elsewhere
        moves there first (its files copied, checked, taken over), then the request goes there."""
        try:
            nodes = await self.node.live_nodes(max_age_s=0)
            loc = None if self._is_local(sid) else await self.node.locate(sid)
        except ClusterUnavailable as e:
            return await _respond(send, 503, f"cannot move sandbox {sid}: {e}")
        target = nodes.get(wanted)
        if target is None:
            return await _respond(send, 400, f"query field node: no live node is named {wanted!r} "
                                  f"(alive: {', '.join(sorted(nodes)) or 'none'})")
        owner = self.node.name if loc is None else loc.entry.node
        if loc is not None and (loc.node is None or loc.entry.state == "exited"):
            return await self._ended(scope, receive, send, sid, loc.entry)
        if owner != wanted:
            if wanted == self.node.name:
                try:
                    await self.node.pull(sid, owner)
                except SandboxMoveError as e:
                    return await _respond(send, 409, f"sandbox {sid} cannot resume on node {wanted}: {e}")
            else:
                try:
                    r = await self.client.post(f"{target.url}/cluster/sandboxes/{sid}/pull", params={"source": owner},
                                               headers=self.node.internal_headers(), timeout=httpx.Timeout(600, connect=5))
                except httpx.HTTPError as e:
                    return await _respond(send, 502, f"node {wanted} did not answer: {type(e).__name__}")
                if r.status_code != 200:
                    return await _respond(send, r.status_code if r.status_code < 500 else 502,
                                          f"sandbox {sid} cannot resume on node {wanted}: {message_of(r)}")
            self.node.forget(sid)
        if wanted == self.node.name:
            return await self._here(scope, receive, send)
        await self._forward(scope, receive, send, target)

    async def _ended(self, scope: dict[str, Any], receive: Any, send: Any, sid: str, entry: Any) -> None:
        """A sandbox of a dead node, or one that ended: a kill of a lost one marks it ended; anything
        else is told what happened."""
        lost = entry.end_reason == LOST_REASON and not entry.ended_by_cluster
        if (scope["type"] == "http" and scope["method"] == "DELETE"
                and SANDBOX_PATH_RE.fullmatch(scope["path"].rstrip("/")) and lost):
            try:
                await self.node.end_elsewhere(entry, "killed")
            except ClusterUnavailable as e:
                return await _respond(send, 503, str(e))
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        if lost:
            message = (f"sandbox {sid} was lost: node {entry.node}, which ran it, stopped renewing its lease "
                       f"(dead, or cut off from the cluster); create a new sandbox")
        else:
            message = f"sandbox {sid} is not running (it ended: {entry.end_reason or 'exited'})"
        await _refuse(scope, receive, send, 404, message)


RESUME_RE = re.compile(r"^/(?:v2/)?sandboxes/[^/]+/(?:resume|connect)/?$")


def _resume_on(scope: dict[str, Any]) -> str | None:
    """The node a resume or connect asks to run on (query ``node``), or None."""
    if scope["type"] != "http" or scope["method"] != "POST" or not RESUME_RE.match(scope["path"]):
        return None
    from urllib.parse import parse_qs

    values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("node")
    return values[0] if values else None


def target_of_safe(scope: dict[str, Any], domain: str) -> bool:
    """Whether the request is for a sandbox's port (proxied traffic, never an API call)."""
    try:
        return target_of(scope, domain) is not None or port_path(scope) is not None
    except (BadTarget, BadPortPath):
        return True


def _sandbox_id_for_log(scope: dict[str, Any]) -> str:
    m = SANDBOX_PATH_RE.match(scope.get("path", ""))
    return m.group(1) if m else ""


async def _read_body(receive: Any) -> bytes:
    chunks = []
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            break
        chunks.append(msg.get("body", b""))
        if not msg.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes) -> Any:
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # nothing more: the client is connected until the answer
        return {"type": "http.disconnect"}

    return receive


async def _capture(run: Any) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Run an ASGI call with a ``send`` that keeps the answer (a create's: small JSON)."""
    status = 500
    headers: list[tuple[bytes, bytes]] = []
    chunks: list[bytes] = []

    async def send(msg: dict[str, Any]) -> None:
        nonlocal status, headers
        if msg["type"] == "http.response.start":
            status, headers = msg["status"], list(msg.get("headers", []))
        elif msg["type"] == "http.response.body":
            chunks.append(msg.get("body", b""))

    await run(send)
    return status, headers, b"".join(chunks)


async def _refuse(scope: dict[str, Any], receive: Any, send: Any, status: int, message: str) -> None:
    if scope["type"] == "http":
        return await _respond(send, status, message)
    first = await receive()
    if first["type"] == "websocket.connect":
        await send({"type": "websocket.close", "code": 1008 if status == 404 else 1013, "reason": message[:120]})
