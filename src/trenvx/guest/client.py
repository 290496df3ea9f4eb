"""Host-side async client of the guest agent (envd protocol), on ``httpx.AsyncClient``.

Used by the template builder (run the start command, wait for health) and by the sandbox
layer (``/init`` after a restore, processes and files on behalf of users). It speaks the
same wire format as E2B's SDKs: Connect RPC with the JSON codec over HTTP/1.1 for
``process.Process`` and ``filesystem.Filesystem``, plain HTTP for ``/health``, ``/init``
and ``/files``. The Connect envelope codec lives here too: this module must not import
the agent package, which stays standard-library-only and separately deployable.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import struct
import time
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import httpx

from .agent.identity import machine_id_for
from .channel import forwarded_port_transport, transport_for
from .endpoint import AgentEndpoint

__all__ = [
    "AgentClient",
    "AgentError",
    "CommandResult",
    "EntryInfo",
    "EnvelopeDecoder",
    "FreezeResult",
    "ProcessEvent",
    "ProcessInfo",
    "encode_envelope",
]

FLAG_COMPRESSED = 0x01
FLAG_END_STREAM = 0x02
STREAM_CONTENT_TYPE = "application/connect+json"
UPLOAD_CHUNK = 1 << 20
#: Largest piece of stdin sent in one SendInput call.
STDIN_CHUNK = 1 << 20
#: Largest /metrics answer read (the agent's is ~300 bytes).
METRICS_MAX_BYTES = 64 << 10
#: Largest /freeze or /thaw answer read (a list of mount points).
FREEZE_MAX_BYTES = 64 << 10

_HTTP_TO_CODE = {
    400: "invalid_argument", 401: "unauthenticated", 403: "permission_denied", 404: "not_found",
    409: "already_exists", 413: "resource_exhausted", 415: "unimplemented", 429: "resource_exhausted",
    499: "canceled", 500: "internal", 501: "unimplemented", 502: "unavailable", 503: "unavailable",
    504: "deadline_exceeded", 507: "resource_exhausted",
}


class AgentError(Exception):
    """An error answered by the agent: a Connect code (``not_found``, ...) and its message."""

    def __init__(self, code: str, message: str, status: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status


@dataclass
class CommandResult:
    """The outcome of :meth:`AgentClient.run`."""

    stdout: bytes
    stderr: bytes
    exit_code: int
    error: str | None


@dataclass
class ProcessEvent:
    """One event of a process stream (keepalives are not surfaced)."""

    kind: Literal["start", "stdout", "stderr", "pty", "end"]
    pid: int | None = None
    data: bytes = b""
    exit_code: int | None = None
    error: str | None = None


@dataclass
class EntryInfo:
    """A filesystem entry of the sandbox (envd's ``EntryInfo``)."""

    name: str
    type: Literal["file", "dir", "symlink", "unknown"]
    path: str
    size: int = 0
    mode: int = 0
    permissions: str = ""
    owner: str = ""
    group: str = ""
    modified_time: datetime | None = None
    symlink_target: str | None = None

    @classmethod
    def from_json(cls, msg: dict[str, Any]) -> EntryInfo:
        kind = {"FILE_TYPE_FILE": "file", "FILE_TYPE_DIRECTORY": "dir", "FILE_TYPE_SYMLINK": "symlink",
                1: "file", 2: "dir", 3: "symlink"}.get(msg.get("type"), "unknown")
        return cls(
            name=msg.get("name", ""),
            type=kind,  # type: ignore[arg-type]
            path=msg.get("path", ""),
            size=int(msg.get("size", 0)),
            mode=int(msg.get("mode", 0)),
            permissions=msg.get("permissions", ""),
            owner=msg.get("owner", ""),
            group=msg.get("group", ""),
            modified_time=_parse_time(msg.get("modifiedTime")),
            symlink_target=msg.get("symlinkTarget"),
        )


@dataclass
class ProcessInfo:
    """A running process as listed by the agent."""

    pid: int
    tag: str | None
    cmd: str
    args: list[str] = field(default_factory=list)
    envs: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None


@dataclass
class FreezeResult:
    """What ``/freeze`` froze (or ``/thaw`` thawed): mount points, and the errors of the others."""

    paths: list[str]
    errors: list[str]

    @classmethod
    def from_json(cls, value: dict[str, Any], key: str) -> FreezeResult:
        paths, errors = value.get(key), value.get("errors")
        return cls([str(p) for p in paths] if isinstance(paths, list) else [],
                   [str(e) for e in errors] if isinstance(errors, list) else [])


def _parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    text = value.rstrip("Zz")
    base, _, frac = text.partition(".")
    try:
        dt = datetime.strptime(base, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
    except ValueError:
        return None
    if frac:
        dt = dt.replace(microsecond=int(frac[:6].ljust(6, "0")))
    return dt


def encode_envelope(message: dict[str, Any], flags: int = 0) -> bytes:
    """One Connect envelope: flag byte, 4-byte big-endian length, JSON message."""
    data = json.dumps(message, separators=(",", ":")).encode("utf-8")
    return struct.pack(">BI", flags, len(data)) + data


class EnvelopeDecoder:
    """Splits a Connect stream body, fed in arbitrary pieces, into ``(flags, message)``."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, dict[str, Any]]]:
        self._buf += data
        out: list[tuple[int, dict[str, Any]]] = []
        while len(self._buf) >= 5:
            flags, length = struct.unpack_from(">BI", self._buf)
            if len(self._buf) < 5 + length:
                break
            payload = bytes(self._buf[5:5 + length])
            del self._buf[:5 + length]
            if flags & FLAG_COMPRESSED:
                raise AgentError("internal", "agent sent a compressed message, which was not negotiated")
            out.append((flags, json.loads(payload) if payload else {}))
        return out

    @property
    def pending(self) -> int:
        """Bytes of an incomplete envelope still buffered."""
        return len(self._buf)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def _error_from_response(status: int, body: bytes) -> AgentError:
    try:
        obj = json.loads(body)
    except ValueError:
        obj = None
    if isinstance(obj, dict):
        code = obj.get("code")
        message = obj.get("message") or body.decode("utf-8", "replace")
        if not isinstance(code, str):
            code = _HTTP_TO_CODE.get(status, "unknown")
        return AgentError(code, str(message), status)
    return AgentError(_HTTP_TO_CODE.get(status, "unknown"), body.decode("utf-8", "replace") or f"HTTP {status}", status)


def _selector(pid: int) -> dict[str, Any]:
    return {"pid": pid}



@asynccontextmanager
async def _deadline_as_timeout(cmd: str | list[str], timeout: float | None) -> AsyncIterator[None]:
    """The agent ends a command stream past its deadline with ``deadline_exceeded``: a TimeoutError."""
    try:
        yield
    except AgentError as e:
        if e.code == "deadline_exceeded":
            raise TimeoutError(f"command timed out after {timeout}s: {cmd!r}") from e
        raise

class AgentClient:
    """An async client of one agent. Not bound to a loop until first used; call :meth:`aclose`."""

    LIMITS = httpx.Limits(max_connections=200, max_keepalive_connections=32)

    def __init__(self, base_url: str, access_token: str | None = None, user: str = "root",
                 timeout: float = 30.0, headers: dict[str, str] | None = None,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        """``headers`` go with every request: e.g. ``E2b-Sandbox-Id``/``E2b-Sandbox-Port`` to reach
        the agent through the server's proxy instead of directly. ``transport`` replaces the TCP
        one (see :meth:`for_endpoint`)."""
        self.base_url = base_url.rstrip("/")
        self.access_token = access_token
        self.user = user
        self.timeout = timeout
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout),
            transport=transport or forwarded_port_transport(self.LIMITS),
            trust_env=False,  # no proxies from the environment: agents are reached directly
        )

    @classmethod
    def for_endpoint(cls, endpoint: AgentEndpoint, access_token: str | None = None, **kwargs: Any) -> AgentClient:
        """A client of the agent at ``endpoint`` (a VM's ``agent_endpoint``: TCP or hybrid vsock)."""
        return cls(endpoint.base_url, access_token, transport=transport_for(endpoint, cls.LIMITS), **kwargs)

    async def __aenter__(self) -> AgentClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # ------------------------------------------------------------------ headers
    def _headers(self, user: str | None = None, *, rpc: bool = True) -> dict[str, str]:
        headers: dict[str, str] = {}
        if self.access_token:
            headers["X-Access-Token"] = self.access_token
        if rpc:
            name = user or self.user
            headers["Authorization"] = "Basic " + _b64(f"{name}:".encode())
            headers["Connect-Protocol-Version"] = "1"
        return headers

    # ------------------------------------------------------------------ health & init
    async def health(self) -> bool:
        """Whether the agent answers ``/health`` with 204 right now."""
        try:
            response = await self._http.get("/health", timeout=min(self.timeout, 5.0))
        except httpx.TransportError:
            return False
        return response.status_code == 204

    async def wait_healthy(self, deadline_s: float) -> None:
        """Poll ``/health`` until it answers, for at most ``deadline_s`` seconds from now.

        Connection failures are retried with a backoff of 1 ms doubling up to 50 ms (no
        fixed sleeps); raises :class:`TimeoutError` when the time is up.
        """
        deadline = time.monotonic() + deadline_s
        delay = 0.001
        last: Exception | str | None = None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"agent at {self.base_url} not healthy after {deadline_s:.3f}s (last: {last})")
            try:
                response = await self._http.get("/health", timeout=max(0.05, min(remaining, 2.0)))
                if response.status_code == 204:
                    return
                last = f"HTTP {response.status_code}"
            except httpx.TransportError as exc:
                last = exc
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 0.05)

    async def init(self, *, sandbox_id: str, env_vars: dict[str, str] | None, access_token: str | None,
                   hostname: str, timestamp_ns: int | None = None, entropy: bytes | None = None,
                   default_user: str | None = None, default_workdir: str | None = None) -> None:
        """Give a restored sandbox its identity (``POST /init``).

        ``timestamp_ns`` defaults to the host's clock now, ``entropy`` to 64 fresh random
        bytes. Afterwards this client sends ``access_token`` with every request.
        """
        ns = time.time_ns() if timestamp_ns is None else timestamp_ns
        body: dict[str, Any] = {
            "sandboxId": sandbox_id,
            # Hashed here: the guest's first sha256 costs ~70 ms of translation under TCG.
            "machineId": machine_id_for(sandbox_id),
            "envVars": dict(env_vars or {}),
            "hostname": hostname,
            "timestamp": _rfc3339_ns(ns),
            "entropy": _b64(entropy if entropy is not None else os.urandom(64)),
        }
        if access_token is not None:
            body["accessToken"] = access_token
        if default_user:
            body["defaultUser"] = default_user
        if default_workdir:
            body["defaultWorkdir"] = default_workdir
        response = await self._http.post("/init", json=body, headers=self._headers(rpc=False))
        if response.status_code != 204:
            raise _error_from_response(response.status_code, response.content)
        if access_token is not None:
            self.access_token = access_token or None

    async def envs(self) -> dict[str, str]:
        """The default environment variables set by ``/init``."""
        response = await self._http.get("/envs", headers=self._headers(rpc=False))
        if response.status_code != 200:
            raise _error_from_response(response.status_code, response.content)
        return dict(response.json())

    async def metrics(self) -> dict[str, Any]:
        """The guest's CPU, memory and disk figures (``mem_cache``: its page cache, in bytes).

        The host asks for them periodically, unprompted: a body longer than ``METRICS_MAX_BYTES``
        (a guest flooding the host's memory) is an :class:`AgentError`, read no further."""
        async with self._http.stream("GET", "/metrics", headers=self._headers(rpc=False)) as response:
            body = b""
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > METRICS_MAX_BYTES:
                    raise AgentError("resource_exhausted", f"/metrics answered more than {METRICS_MAX_BYTES} bytes")
        if response.status_code != 200:
            raise _error_from_response(response.status_code, body)
        value = json.loads(body)
        if not isinstance(value, dict):
            raise AgentError("internal", "/metrics answered something other than a JSON object")
        return value

    async def _small_json(self, path: str, body: dict[str, Any], limit: int, timeout: float | None) -> dict[str, Any]:
        """POST ``body`` to ``path``; its JSON object answer, read to at most ``limit`` bytes (a guest
        cannot make the host read more). AgentError for any status but 200."""
        async with self._http.stream("POST", path, json=body, headers=self._headers(rpc=False),
                                     timeout=timeout if timeout is not None else self.timeout) as response:
            data = b""
            async for chunk in response.aiter_bytes():
                data += chunk
                if len(data) > limit:
                    raise AgentError("resource_exhausted", f"{path} answered more than {limit} bytes")
        if response.status_code != 200:
            raise _error_from_response(response.status_code, data)
        try:
            value = json.loads(data)
        except ValueError:
            value = None
        if not isinstance(value, dict):
            raise AgentError("internal", f"{path} answered something other than a JSON object")
        return value

    async def freeze(self, *, thaw_after_s: float = 120.0, timeout: float | None = None) -> FreezeResult:
        """Sync and freeze the guest's writable filesystems (``POST /freeze``) for a pause to disk;
        they thaw on :meth:`thaw`, :meth:`init`/:meth:`resync`, or by themselves after
        ``thaw_after_s`` seconds of the guest's time.

        Raises :class:`AgentError` (status 404: the agent predates freezing; 501: it does not
        freeze) and ``httpx`` errors (a timeout: the agent did not answer in ``timeout``)."""
        value = await self._small_json("/freeze", {"thawAfterSeconds": thaw_after_s}, FREEZE_MAX_BYTES, timeout)
        return FreezeResult.from_json(value, "frozen")

    async def thaw(self, *, timeout: float | None = None) -> FreezeResult:
        """Thaw what :meth:`freeze` froze (``POST /thaw``; nothing frozen: nothing to do)."""
        return FreezeResult.from_json(await self._small_json("/thaw", {}, FREEZE_MAX_BYTES, timeout), "thawed")

    async def resync(self, *, timestamp_ns: int | None = None, entropy: bytes | None = None) -> None:
        """After a resume: the host's clock and fresh entropy (``POST /init`` with only those; the
        agent thaws its filesystems first). Identity, token and environment stay as they were."""
        ns = time.time_ns() if timestamp_ns is None else timestamp_ns
        body = {"timestamp": _rfc3339_ns(ns), "entropy": _b64(entropy if entropy is not None else os.urandom(64))}
        response = await self._http.post("/init", json=body, headers=self._headers(rpc=False))
        if response.status_code != 204:
            raise _error_from_response(response.status_code, response.content)

    async def forward_port(self, port: int, *, timeout: float | None = None) -> bool:
        """Ask the agent to relay ``port``, bound to the guest's loopback, to the guest's address
        (``POST /ports/forward``; idempotent, see :mod:`trenvx.guest.agent.ports`).

        True: a relay carries the port now (made by this call or an earlier one), so connecting
        again is worth it. False: nothing listens on the guest's loopback on that port, or the port
        already listens on the guest's address (a relay would not help), or the agent predates
        this endpoint (it answers 404 too). Raises :class:`AgentError` for other answers (401: a
        wrong token; 429: too many relays) and ``httpx`` errors when the agent cannot be reached.
        """
        response = await self._http.post(
            "/ports/forward", json={"port": port}, headers=self._headers(rpc=False),
            timeout=timeout if timeout is not None else self.timeout,
        )
        if response.status_code == 404:
            return False
        if response.status_code != 200:
            raise _error_from_response(response.status_code, response.content)
        return bool(response.json().get("forwarded"))

    async def forwarded_ports(self) -> list[dict[str, Any]]:
        """The agent's relays now: ``address``, ``port``, ``target``, ``connections`` each."""
        response = await self._http.get("/ports/forward", headers=self._headers(rpc=False))
        if response.status_code != 200:
            raise _error_from_response(response.status_code, response.content)
        return list(response.json().get("relays", []))

    # ------------------------------------------------------------------ Connect plumbing
    async def _unary(self, method: str, message: dict[str, Any], user: str | None = None,
                     timeout: float | None = None) -> dict[str, Any]:
        response = await self._http.post(
            f"/{method}",
            content=json.dumps(message).encode(),
            headers={**self._headers(user), "Content-Type": "application/json"},
            timeout=timeout if timeout is not None else self.timeout,
        )
        if response.status_code != 200:
            raise _error_from_response(response.status_code, response.content)
        return dict(response.json())

    async def _server_stream(self, method: str, message: dict[str, Any], *, user: str | None = None,
                             timeout: float | None = None) -> AsyncGenerator[dict[str, Any], None]:
        headers = {**self._headers(user), "Content-Type": STREAM_CONTENT_TYPE}
        if timeout:
            headers["Connect-Timeout-Ms"] = str(max(1, int(timeout * 1000)))
        request_timeout = httpx.Timeout(self.timeout, read=None)
        async with self._http.stream("POST", f"/{method}", content=encode_envelope(message),
                                     headers=headers, timeout=request_timeout) as response:
            if response.status_code != 200:
                raise _error_from_response(response.status_code, await response.aread())
            decoder = EnvelopeDecoder()
            async for chunk in response.aiter_raw():
                for flags, msg in decoder.feed(chunk):
                    if flags & FLAG_END_STREAM:
                        error = msg.get("error")
                        if error:
                            raise AgentError(str(error.get("code", "unknown")), str(error.get("message", "")))
                        return
                    yield msg
        raise AgentError("unavailable", f"stream {method} ended without an end-of-stream message")

    # ------------------------------------------------------------------ processes
    def start(self, cmd: str | list[str], *, envs: dict[str, str] | None = None, cwd: str | None = None,
              user: str | None = None, tag: str | None = None, pty: tuple[int, int] | None = None,
              stdin: bool = False, timeout: float | None = None) -> AsyncGenerator[ProcessEvent, None]:
        """Start a process and stream its events: ``start``, output, then ``end``.

        A string runs as ``/bin/bash -l -c CMD`` (as E2B does); a list is the argv.
        ``pty`` is ``(cols, rows)``. ``timeout`` makes the agent kill the process after that
        many seconds. Leaving the iteration early detaches; the process keeps running.
        """
        if isinstance(cmd, str):
            argv = ["/bin/bash", "-l", "-c", cmd]
        else:
            argv = list(cmd)
            if not argv:
                raise ValueError("empty command")
        config: dict[str, Any] = {"cmd": argv[0], "args": argv[1:]}
        if envs:
            config["envs"] = dict(envs)
        if cwd:
            config["cwd"] = cwd
        request: dict[str, Any] = {"process": config, "stdin": stdin}
        if tag:
            request["tag"] = tag
        if pty is not None:
            request["pty"] = {"size": {"cols": pty[0], "rows": pty[1]}}
        return self._process_events("process.Process/Start", request, user=user, timeout=timeout)

    def connect(self, pid: int) -> AsyncGenerator[ProcessEvent, None]:
        """Attach to a running process: a ``start`` event, its further output, its end."""
        return self._process_events("process.Process/Connect", {"process": _selector(pid)})

    async def _process_events(self, method: str, request: dict[str, Any], *, user: str | None = None,
                              timeout: float | None = None) -> AsyncGenerator[ProcessEvent, None]:
        pid: int | None = None
        async with aclosing(self._server_stream(method, request, user=user, timeout=timeout)) as stream:
            async for msg in stream:
                event = msg.get("event") or {}
                if "start" in event:
                    pid = int((event["start"] or {}).get("pid", 0))
                    yield ProcessEvent("start", pid=pid)
                elif "data" in event:
                    data = event["data"] or {}
                    kind: Literal["stdout", "stderr", "pty"]
                    for kind in ("stdout", "stderr", "pty"):
                        if kind in data:
                            yield ProcessEvent(kind, pid=pid, data=_unb64(data[kind]))
                elif "end" in event:
                    end = event["end"] or {}
                    yield ProcessEvent("end", pid=pid, exit_code=int(end.get("exitCode", 0)),
                                       error=end.get("error"))
                    return

    async def run(self, cmd: str | list[str], *, envs: dict[str, str] | None = None, cwd: str | None = None,
                  user: str | None = None, stdin: bytes | None = None, timeout: float | None = None) -> CommandResult:
        """Run a command to completion and collect its output.

        ``stdin`` is written to the process and then closed. With ``timeout`` the agent
        kills the command when it runs longer, and :class:`TimeoutError` is raised.
        """
        started = time.monotonic()
        stdout, stderr = bytearray(), bytearray()
        guard = timeout + max(5.0, timeout) if timeout else None
        async with asyncio.timeout(guard), _deadline_as_timeout(cmd, timeout):
            events = self.start(cmd, envs=envs, cwd=cwd, user=user, stdin=stdin is not None, timeout=timeout)
            async with aclosing(events):
                async for event in events:
                    if event.kind == "start" and stdin is not None:
                        assert event.pid is not None
                        for offset in range(0, len(stdin), STDIN_CHUNK):
                            await self.send_input(event.pid, stdin[offset:offset + STDIN_CHUNK])
                        await self.close_stdin(event.pid)
                    elif event.kind == "stdout":
                        stdout += event.data
                    elif event.kind == "stderr":
                        stderr += event.data
                    elif event.kind == "end":
                        result = CommandResult(bytes(stdout), bytes(stderr), event.exit_code or 0, event.error)
                        if (timeout and result.exit_code == -1 and result.error == "signal: killed"
                                and time.monotonic() - started >= timeout):
                            raise TimeoutError(f"command timed out after {timeout}s: {cmd!r}")
                        return result
        raise AgentError("unavailable", "process stream ended without an end event")

    async def send_input(self, pid: int, data: bytes, *, pty: bool = False) -> None:
        """Write to a process's stdin (or its PTY with ``pty=True``)."""
        await self._unary("process.Process/SendInput",
                          {"process": _selector(pid), "input": {"pty" if pty else "stdin": _b64(data)}})

    async def send_signal(self, pid: int, signal: Literal["SIGTERM", "SIGKILL"]) -> None:
        await self._unary("process.Process/SendSignal", {"process": _selector(pid), "signal": f"SIGNAL_{signal}"})

    async def close_stdin(self, pid: int) -> None:
        await self._unary("process.Process/CloseStdin", {"process": _selector(pid)})

    async def resize_pty(self, pid: int, cols: int, rows: int) -> None:
        await self._unary("process.Process/Update",
                          {"process": _selector(pid), "pty": {"size": {"cols": cols, "rows": rows}}})

    async def list_processes(self) -> list[ProcessInfo]:
        response = await self._unary("process.Process/List", {})
        out: list[ProcessInfo] = []
        for item in response.get("processes", []):
            config = item.get("config") or {}
            out.append(ProcessInfo(pid=int(item.get("pid", 0)), tag=item.get("tag"), cmd=config.get("cmd", ""),
                                   args=list(config.get("args", [])), envs=dict(config.get("envs", {})),
                                   cwd=config.get("cwd")))
        return out

    # ------------------------------------------------------------------ filesystem
    async def stat(self, path: str, *, user: str | None = None) -> EntryInfo:
        response = await self._unary("filesystem.Filesystem/Stat", {"path": path}, user)
        return EntryInfo.from_json(response.get("entry") or {})

    async def list_dir(self, path: str, depth: int = 1, *, user: str | None = None) -> list[EntryInfo]:
        response = await self._unary("filesystem.Filesystem/ListDir", {"path": path, "depth": depth}, user)
        return [EntryInfo.from_json(e) for e in response.get("entries", [])]

    async def make_dir(self, path: str, *, user: str | None = None) -> bool:
        """Create a directory and its parents; False if it already existed."""
        try:
            await self._unary("filesystem.Filesystem/MakeDir", {"path": path}, user)
        except AgentError as err:
            if err.code == "already_exists":
                return False
            raise
        return True

    async def move(self, source: str, destination: str, *, user: str | None = None) -> EntryInfo:
        response = await self._unary("filesystem.Filesystem/Move",
                                     {"source": source, "destination": destination}, user)
        return EntryInfo.from_json(response.get("entry") or {})

    async def remove(self, path: str, *, user: str | None = None) -> None:
        await self._unary("filesystem.Filesystem/Remove", {"path": path}, user)

    async def exists(self, path: str, *, user: str | None = None) -> bool:
        try:
            await self.stat(path, user=user)
        except AgentError as err:
            if err.code == "not_found":
                return False
            raise
        return True

    # ------------------------------------------------------------------ files
    async def upload(self, path: str, src: bytes | Path | AsyncIterable[bytes], *, user: str | None = None) -> None:
        """Write a file in the sandbox from bytes, a host file or an async byte stream.

        The body is streamed (``application/octet-stream``); parent directories are created
        and the file is owned by ``user``.
        """
        content: bytes | AsyncIterable[bytes]
        if isinstance(src, (bytes, bytearray, memoryview)):
            content = bytes(src)
        elif isinstance(src, Path):
            content = _read_file_chunks(src)
        else:
            content = src
        response = await self._http.post(
            "/files",
            params={"path": path, "username": user or self.user},
            content=content,
            headers={**self._headers(rpc=False), "Content-Type": "application/octet-stream"},
            timeout=httpx.Timeout(self.timeout, read=None, write=None),
        )
        if response.status_code != 200:
            raise _error_from_response(response.status_code, response.content)

    async def download(self, path: str, dest: Path, *, user: str | None = None) -> None:
        """Stream a sandbox file to ``dest`` on the host (written via a temporary file)."""
        dest = Path(dest)
        tmp = dest.with_name(f".{dest.name}.part-{os.getpid()}")
        async with self._http.stream(
            "GET", "/files", params={"path": path, "username": user or self.user},
            headers=self._headers(rpc=False), timeout=httpx.Timeout(self.timeout, read=None),
        ) as response:
            if response.status_code != 200:
                raise _error_from_response(response.status_code, await response.aread())
            f = await asyncio.to_thread(open, tmp, "wb")
            try:
                async for chunk in response.aiter_bytes(UPLOAD_CHUNK):
                    await asyncio.to_thread(f.write, chunk)
            except BaseException:
                f.close()
                tmp.unlink(missing_ok=True)
                raise
            f.close()
        os.replace(tmp, dest)

    async def read_bytes(self, path: str, *, user: str | None = None) -> bytes:
        """A whole sandbox file in memory (use :meth:`download` for big files)."""
        response = await self._http.get("/files", params={"path": path, "username": user or self.user},
                                        headers=self._headers(rpc=False))
        if response.status_code != 200:
            raise _error_from_response(response.status_code, response.content)
        return response.content


async def _read_file_chunks(path: Path) -> AsyncIterator[bytes]:
    f = await asyncio.to_thread(open, path, "rb")
    try:
        while True:
            chunk = await asyncio.to_thread(f.read, UPLOAD_CHUNK)
            if not chunk:
                return
            yield chunk
    finally:
        f.close()


def _rfc3339_ns(ns: int) -> str:
    seconds, nanos = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{nanos:09d}Z"
