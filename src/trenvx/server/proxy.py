"""The proxy to ports inside sandboxes: how clients reach each sandbox's agent and web servers.

A request is for a sandbox in one of three forms; everything else goes to the API:

- **headers** ``E2b-Sandbox-Id`` and ``E2b-Sandbox-Port`` (what E2B's SDKs send to
  ``E2B_SANDBOX_URL``);
- **host** ``PORT-SANDBOXID.<domain>`` (what ``sandbox.get_host(port)`` gives; needs ``*.<domain>``
  to resolve to the backend: wildcard DNS, or ``*.localhost`` on the backend's own machine);
- **path** ``/sandboxes/SANDBOXID/ports/PORT/<rest>`` on the backend's own address, for where no
  wildcard DNS exists: ``/<rest>`` is asked of the port, the prefix without its trailing slash is
  redirected to it (307), and the answer's redirects and cookie paths are kept under the prefix
  (:mod:`.port_paths`).

Every form's request gets ``X-Forwarded-For``, ``X-Forwarded-Proto`` and ``X-Forwarded-Host`` (the
Host the client used, which a web IDE checks a websocket's Origin against), the path form also
``X-Forwarded-Prefix``. The proxy streams both ways without buffering: request bodies (uploads,
Connect client streams) and response bodies (downloads, Connect server streams, long polls) are
forwarded chunk by chunk, and websockets are relayed message by message. When the client goes away
the upstream connection is closed, so a command stream nobody reads is not kept open.

Where a port is reached comes from :meth:`SandboxManager.port_endpoint`: on QEMU, a TCP port
on 127.0.0.1 (the agent's port 49983 is forwarded when the sandbox starts, another port on first
use); on Firecracker and Cloud Hypervisor, the agent's port through the VM's hybrid vsock socket
(other ports are not reachable there until tap networking exists). HTTP goes through the clients
of :mod:`.upstreams`; a websocket opens its own connection (a TCP connect, or
:func:`~trenvx.guest.vsock.vsock_socket` for vsock).

Servers bound to the guest's loopback (``--bind 127.0.0.1``): the host's connections arrive on the
guest's own address, where such a server does not listen. When a connection to a port other than
the agent's fails before any answer (refused; or, behind QEMU's user networking, accepted by QEMU
and closed), the proxy asks the sandbox's agent to relay that port
(:meth:`~trenvx.guest.client.AgentClient.forward_port`, made once and kept by the agent, see
:mod:`trenvx.guest.agent.ports`) and connects once more. The request body read by the first try
is kept (up to :data:`REPLAY_LIMIT`) and sent again; a larger one is not retried. Nothing polls:
the guest hears of it only when someone connects.

Private sandboxes (created with ``network.allowPublicTraffic: false``): every port but the agent's
answers only requests that hold the sandbox's traffic access token, else 403 with E2B's messages
(header missing / token invalid). Programs send it in the ``e2b-traffic-access-token`` header. A
browser opens a link that carries it as ``?trenvx_token=TOKEN`` (host or path form): a GET so
authorised is answered 303 with the same URL without the parameter and an HttpOnly, SameSite=Lax
cookie ``trenvx_traffic`` (Secure over HTTPS) scoped to that port's host, or in the path form to
its prefix, whose value is an HMAC of the sandbox id and port keyed by the token; the browser's
later requests and websockets pass by that cookie. See :mod:`.traffic_auth`. The header, the
parameter and the cookie are never passed into the sandbox; the parameter is taken out of the
request's scope before anything else sees it, so the server's access log records the URL without it.

Paused sandboxes: one created with auto-resume (E2B's ``lifecycle.auto_resume``) is resumed by the
request that reaches it (:meth:`SandboxManager.wake`: concurrent requests share one resume), which
is then answered; the request waits at most ``orchestrator.auto_resume_wait_s`` (then 503 with
Retry-After, the resume goes on). A request to the agent's port wakes it only when it carries the
sandbox's access token (``X-Access-Token``, as E2B's SDKs send it) or a signed file URL: nobody
without the sandbox's secrets resumes it through the agent's port (its other ports are as public
as the sandbox made them: a private sandbox's need its traffic token first). Without auto-resume a
paused sandbox answers 502, as in E2B.

Errors follow E2B's proxy, whose messages E2B's SDKs recognise: 502 ``The sandbox ... was not
found`` (killed, timed out or never existed) and 502 ``... port is not open``.

A stream whose sandbox goes away (killed, timed out, its VM died) is ended by the proxy, which
looks every :data:`GONE_POLL_S` (a VM behind a tap device does not close its connections, they go
quiet), and so is a stream whose upstream connection breaks. Neither may look like a normal end,
or E2B's SDKs would return a command's result instead of raising: a Connect stream cut between two
envelopes gets an end-of-stream error ``unavailable`` with ``The sandbox ... was not found`` (or
``... ended before the stream completed`` while the sandbox still runs), which E2B's SDK raises as
``SandboxNotRunningException``; any other response is aborted (the connection is closed before
the body's end), and a websocket is closed with code 1011.

A connection kept alive to a sandbox's server can be closed by that server just as a request goes
down it: Node (code-server, next.js) drops connections idle for 5 s, and under software emulation
its timers fire late, while a request is already on the way, which then meets a reset. So an
idempotent request (RFC 9110 9.2.2: GET, HEAD, OPTIONS, TRACE, PUT, DELETE) whose kept connection
breaks before any answer is sent once more, on a new connection, as browsers do; others get the 502
(and so does any request to the agent's own port, whose reads may consume, e.g. of a FIFO).
Measured before this: a web IDE's terminal script (xterm.js) failed with a 502 in about 1 of 4
page loads and the terminal never opened.

Single machine, no wildcard DNS, no TLS: :func:`announced_domain` gives E2B's SDKs the domain
``localhost:<port>`` (the port the API was reached on), so ``get_host(8000)`` is
``8000-<id>.localhost:<port>``, which curl and browsers resolve to loopback; any HTTP client can
send that Host (or the ``E2b-Sandbox-*`` headers) to the server's own address instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpcore
import httpx

from ..config import AGENT_PORT
from ..guest.endpoint import AgentEndpoint, HybridVsockEndpoint
from ..sandbox.manager import PortUnavailable, SandboxConflict, SandboxManager, SandboxNotFound
from . import traffic_auth
from .errors import error_body
from .port_paths import BadPortPath, PortPath, port_path, prefixed_location, prefixed_set_cookie
from .signed_files import SignedUrlRefused, signed_files_target
from .traffic_auth import TRAFFIC_TOKEN_HEADER, take_token_param, without_cookie
from .asgi_replies import header_of as _header
from .asgi_replies import respond_error as _respond
from .ws_bridge import cancel_and_wait, relay_websocket
from .upstreams import UpstreamClients

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

SANDBOX_ID_HEADER = b"e2b-sandbox-id"
SANDBOX_PORT_HEADER = b"e2b-sandbox-port"
ACCESS_TOKEN_HEADER = b"x-access-token"
"""The header carrying a sandbox's access token to its agent (E2B's envd)."""
CONNECT_STREAM_TYPE = "application/connect+"
END_STREAM_FLAG = 0x02
HOST_RE = re.compile(r"^(\d{1,5})-([a-z0-9][a-z0-9-]{0,63})\.(.+)$")
SANDBOX_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
"""What a sandbox id looks like (the host and path forms allow no other): anything else in the
``E2b-Sandbox-Id`` header is refused before it is looked up or echoed."""

HOP_BY_HOP = {
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te", b"trailer",
    b"trailers", b"transfer-encoding", b"upgrade", b"proxy-connection",
}
FORWARDED_SET = {b"x-forwarded-for", b"x-forwarded-host", b"x-forwarded-proto", b"x-forwarded-prefix",
                 b"forwarded"}
"""Headers the proxy sets itself (a client's own are dropped, so that a sandbox's server that trusts
its proxy is not told a client address or host the client made up): where the client reached it."""
REQUEST_DROP = HOP_BY_HOP | FORWARDED_SET | {SANDBOX_ID_HEADER, SANDBOX_PORT_HEADER, TRAFFIC_TOKEN_HEADER}
WS_REQUEST_DROP = REQUEST_DROP | {b"host", b"sec-websocket-key", b"sec-websocket-version",
                                  b"sec-websocket-extensions", b"sec-websocket-protocol", b"content-length"}

MAX_HEADER_COUNT = 96
"""Most headers a request passed into a sandbox may have (the agent, like Python's http.server, takes 100)."""
MAX_HEADER_BYTES = 64 << 10
"""Most bytes of headers a request passed into a sandbox may have."""
GONE_POLL_S = 0.5
"""How often a proxied stream looks whether its sandbox still runs."""
CUT_GRACE_S = 1.0
"""How long a stream whose upstream broke waits to learn whether its sandbox ended."""
REPLAY_LIMIT = 1 << 20
"""Request bodies up to this size are kept while sent, so that a try after a port relay, or a resend
after a kept connection broke, can send them again."""
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
"""Methods sent once more when a kept connection breaks before the answer (RFC 9110 9.2.2)."""
FORWARD_TIMEOUT_S = 10.0
"""How long the agent may take to answer a port relay request."""


class BadTarget(Exception):
    pass


def _strip_port(host: str) -> str:
    if host.startswith("["):
        return host.split("]", 1)[0] + "]"
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def target_of(scope: Scope, domain: str) -> tuple[str, int] | None:
    """(sandbox id, port) this request is for, None if it is for the API; :class:`BadTarget` if malformed."""
    sid = port = host = None
    for name, value in scope.get("headers", ()):
        if name == SANDBOX_ID_HEADER:
            sid = value.decode("latin-1").strip()
        elif name == SANDBOX_PORT_HEADER:
            port = value.decode("latin-1").strip()
        elif name == b"host":
            host = value.decode("latin-1").strip().lower()
    if sid is not None or port is not None:
        if not sid or not port:
            raise BadTarget("send both E2b-Sandbox-Id and E2b-Sandbox-Port headers to reach a sandbox")
        if not SANDBOX_ID_RE.match(sid):
            raise BadTarget(f"header E2b-Sandbox-Id: {sid[:70]!r} is not a sandbox id (lowercase letters, "
                            "digits and '-')")
        if not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
            raise BadTarget(f"header E2b-Sandbox-Port: {port[:20]!r} is not a port number (1-65535)")
        return sid, int(port)
    if host:
        m = HOST_RE.match(host)
        if m and _strip_port(m.group(3)) == _strip_port(domain.lower()):
            p = int(m.group(1))
            if not 1 <= p <= 65535:
                raise BadTarget(f"Host: {p} is not a port number (1-65535)")
            return m.group(2), p
    return None


def announced_domain(configured: str, request_host: str | None) -> str:
    """The sandbox domain to give a client (``domain`` of create and connect answers).

    E2B's SDKs build ``get_host(port)`` as ``{port}-{sandboxID}.{domain}``. A loopback domain
    (``localhost``, the default, or ``*.localhost``) without a port gets the port the client
    reached the API on (from its Host header), because the proxy answers on that same port:
    ``8000-ID.localhost:3000`` then reaches port 8000 of the sandbox over plain HTTP wherever
    ``*.localhost`` resolves to loopback (browsers, curl, systemd's nss-myhostname), with no
    wildcard DNS. Any other domain, or one that names its port, is given as configured.
    """
    domain = configured.strip()
    name = domain.lower().rstrip(".")
    if not (name == "localhost" or name.endswith(".localhost")):
        return domain
    port = _port_of(request_host or "")
    return f"{domain}:{port}" if port else domain


def _port_of(host: str) -> int | None:
    """The explicit port of a Host header value (``127.0.0.1:3000``, ``[::1]:3000``), None without one."""
    tail = host.rsplit("]", 1)[-1] if host.startswith("[") else host
    if tail.count(":") != 1:
        return None
    text = tail.rsplit(":", 1)[1].strip()
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= 65535:
        return None
    return int(text)


class SandboxProxy:
    """ASGI middleware: requests for a sandbox are proxied, the rest go to ``app``."""

    def __init__(self, app: Any, manager: SandboxManager | None = None, domain: str = "localhost",
                 manager_getter: Callable[[], SandboxManager] | None = None) -> None:
        self.app = app
        self._manager = manager
        self._manager_getter = manager_getter
        self.domain = domain
        self.upstreams = UpstreamClients(self._vmm_of)

    @property
    def manager(self) -> SandboxManager:
        if self._manager is not None:
            return self._manager
        assert self._manager_getter is not None
        return self._manager_getter()

    def _vmm_of(self, sandbox_id: str) -> tuple[int, int] | None:
        """What identifies the VMM process that runs the sandbox now (its pid, and its restore: a
        resumed sandbox's new process could get the old pid back); None when it does not run."""
        try:
            sb = self.manager.get(sandbox_id)
        except SandboxNotFound:
            return None
        if sb.paused:
            return None
        return (int(getattr(sb.restored.vm, "pid", 0) or 0), id(sb.restored))  # stand-in VMs have no pid

    async def aclose(self) -> None:
        await self.upstreams.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        via_path: PortPath | None = None
        try:
            target = target_of(scope, self.domain)
            if target is None:
                via_path = port_path(scope)
                target = (via_path.sandbox_id, via_path.port) if via_path is not None else None
        except (BadTarget, BadPortPath) as e:
            if scope["type"] == "http":
                return await _respond(send, 400, str(e))
            return await _ws_refuse(scope, receive, send, 400, str(e))
        signed = False
        if target is None and scope["type"] == "http":
            # A signed /files URL names its sandbox only by the token that signed it (signed_files).
            try:
                sid = signed_files_target(scope["method"], scope["path"], scope.get("query_string", b""),
                                          lambda: [(sb.id, sb.access_token) for sb in self.manager.list()])
            except SignedUrlRefused as e:
                return await _respond(send, e.status, e.message)
            target = (sid, AGENT_PORT) if sid is not None else None
            signed = target is not None
        if target is None:
            return await self.app(scope, receive, send)
        sid, port = target
        oversize = _oversize_headers(scope)
        if oversize is not None:
            return await self._refuse(scope, receive, send, 431, oversize, sandboxId=sid)
        # The URL's traffic token is the proxy's alone: out of the query before the sandbox, or the
        # server's access log (which reads this scope), can see it.
        query, param = take_token_param(scope.get("query_string", b""))
        if param is not None:
            scope["query_string"] = query
        if port != AGENT_PORT:
            verdict = self._traffic_verdict(scope, sid, port, param)
            if verdict.refusal is not None:
                return await self._refuse(scope, receive, send, 403, verdict.refusal, sandboxId=sid)
            if verdict.by_param and scope["type"] == "http" and scope["method"] in ("GET", "HEAD") \
                    and not _has_routing_headers(scope):
                # A browser opened a link with the token: the token leaves the URL, a cookie stays.
                return await self._token_redirect(scope, send, sid, port, via_path, param)
        if via_path is not None and not via_path.rest and scope["type"] == "http":
            # The page's relative URLs must resolve under the prefix: it ends with a slash.
            return await _redirect(send, 307, _location(scope, via_path))
        forward = _Forward(_upstream_path(scope, via_path), via_path.prefix if via_path is not None else None)
        woken = False
        while True:
            try:
                endpoint = await self.manager.port_endpoint(sid, port)
                break
            except SandboxNotFound as e:
                msg = f"The sandbox {sid} was not found" + (f": {e.reason}" if e.reason else "")
                return await self._refuse(scope, receive, send, 502, msg, sandboxId=sid)
            except SandboxConflict as e:
                # A paused sandbox (the only conflict here): resumed if it was created with
                # auto-resume, else E2B's proxy's 502, which E2B's SDKs read as "not running"
                # (is_running() -> False) rather than as an error.
                if not woken and self._may_wake(scope, sid, port, signed):
                    refusal = await self._wake(sid)
                    if refusal is None:
                        woken = True
                        continue
                    status, message, headers = refusal
                    return await self._refuse(scope, receive, send, status, message, headers=headers, sandboxId=sid)
                return await self._refuse(scope, receive, send, 502, f"The sandbox {sid} is paused: {e}", sandboxId=sid)
            except PortUnavailable as e:
                return await self._refuse(scope, receive, send, 502, f"The sandbox {sid} is running but port is not "
                                          f"open (port {port}: {e})", sandboxId=sid)
        if scope["type"] == "http":
            await self._http(scope, receive, send, sid, port, endpoint, forward)
        else:
            await self._websocket(scope, receive, send, sid, port, endpoint, forward)

    async def _token_redirect(self, scope: Scope, send: Send, sid: str, port: int, via_path: PortPath | None,
                              token: str) -> None:
        """303 to the same URL without the token, with the cookie that stands for it from now on
        (scoped to the port's host, or in the path form to its prefix)."""
        cookie = traffic_auth.set_cookie(sid, port, token, path=via_path.prefix if via_path is not None else "/",
                                         secure=scope.get("scheme") in ("https", "wss"))
        await _redirect(send, 303, _location(scope, via_path), [(b"set-cookie", cookie)])

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, status: int, message: str,
                      headers: dict[str, str] | None = None, **extra: Any) -> None:
        if scope["type"] == "http":
            await _respond(send, status, message, headers=headers, **extra)
        else:
            await _ws_refuse(scope, receive, send, status, message, **extra)

    def _may_wake(self, scope: Scope, sid: str, port: int, signed: bool) -> bool:
        """Whether this request resumes the paused sandbox ``sid``: it was created with auto-resume,
        and a request to its agent's port carries its access token (or came by a signed file URL)."""
        try:
            sb = self.manager.get(sid)
        except SandboxNotFound:
            return False
        if not sb.paused or not sb.lifecycle.auto_resume:
            return False
        if port != AGENT_PORT or signed:
            return True
        presented = next((v for k, v in scope.get("headers", ()) if k == ACCESS_TOKEN_HEADER), None)
        token = str(sb.access_token or "").encode()
        return presented is not None and bool(token) and hmac.compare_digest(presented.strip(), token)

    async def _wake(self, sid: str) -> tuple[int, str, dict[str, str]] | None:
        """Auto-resume ``sid`` within ``auto_resume_wait_s``: None once it runs, else the refusal to answer."""
        wait_s = self.manager.config.orchestrator.auto_resume_wait_s
        try:
            await asyncio.wait_for(self.manager.wake(sid), wait_s)
        except asyncio.TimeoutError:
            return 503, (f"The sandbox {sid} is resuming (auto-resume) and did not run within {wait_s:g} s; "
                         "try again"), {"Retry-After": "5"}
        except SandboxNotFound as e:
            return 502, self._not_found_message(sid, e.reason), {}
        except SandboxConflict as e:
            return 502, f"The sandbox {sid} is paused: {e}", {}
        except Exception as e:  # noqa: BLE001 - the resume's failure, said to the client; it stays paused
            log.warning("sandbox %s: its auto-resume failed: %r", sid, e)
            return 502, f"The sandbox {sid} is paused and its auto-resume failed: {type(e).__name__}: {e}", {}
        return None

    def _traffic_verdict(self, scope: Scope, sid: str, port: int, param: str | None) -> traffic_auth.Verdict:
        """Whether a request to ``port`` of ``sid`` may pass: always for a public sandbox; for a
        private one, with its traffic token in the header, the URL (``param``) or the cookie
        (:mod:`.traffic_auth`); refused with E2B's words otherwise.

        An unknown sandbox passes here: :meth:`SandboxManager.port_endpoint` then says it was not found.
        """
        try:
            sb = self.manager.get(sid)
        except SandboxNotFound:
            return traffic_auth.Verdict(None)
        if getattr(sb, "allow_public_traffic", True):
            return traffic_auth.Verdict(None)
        token = str(getattr(sb, "traffic_access_token", "") or "")
        return traffic_auth.check(scope.get("headers", ()), param, sid, port, token)

    async def _forward_port(self, sid: str, port: int) -> bool:
        """Ask the sandbox's agent to relay ``port`` from its loopback; True when trying again is worth it."""
        try:
            agent = self.manager.get(sid).agent
        except SandboxNotFound:
            return False
        try:
            forwarded = await agent.forward_port(port, timeout=FORWARD_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - the caller reports the port as not open
            log.info("sandbox %s: relaying port %d failed: %r", sid, port, e)
            return False
        if forwarded:
            log.debug("sandbox %s: port %d relayed from the guest's loopback; connecting again", sid, port)
        return forwarded

    # -- HTTP ------------------------------------------------------------------------------

    async def _http(self, scope: Scope, receive: Receive, send: Send, sid: str, port: int, endpoint: AgentEndpoint,
                    forward: "_Forward") -> None:
        headers = _forwarded_headers(scope, REQUEST_DROP, forward.prefix)
        has_body = any(
            (k == b"content-length" and v.strip() not in (b"", b"0")) or (k == b"transfer-encoding")
            for k, v in scope["headers"]
        )
        # The agent's own port is never retried: its uploads are not kept.
        body = _ReplayableBody(receive, REPLAY_LIMIT if port != AGENT_PORT else 0)
        if not has_body:
            body.done.set()
        url = httpx.URL(endpoint.base_url, raw_path=forward.path)
        retried = False  # once, after the agent relays a port that listens on the guest's loopback
        resent = False  # once, after a kept-alive connection broke under an idempotent request
        while True:
            # Asked again on a retry: the VM may have ended (and its client closed) meanwhile.
            client = self.upstreams.client_for(sid, endpoint)
            connects = _ConnectWatch()
            request = client.build_request(scope["method"], url, headers=headers,
                                           content=body.stream() if has_body else None,
                                           extensions={"trace": connects})
            try:
                upstream = await self._send_unless_gone(client, request, sid)
                body.release()
                break
            except ClientDisconnected:
                return
            except _SandboxGone as gone:
                return await _respond(send, 502, self._not_found_message(sid, gone.reason), sandboxId=sid)
            except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as e:
                if body.disconnected.is_set():
                    return
                kept = not connects.opened and not isinstance(e, httpx.ConnectError)
                if (kept and not resent and port != AGENT_PORT and scope["method"] in IDEMPOTENT
                        and body.replayable and self._gone_reason(sid) is None):
                    resent = True
                    log.info("proxy %s %s to sandbox %s port %d: the connection broke before an answer (%r); "
                             "sending it again", scope["method"], scope["path"], sid, port, e)
                    continue
                note = ""
                if not retried and port != AGENT_PORT and await self._forward_port(sid, port):
                    if body.replayable:
                        retried = True
                        continue
                    note = ("; it listens only on the sandbox's loopback and is relayed from now on, but this "
                            f"request's body (over {REPLAY_LIMIT} bytes) was already sent: send it again")
                log.warning("proxy %s %s to sandbox %s port %d failed: %r (cause %r)", scope["method"],
                            scope["path"], sid, port, e, e.__cause__ or e.__context__)
                try:
                    self.manager.get(sid)
                except SandboxNotFound as nf:
                    return await _respond(send, 502, f"The sandbox {sid} was not found" +
                                          (f": {nf.reason}" if nf.reason else ""), sandboxId=sid)
                what = "the connection closed before an answer on port" if kept else "nothing answered on port"
                return await _respond(send, 502, f"The sandbox {sid} is running but port is not open "
                                      f"({what} {port}: {type(e).__name__}{note})", sandboxId=sid)
            except httpx.HTTPError as e:
                return await _respond(send, 502, f"proxying to port {port} of sandbox {sid} failed: {e}", sandboxId=sid)

        try:
            out_headers = [(k.lower(), v) for k, v in upstream.headers.raw if k.lower() not in HOP_BY_HOP
                           and not (k.lower() == b"set-cookie" and traffic_auth.sets_cookie(v))]
            if forward.prefix is not None:
                out_headers = _prefixed_response_headers(out_headers, forward.prefix, _header(scope, b"host"))
            await send({"type": "http.response.start", "status": upstream.status_code, "headers": out_headers})
            framing = ConnectStreamFraming.for_response(upstream.status_code, upstream.headers.get("content-type"))
            pump = asyncio.ensure_future(_pump(upstream, send, framing))
            watch = asyncio.ensure_future(_wait_disconnect(receive, body.done, body.disconnected))
            gone = asyncio.ensure_future(self._until_gone(sid))
            try:
                await asyncio.wait({pump, watch, gone}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                await cancel_and_wait((pump, watch, gone))
            if _finished(pump):  # the upstream answer ended normally
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            if _finished(watch):  # the client left: nobody to tell
                return
            if _finished(gone):
                message = self._not_found_message(sid, gone.result())
            else:
                log.info("proxy stream from sandbox %s port %d was cut: %r", sid, port,
                         None if pump.cancelled() else pump.exception())
                reason = await self._gone_soon(sid)
                message = (self._not_found_message(sid, reason) if reason is not None else
                           f"the connection to sandbox {sid} (port {port}) ended before the stream completed")
            await _end_cut_stream(send, framing, message)
        finally:
            await upstream.aclose()

    async def _send_unless_gone(self, client: httpx.AsyncClient, request: httpx.Request, sid: str) -> httpx.Response:
        """The upstream's answer (its head), or :class:`_SandboxGone` if the sandbox ends first: an
        agent that has not answered yet when its VM goes (a read of a FIFO, a VM killed) never
        will, and the client would otherwise wait for its own timeout (measured: 900 s under load)."""
        sending = asyncio.ensure_future(client.send(request, stream=True))
        gone = asyncio.ensure_future(self._until_gone(sid))
        try:
            await asyncio.wait({sending, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not sending.done():
                sending.cancel()
            gone.cancel()
            await asyncio.gather(sending, gone, return_exceptions=True)
        if sending.cancelled() and gone.done() and not gone.cancelled():
            raise _SandboxGone(gone.result())
        return sending.result()

    # -- the sandbox going away mid-stream ------------------------------------------------------

    def _gone_reason(self, sid: str) -> str | None:
        """None while the sandbox runs; once it is gone, why (``""`` when unknown). A sandbox paused
        to disk has no VM to answer: its streams end as they would if it were gone."""
        try:
            sb = self.manager.get(sid)
        except SandboxNotFound as e:
            return e.reason or ""
        return "it was paused" if sb.pause_info is not None else None

    @staticmethod
    def _not_found_message(sid: str, reason: str) -> str:
        return f"The sandbox {sid} was not found" + (f": {reason}" if reason else "")

    async def _until_gone(self, sid: str) -> str:
        """Returns (why) once the sandbox is no longer running: killed, timed out, or its VM died.

        A stream to a VM that is gone may never see its connection close (a tap device simply
        goes quiet), so the proxy looks instead of waiting for the upstream to notice."""
        while True:
            await asyncio.sleep(GONE_POLL_S)
            reason = self._gone_reason(sid)
            if reason is not None:
                return reason

    async def _gone_soon(self, sid: str) -> str | None:
        """After an upstream connection broke: the sandbox's end reason if it is gone or goes within
        :data:`CUT_GRACE_S` (the manager hears of a dead VMM a moment after its sockets close)."""
        deadline = asyncio.get_running_loop().time() + CUT_GRACE_S
        while True:
            reason = self._gone_reason(sid)
            if reason is not None or asyncio.get_running_loop().time() >= deadline:
                return reason
            await asyncio.sleep(0.05)

    # -- websockets ----------------------------------------------------------------------

    async def _websocket(self, scope: Scope, receive: Receive, send: Send, sid: str, port: int,
                         endpoint: AgentEndpoint, forward: "_Forward") -> None:
        from websockets.asyncio.client import connect
        from websockets.exceptions import InvalidHandshake, InvalidMessage

        first = await receive()
        if first["type"] != "websocket.connect":
            return
        headers = [(k.decode("latin-1"), v.decode("latin-1"))
                   for k, v in _forwarded_headers(scope, WS_REQUEST_DROP, forward.prefix)]
        uri = "ws" + endpoint.base_url.removeprefix("http") + forward.path.decode("latin-1")
        retried = False
        while True:
            sock = None
            transport: dict[str, Any] = {}
            try:
                if isinstance(endpoint, HybridVsockEndpoint):
                    from ..guest.vsock import vsock_socket

                    sock = transport["sock"] = await vsock_socket(endpoint.uds_path, endpoint.port, timeout=10)
                upstream = await connect(
                    uri, additional_headers=headers, subprotocols=scope.get("subprotocols") or None, open_timeout=10,
                    max_size=None, ping_interval=None, compression=None, **transport,
                )
                break
            except (OSError, InvalidHandshake, asyncio.TimeoutError, httpcore.ConnectError) as e:
                if sock is not None:
                    sock.close()
                # Refused, or closed before any answer: maybe a server on the guest's loopback. Not
                # after a timeout (it would wait as long again) nor after a real HTTP answer.
                nothing_answered = isinstance(e, (InvalidMessage, httpcore.ConnectError)) or (
                    isinstance(e, OSError) and not isinstance(e, TimeoutError))
                if not retried and port != AGENT_PORT and nothing_answered and await self._forward_port(sid, port):
                    retried = True
                    continue
                await _ws_deny(scope, send, 502, f"The sandbox {sid} is running but port is not open "
                                                 f"(websocket to port {port}: {e})", sandboxId=sid)
                return
        await send({"type": "websocket.accept", "subprotocol": upstream.subprotocol})
        gone = asyncio.ensure_future(self._until_gone(sid))
        await relay_websocket(receive, send, upstream, also=[gone])
        if _finished(gone):  # 1011: the server ended the connection on an unexpected condition
            with contextlib.suppress(Exception):
                await send({"type": "websocket.close", "code": 1011,
                            "reason": self._not_found_message(sid, gone.result())[:120]})


@dataclass(frozen=True)
class _Forward:
    """What a proxied request becomes upstream."""

    path: bytes
    """The raw path and query sent to the sandbox's port (the path form's prefix taken off)."""
    prefix: str | None
    """The path form's prefix (``/sandboxes/ID/ports/PORT``), None for the other forms."""


class _SandboxGone(Exception):
    """The sandbox ended before its upstream answered; ``reason`` says why (may be empty)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _oversize_headers(scope: Scope) -> str | None:
    """Why the request's headers are too many or too large to pass into a sandbox, None when they are not.

    uvicorn's parser bounds only a head that arrives in pieces; one that arrives whole passes at any
    size, and the sandbox's server (the agent takes 100 headers, 64 KiB a line) would refuse it with
    an answer of its own, or break."""
    headers = scope.get("headers", ())
    size = sum(len(k) + len(v) + 4 for k, v in headers)
    if len(headers) > MAX_HEADER_COUNT or size > MAX_HEADER_BYTES:
        return (f"request headers too large for a sandbox: {len(headers)} headers, {size} bytes "
                f"(at most {MAX_HEADER_COUNT} headers and {MAX_HEADER_BYTES} bytes)")
    return None


def _has_routing_headers(scope: Scope) -> bool:
    """Whether the request names its sandbox by E2B's headers (a program, not a browser's link)."""
    return any(k in (SANDBOX_ID_HEADER, SANDBOX_PORT_HEADER) for k, _ in scope.get("headers", ()))


def _upstream_path(scope: Scope, via_path: PortPath | None) -> bytes:
    """The raw path and query to ask the sandbox's port for."""
    if via_path is not None:
        path = via_path.rest or b"/"
    else:
        path = scope.get("raw_path") or scope["path"].encode()
    query = scope.get("query_string") or b""
    return path + b"?" + query if query else path


def _location(scope: Scope, via_path: PortPath | None) -> bytes:
    """This request's own URL (an absolute path; the path form's prefix with its trailing slash)."""
    path = _upstream_path(scope, via_path)
    return via_path.prefix.encode() + path if via_path is not None else path


def _forwarded_headers(scope: Scope, drop: set[bytes], prefix: str | None) -> list[tuple[bytes, bytes]]:
    """The request's headers as sent into the sandbox: without ``drop`` and the proxy's cookie, with
    ``X-Forwarded-For``/``-Proto``/``-Host`` (and ``-Prefix`` in the path form). A web IDE checks a
    websocket's Origin against ``X-Forwarded-Host``: the upgrade reaches it with another Host."""
    drop = drop | connection_listed(scope["headers"])
    if any(k == b"transfer-encoding" for k, _ in scope["headers"]):
        # The body arrives de-chunked and is framed anew upstream: a Content-Length beside the
        # chunking (a CL.TE smuggling attempt) must not go with it.
        drop = drop | {b"content-length"}
    headers = [(k, v) for k, v in without_cookie(scope["headers"]) if k not in drop]
    client_addr = scope.get("client") or ("", 0)
    headers.append((b"x-forwarded-for", str(client_addr[0]).encode()))
    headers.append((b"x-forwarded-proto", b"https" if scope.get("scheme") in ("https", "wss") else b"http"))
    host = _header(scope, b"host")
    if host:
        headers.append((b"x-forwarded-host", host))
    if prefix is not None:
        headers.append((b"x-forwarded-prefix", prefix.encode()))
    return headers


def connection_listed(headers: Any) -> set[bytes]:
    """The header names a ``Connection`` header lists: hop-by-hop for this one connection (RFC 9110
    7.6.1), so not forwarded. The headers the proxy sets itself are added after this, so naming
    them removes only the client's own."""
    names: set[bytes] = set()
    for k, v in headers:
        if k == b"connection":
            names.update(n.strip().lower() for n in v.split(b",") if n.strip())
    return names - {b"host"}  # the Host names the sandbox's site: it stays


def _prefixed_response_headers(headers: list[tuple[bytes, bytes]], prefix: str,
                               host: bytes | None) -> list[tuple[bytes, bytes]]:
    """An answer's headers for a path-form client: redirects and cookies kept under the prefix."""
    out = []
    for k, v in headers:
        if k == b"location":
            v = prefixed_location(v, prefix, host)
        elif k == b"set-cookie":
            v = prefixed_set_cookie(v, prefix)
        out.append((k, v))
    return out


class ClientDisconnected(Exception):
    pass


class _ConnectWatch:
    """httpcore's ``trace`` callback for one try: whether it opened a new connection (else it went
    down a kept one)."""

    def __init__(self) -> None:
        self.opened = False

    async def __call__(self, event: str, info: dict[str, Any]) -> None:
        if event.startswith("connection.connect_") and event.endswith(".started"):
            self.opened = True


class _ReplayableBody:
    """A request body read from the client as the upstream request sends it, kept for one more try.

    :meth:`stream` is the upstream request's content; a second :meth:`stream` (the try after a
    port relay) sends the kept chunks again and then goes on reading from the client. Bodies over
    ``limit`` bytes are not kept: :attr:`replayable` turns False once one is.
    """

    def __init__(self, receive: Receive, limit: int) -> None:
        self._receive = receive
        self._limit = limit
        self._kept: list[bytes] = []
        self._kept_size = 0
        self._ended = False
        self.replayable = True
        self.done = asyncio.Event()
        """The client's whole body was read."""
        self.disconnected = asyncio.Event()

    async def stream(self) -> AsyncIterator[bytes]:
        if not self.replayable:
            raise RuntimeError("the request body was not kept, it cannot be sent again")
        for chunk in list(self._kept):
            yield chunk
        while not self._ended:
            msg = await self._receive()
            if msg["type"] == "http.disconnect":
                self.disconnected.set()
                raise ClientDisconnected()
            chunk = msg.get("body", b"")
            if not msg.get("more_body", False):
                self._ended = True
            if chunk:
                self._keep(chunk)
                yield chunk
        self.done.set()

    def release(self) -> None:
        """The upstream answered: no more tries, the kept chunks can go."""
        self.replayable = False
        self._kept.clear()

    def _keep(self, chunk: bytes) -> None:
        if not self.replayable:
            return
        self._kept_size += len(chunk)
        if self._kept_size > self._limit:
            self.replayable = False
            self._kept.clear()
        else:
            self._kept.append(chunk)


class ConnectStreamFraming:
    """Where a proxied Connect streaming response is in its envelope framing.

    A Connect stream (``application/connect+json`` or ``+proto``) is a run of envelopes: a flag
    byte, a 4-byte big-endian length, the message; the last has flag ``0x02`` and carries
    ``{}`` or ``{"error": ...}``. Fed the bytes passed on to the client, this says whether they
    stop between two envelopes (:attr:`at_boundary`), so that the proxy can end a stream cut
    short with an end-of-stream error of its own, and whether the stream's own end-of-stream
    envelope went through already (:attr:`ended`).
    """

    def __init__(self) -> None:
        self._header = bytearray()
        self._left = 0
        self._end_pending = False
        self.ended = False
        self.unknown = False
        """Set when bytes may or may not have reached the client (a send interrupted)."""

    @classmethod
    def for_response(cls, status: int, content_type: str | None) -> "ConnectStreamFraming | None":
        """A tracker for a Connect streaming response, None for any other response."""
        if status == 200 and (content_type or "").split(";", 1)[0].strip().lower().startswith(CONNECT_STREAM_TYPE):
            return cls()
        return None

    @property
    def at_boundary(self) -> bool:
        return not self.unknown and not self._header and self._left == 0

    def feed(self, data: bytes) -> None:
        i, n = 0, len(data)
        while i < n:
            if self._left:
                took = min(self._left, n - i)
                self._left -= took
                i += took
            else:
                took = min(5 - len(self._header), n - i)
                self._header += data[i:i + took]
                i += took
                if len(self._header) == 5:
                    flags = self._header[0]
                    self._left = int.from_bytes(self._header[1:5], "big")
                    self._header.clear()
                    self._end_pending = bool(flags & END_STREAM_FLAG)
            if self._end_pending and self._left == 0 and not self._header:
                self.ended = True
                self._end_pending = False


def end_stream_error(message: str, code: str = "unavailable") -> bytes:
    """A Connect end-of-stream envelope carrying an error (always JSON, whatever the codec)."""
    payload = json.dumps({"error": {"code": code, "message": message}}, separators=(",", ":")).encode()
    return bytes([END_STREAM_FLAG]) + len(payload).to_bytes(4, "big") + payload


def _finished(task: asyncio.Future[Any]) -> bool:
    """Whether a task ran to its end (not cancelled, no exception)."""
    return task.done() and not task.cancelled() and task.exception() is None


async def _pump(upstream: httpx.Response, send: Send, framing: ConnectStreamFraming | None) -> None:
    """Pass the upstream body on; returns at its end, raises when the upstream connection breaks.

    The final empty body message is the caller's to send: a body cut short must not look complete."""
    async for chunk in upstream.aiter_raw():
        if not chunk:
            continue
        if framing is not None:
            framing.unknown = True  # until the send completes: cancelled inside it, who knows
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
        if framing is not None:
            framing.unknown = False
            framing.feed(chunk)


async def _end_cut_stream(send: Send, framing: ConnectStreamFraming | None, message: str) -> None:
    """End a response whose upstream broke or whose sandbox went away so that the client raises.

    A Connect stream between two envelopes ends with an ``unavailable`` end-of-stream error (E2B's
    SDKs read "... was not found" in it as the sandbox no longer running); a Connect stream whose
    own end went through ends as it is; anything else is aborted: the ASGI app returns without
    ending the body and the server closes the connection, so the client sees a truncated body."""
    if framing is not None and framing.ended and framing.at_boundary:
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return
    if framing is not None and framing.at_boundary:
        await send({"type": "http.response.body", "body": end_stream_error(message), "more_body": False})
        return
    log.info("aborting a proxied response cut short: %s", message)


async def _wait_disconnect(receive: Receive, body_done: asyncio.Event, disconnected: asyncio.Event) -> None:
    """Returns when the client disconnects (after its request body was read)."""
    await body_done.wait()
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            disconnected.set()
            return


async def _redirect(send: Send, status: int, location: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """A redirect the proxy answers itself; never cached (it may set a sandbox's cookie)."""
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"location", location), (b"cache-control", b"no-store"), (b"content-length", b"0"),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": b""})


async def _ws_deny(scope: Scope, send: Send, status: int, message: str, **extra: Any) -> None:
    """Refuse a websocket handshake with an HTTP error if the server supports it, else close."""
    if "websocket.http.response" in (scope.get("extensions") or {}):
        body = error_body(status, message, **extra)
        await send({"type": "websocket.http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1011 if status >= 500 else 1008, "reason": message[:120]})


async def _ws_refuse(scope: Scope, receive: Receive, send: Send, status: int, message: str, **extra: Any) -> None:
    msg = await receive()
    if msg["type"] != "websocket.connect":
        return
    await _ws_deny(scope, send, status, message, **extra)
