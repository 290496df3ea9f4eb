"""A small client of a sandbox's agent (E2B's envd protocol) through the server's proxy.

Used by ``sandbox-cli sandbox exec`` and ``sandbox shell``. It speaks Connect RPC with the JSON
codec: server streams (``process.Process/Start``) are envelopes (1 flag byte, 4-byte big-endian
length, JSON) and unary calls are plain JSON. Every request carries ``E2b-Sandbox-Id``,
``E2b-Sandbox-Port: 49983`` and the sandbox's ``X-Access-Token``, so the server routes it to
the sandbox's agent.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

AGENT_PORT = 49983
FLAG_END_STREAM = 0x02


class EnvdError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}" if code else message)
        self.code = code
        self.message = message


@dataclass
class Event:
    kind: str  # start | stdout | stderr | pty | end | keepalive
    pid: int = 0
    data: bytes = b""
    exit_code: int = 0
    status: str = ""
    error: str | None = None


def envelope(message: dict[str, Any], flags: int = 0) -> bytes:
    payload = json.dumps(message, separators=(",", ":")).encode()
    return struct.pack(">BI", flags, len(payload)) + payload


def parse_event(msg: dict[str, Any]) -> Event:
    ev = msg.get("event") or {}
    if "start" in ev:
        return Event("start", pid=int((ev["start"] or {}).get("pid", 0)))
    if "data" in ev:
        d = ev["data"] or {}
        for kind in ("stdout", "stderr", "pty"):
            if kind in d:
                return Event(kind, data=base64.b64decode(d[kind] or ""))
        return Event("keepalive")
    if "end" in ev:
        e = ev["end"] or {}
        return Event("end", exit_code=int(e.get("exitCode", e.get("exit_code", 0)) or 0),
                     status=str(e.get("status", "")), error=e.get("error"))
    return Event("keepalive")


class EnvdClient:
    """One sandbox's agent, reached at ``server_url`` through the proxy."""

    def __init__(self, server_url: str, sandbox_id: str, access_token: str | None, *, user: str = "root",
                 timeout: float = 30.0) -> None:
        headers = {
            "E2b-Sandbox-Id": sandbox_id,
            "E2b-Sandbox-Port": str(AGENT_PORT),
            "Authorization": "Basic " + base64.b64encode(f"{user}:".encode()).decode(),
            "Connect-Protocol-Version": "1",
        }
        if access_token:
            headers["X-Access-Token"] = access_token
        self._http = httpx.AsyncClient(base_url=server_url.rstrip("/"), headers=headers,
                                       timeout=httpx.Timeout(timeout, read=None))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "EnvdClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def unary(self, method: str, message: dict[str, Any]) -> dict[str, Any]:
        r = await self._http.post(f"/{method}", content=json.dumps(message),
                                  headers={"Content-Type": "application/json"})
        if r.status_code != 200:
            raise _error(r.status_code, r.content)
        return r.json() if r.content else {}

    async def start(self, cmd: str, args: list[str], *, envs: dict[str, str] | None = None,
                    cwd: str | None = None, pty: tuple[int, int] | None = None,
                    stdin: bool = False) -> AsyncIterator[Event]:
        """Start a process and yield its events: start (pid), stdout/stderr/pty data, end."""
        process: dict[str, Any] = {"cmd": cmd, "args": args, "envs": envs or {}}
        if cwd:
            process["cwd"] = cwd
        req: dict[str, Any] = {"process": process, "stdin": stdin}
        if pty:
            req["pty"] = {"size": {"cols": pty[0], "rows": pty[1]}}
        headers = {"Content-Type": "application/connect+json", "Keepalive-Ping-Interval": "30"}
        async with self._http.stream("POST", "/process.Process/Start", content=envelope(req),
                                     headers=headers) as r:
            if r.status_code != 200:
                raise _error(r.status_code, await r.aread())
            buf = b""
            async for chunk in r.aiter_bytes():
                buf += chunk
                while len(buf) >= 5:
                    flags, n = struct.unpack(">BI", buf[:5])
                    if len(buf) < 5 + n:
                        break
                    payload, buf = buf[5:5 + n], buf[5 + n:]
                    msg = json.loads(payload or b"{}")
                    if flags & FLAG_END_STREAM:
                        err = msg.get("error")
                        if err:
                            raise EnvdError(str(err.get("code", "unknown")), str(err.get("message", "")))
                        return
                    yield parse_event(msg)
            if buf:
                raise EnvdError("data_loss", "the stream from the sandbox ended in the middle of a message")
            raise EnvdError("unavailable", "the stream from the sandbox ended without an end message "
                                           "(was the sandbox killed?)")

    async def send_input(self, pid: int, data: bytes, *, pty: bool = False) -> None:
        key = "pty" if pty else "stdin"
        await self.unary("process.Process/SendInput",
                         {"process": {"pid": pid}, "input": {key: base64.b64encode(data).decode()}})

    async def close_stdin(self, pid: int) -> None:
        await self.unary("process.Process/CloseStdin", {"process": {"pid": pid}})

    async def resize(self, pid: int, cols: int, rows: int) -> None:
        await self.unary("process.Process/Update",
                         {"process": {"pid": pid}, "pty": {"size": {"cols": cols, "rows": rows}}})

    async def send_signal(self, pid: int, signal: str = "SIGKILL") -> None:
        await self.unary("process.Process/SendSignal", {"process": {"pid": pid}, "signal": f"SIGNAL_{signal}"})


def _error(status: int, body: bytes) -> EnvdError:
    try:
        j = json.loads(body)
        if isinstance(j, dict) and "message" in j:
            return EnvdError(str(j.get("code", status)), str(j["message"]))
    except ValueError:
        pass
    return EnvdError(str(status), body.decode(errors="replace")[:500] or f"HTTP {status}")
