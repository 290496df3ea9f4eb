"""An asyncio client for etcd's v3 API, spoken through etcd's JSON gRPC gateway with httpx.

The cluster keeps its membership, leases and shared state in etcd. We talk to the gateway
(``POST /v3/...`` with JSON bodies) rather than gRPC so that the server needs nothing beyond
httpx, which it already uses. What the gateway does that a caller should know:

- keys and values are base64 in JSON, int64s come back as strings, and fields equal to their
  zero value are left out (a PUT watch event has no ``type``, a failed txn no ``succeeded``,
  a keepalive of a missing lease no ``TTL``); this module turns all of that back into Python.
- errors come as HTTP statuses carrying ``{"error", "message", "code"}`` with the gRPC code:
  ``5`` (not found, e.g. an unknown lease) is 404, ``14`` (unavailable, "no leader") is 503.
- streaming calls (lease keepalive, watch) answer with one JSON object per line in a chunked
  HTTP/1.1 response, each wrapped as ``{"result": ...}`` (or ``{"error": ...}``). The request
  body is the client's side of the stream: after one keepalive request the gateway answers once
  and ends the response; a watch keeps its response open after the body ends, until the
  connection drops or the watch is cancelled (cancelled watches stay open too: we close them).

Endpoints fail over: a connection error, a timeout or a 5xx moves a call to the next endpoint,
and the one that answered is tried first next time. When some endpoint answered 5xx (alive, but
e.g. the cluster is electing a leader: "no leader"), the call goes round again for up to
``election_wait_s``; when none answered, EtcdUnavailable is raised at once. A write that timed out may still have been
applied before it was retried elsewhere: put is harmless to repeat, but a conditional write
(put_if_absent, put_if_revision) retried that way reports False for its own earlier success.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import httpx

RANGE_PAGE = 1000
KEEPALIVE_DRAIN_S = 0.2  # how long a keepalive waits for the end of the gateway's one-answer stream  # keys per request when range() pages through a large prefix
GRPC_NOT_FOUND = 5
GRPC_RETRY_CODES = {2, 4, 13, 14}  # unknown, deadline exceeded, internal, unavailable: try elsewhere
# gRPC metadata (the gateway passes Grpc-Metadata-* headers on) asking the member to refuse a
# request at once when it has no leader (503, so the call moves on to another member) and to
# cancel a watch when it loses its leader, so a member cut off from the others ends our watch
# instead of going quietly silent. Sent with every request.
REQUIRE_LEADER = {"Grpc-Metadata-hasleader": "true"}


class EtcdError(RuntimeError):
    """etcd refused a request (``code`` is the gRPC status code when the gateway gave one)."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class EtcdUnavailable(EtcdError):
    """No endpoint answered. ``endpoints`` were tried; ``last_error`` is what the last one said."""

    def __init__(self, what: str, endpoints: list[str], last_error: str) -> None:
        super().__init__(
            f"etcd unavailable: {what} (tried {', '.join(endpoints)}); last error: {last_error}. "
            "Check that --cluster etcd://host:port,... names the cluster's members and that etcd runs "
            "there (etcdctl --endpoints=... endpoint health)"
        )
        self.endpoints = list(endpoints)
        self.last_error = last_error


class EtcdLeaseNotFound(EtcdError):
    """A put named a lease that does not exist (expired or revoked): grant a new one."""


class EtcdCompacted(EtcdError):
    """A watch's start revision is older than etcd keeps: read the current state again (range)
    and watch from its revision + 1. ``compact_revision`` is the oldest revision still kept."""

    def __init__(self, message: str, compact_revision: int) -> None:
        super().__init__(message)
        self.compact_revision = compact_revision


@dataclass(frozen=True)
class KeyValue:
    """One key as etcd stores it: revisions are the cluster-wide revisions of its creation and
    last change, ``version`` counts its changes since creation, ``lease`` is 0 when it has none."""

    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int

    def json(self) -> Any:
        """The value parsed as JSON."""
        return json.loads(self.value)


@dataclass
class WatchEvent:
    """A change under a watched prefix. For a delete, ``kv`` has the key and the deleting
    revision only (value empty). ``revision`` is the revision that made the change."""

    type: str  # "put" | "delete"
    kv: KeyValue
    revision: int


@dataclass
class EtcdStats:
    """Traffic of one client, for benchmarks ("etcd traffic per create"): every HTTP request
    made (failover attempts included), the JSON bytes sent and received, and requests per
    gateway path (``/v3/kv/put``...). Streams count the lines received so far."""

    requests: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    by_call: dict[str, int] = field(default_factory=dict)

    def reset(self) -> None:
        self.requests = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.by_call = {}


ETCD_URL_FORMS = "etcd://host:port[,host:port...], etcd+https://host:port[,...] or http://host:port[,http://host:port...]"


def parse_etcd_url(url: str) -> list[str]:
    """The base URLs (``http://h:p``) of an etcd cluster given as ``etcd://h1:p1,h2:p2``
    (``etcd+https://`` for TLS, ``etcd+http://`` too), or as one or more comma-separated
    ``http(s)://h:p``. Every member needs its port. ValueError names what is wrong."""
    def bad(why: str) -> ValueError:
        return ValueError(f"bad etcd cluster URL {url!r}: {why}; expected {ETCD_URL_FORMS}")

    if not isinstance(url, str) or not url.strip():
        raise bad("it is empty")
    text = url.strip()
    scheme, sep, rest = text.partition("://")
    if not sep:
        raise bad("no scheme")
    scheme = scheme.lower()
    if scheme in ("etcd", "etcd+http"):
        http_scheme, members = "http", [m.strip() for m in rest.split(",")]
    elif scheme == "etcd+https":
        http_scheme, members = "https", [m.strip() for m in rest.split(",")]
    elif scheme in ("http", "https"):
        http_scheme, members = scheme, []
        for part in (p.strip() for p in text.split(",")):
            s, sep2, hostport = part.partition("://")
            if not sep2 or s.lower() != scheme:
                raise bad(f"member {part!r} is not a {scheme}:// URL like the first")
            members.append(hostport)
    else:
        raise bad(f"unknown scheme {scheme!r}")
    out: list[str] = []
    for member in members:
        member = member.rstrip("/")
        if not member:
            raise bad("an empty member")
        if "/" in member or "?" in member or "#" in member or "@" in member:
            raise bad(f"member {member!r} has more than host:port")
        try:
            parts = urlsplit(f"//{member}")
            host, port = parts.hostname, parts.port
        except ValueError as e:
            raise bad(f"member {member!r}: {e}") from None
        if not host:
            raise bad(f"member {member!r} has no host")
        if port is None or port == 0:
            raise bad(f"member {member!r} has no port")
        host_text = f"[{host}]" if ":" in host else host
        out.append(f"{http_scheme}://{host_text}:{port}")
    return out


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _key_bytes(key: str) -> bytes:
    if not isinstance(key, str):
        raise TypeError(f"etcd keys are str, got {type(key).__name__}: {key!r}")
    return key.encode("utf-8", "surrogateescape")


def _value_bytes(value: bytes | str) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"etcd values are bytes or str, got {type(value).__name__} (json.dumps it first)")


def prefix_range_end(prefix: bytes) -> bytes:
    """The exclusive end of the range of keys starting with ``prefix``: its last byte below 0xff
    plus one, trailing 0xff bytes dropped; ``\\0`` (to the end of the key space) for an empty or
    all-0xff prefix."""
    for i in range(len(prefix) - 1, -1, -1):
        if prefix[i] < 0xFF:
            return prefix[:i] + bytes([prefix[i] + 1])
    return b"\0"


def _int(d: dict[str, Any], name: str) -> int:
    return int(d.get(name) or 0)


def _kv(d: dict[str, Any]) -> KeyValue:
    return KeyValue(
        key=base64.b64decode(d.get("key", "")).decode("utf-8", "surrogateescape"),
        value=base64.b64decode(d.get("value", "")),
        create_revision=_int(d, "create_revision"),
        mod_revision=_int(d, "mod_revision"),
        version=_int(d, "version"),
        lease=_int(d, "lease"),
    )


def _revision(payload: dict[str, Any]) -> int:
    return _int(payload.get("header") or {}, "revision")


def _error_text(payload: Any, fallback: str) -> tuple[str, int | None]:
    """(message, gRPC code) from a gateway error body, unary (``{"error": str, "code": n}``) or
    streamed (``{"error": {"message": str, "grpc_code": n}}``)."""
    if isinstance(payload, dict):
        err = payload.get("error")
        if isinstance(err, dict):
            code = err.get("grpc_code", err.get("code"))
            return str(err.get("message") or fallback), int(code) if code is not None else None
        code = payload.get("code")
        msg = payload.get("message") or err
        if msg:
            return str(msg), int(code) if code is not None else None
    return fallback, None


def _describe(e: BaseException) -> str:
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class _Retry(Exception):
    """An endpoint's answer that sends the call on to the next one (5xx, or a dropped stream)."""

    def __init__(self, text: str, answered: bool) -> None:
        super().__init__(text)
        self.answered = answered


class EtcdClient:
    """One cluster's client: ``async with EtcdClient(parse_etcd_url(url)) as etcd: ...``.
    ``timeout_s`` bounds each HTTP request (a watch only while it connects); ``election_wait_s``
    how long a call keeps going round members that answer but have no leader (after a leader
    dies, the others notice within 1-2 election timeouts, 1 s each by default, then elect one;
    longer on a loaded machine). Safe to share between tasks."""

    def __init__(self, endpoints: list[str], *, timeout_s: float = 2.0, election_wait_s: float = 5.0) -> None:
        if not endpoints:
            raise ValueError("EtcdClient needs at least one endpoint (http://host:port); "
                             "parse_etcd_url('etcd://h:p,...') gives them")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.timeout_s = timeout_s
        self.election_wait_s = election_wait_s
        self.stats = EtcdStats()
        self._preferred = 0
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s),
            headers={"Content-Type": "application/json", **REQUIRE_LEADER},
            # every watch holds a connection for its life: the pool must not run out under them
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=32),
        )

    @property
    def endpoint(self) -> str:
        """The endpoint tried first (the last one that answered)."""
        return self.endpoints[self._preferred]

    # --- transport ---------------------------------------------------------------------------

    def _count(self, path: str, sent: int) -> None:
        self.stats.requests += 1
        self.stats.bytes_sent += sent
        self.stats.by_call[path] = self.stats.by_call.get(path, 0) + 1

    def _order(self) -> list[int]:
        n = len(self.endpoints)
        return [(self._preferred + k) % n for k in range(n)]

    async def _round(self, what: str, attempt: Any) -> Any:
        """Run ``attempt(index)`` on each endpoint in turn until one succeeds; go round again
        (with a short backoff) while some endpoint answered 5xx, up to ``election_wait_s``."""
        started = time.monotonic()
        backoff = 0.05
        last = "no attempt made"
        while True:
            answered = False
            for i in self._order():
                try:
                    result = await attempt(i)
                except _Retry as e:
                    answered = answered or e.answered
                    last = f"{self.endpoints[i]}: {e}"
                    continue
                except httpx.TransportError as e:
                    last = f"{self.endpoints[i]}: {_describe(e)}"
                    continue
                self._preferred = i
                return result
            if not answered or time.monotonic() - started + backoff > self.election_wait_s:
                raise EtcdUnavailable(what, self.endpoints, last)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 0.5)

    @staticmethod
    def _check(path: str, status: int, payload: Any, raw: bytes) -> None:
        """Raise for a non-200 answer: _Retry for 5xx (but 501), EtcdError otherwise."""
        if status == 200:
            return
        fallback = raw[:200].decode("utf-8", "replace") or f"HTTP {status}"
        message, code = _error_text(payload, fallback)
        if status >= 500 and status != 501:
            raise _Retry(f"HTTP {status}: {message}", answered=True)
        if code == GRPC_NOT_FOUND and "lease not found" in message:
            raise EtcdLeaseNotFound(f"etcd {path}: {message}", code)
        raise EtcdError(f"etcd {path}: {message} (HTTP {status}, code {code})", code)

    async def _call(self, path: str, body: dict[str, Any], *, missing_ok: bool = False) -> dict[str, Any]:
        """POST ``body`` to ``path`` on the first endpoint that answers; the JSON answer."""
        data = json.dumps(body, separators=(",", ":")).encode()

        async def attempt(i: int) -> dict[str, Any]:
            self._count(path, len(data))
            resp = await self._http.post(self.endpoints[i] + path, content=data)
            self.stats.bytes_received += len(resp.content)
            try:
                payload = resp.json()
            except ValueError:
                payload = None
            if missing_ok and resp.status_code == 404 and _error_text(payload, "")[1] == GRPC_NOT_FOUND:
                return {}
            self._check(path, resp.status_code, payload, resp.content)
            if not isinstance(payload, dict):
                raise _Retry(f"not a JSON object: {resp.content[:200]!r}", answered=True)
            return payload

        return await self._round(f"no endpoint answered {path}", attempt)

    # --- keys --------------------------------------------------------------------------------

    async def get(self, key: str) -> KeyValue | None:
        """The key, or None when it does not exist."""
        payload = await self._call("/v3/kv/range", {"key": _b64(_key_bytes(key))})
        kvs = payload.get("kvs") or []
        return _kv(kvs[0]) if kvs else None

    async def range(self, prefix: str, *, limit: int = 0) -> list[KeyValue]:
        """Every key starting with ``prefix``, sorted by key; with ``limit`` > 0 the first
        ``limit`` of them. Without a limit, large prefixes are read in pages of RANGE_PAGE keys
        at the revision of the first page, so the result is one consistent snapshot."""
        return (await self.range_with_revision(prefix, limit=limit))[0]

    async def range_with_revision(self, prefix: str, *, limit: int = 0) -> tuple[list[KeyValue], int]:
        """:meth:`range`, and the store's revision it was read at (watch from it + 1 to miss nothing)."""
        if limit < 0:
            raise ValueError(f"limit must be 0 (all) or positive, got {limit}")
        pfx = _key_bytes(prefix)
        start, end = (pfx or b"\0"), prefix_range_end(pfx)
        out: list[KeyValue] = []
        revision = 0
        while True:
            body: dict[str, Any] = {"key": _b64(start), "range_end": _b64(end),
                                    "limit": str(limit or RANGE_PAGE)}
            if revision:
                body["revision"] = str(revision)
            payload = await self._call("/v3/kv/range", body)
            page = [_kv(d) for d in payload.get("kvs") or []]
            out.extend(page)
            revision = revision or _revision(payload)
            if limit or not payload.get("more") or not page:
                return out, revision
            start = _key_bytes(page[-1].key) + b"\0"

    async def latest_mod_revision(self, prefix: str) -> int:
        """The highest ``mod_revision`` of the keys under ``prefix`` (0: none): one key, no value,
        so a cache of the prefix can tell cheaply whether it has seen the latest put."""
        pfx = _key_bytes(prefix)
        payload = await self._call("/v3/kv/range", {
            "key": _b64(pfx or b"\0"), "range_end": _b64(prefix_range_end(pfx)), "limit": "1",
            "sort_order": "DESCEND", "sort_target": "MOD", "keys_only": True})
        kvs = payload.get("kvs") or []
        return _kv(kvs[0]).mod_revision if kvs else 0

    async def count(self, prefix: str) -> int:
        """How many keys start with ``prefix`` (no values are sent)."""
        pfx = _key_bytes(prefix)
        payload = await self._call("/v3/kv/range", {"key": _b64(pfx or b"\0"),
                                                    "range_end": _b64(prefix_range_end(pfx)),
                                                    "count_only": True})
        return _int(payload, "count")

    async def put(self, key: str, value: bytes | str, *, lease: int = 0) -> int:
        """Set the key (attached to ``lease`` if not 0); the revision of the change.
        EtcdLeaseNotFound if the lease is gone."""
        body: dict[str, Any] = {"key": _b64(_key_bytes(key)), "value": _b64(_value_bytes(value))}
        if lease:
            body["lease"] = str(lease)
        return _revision(await self._call("/v3/kv/put", body))

    async def _put_if(self, key: str, value: bytes | str, target: str, field_name: str,
                      revision: int, lease: int) -> bool:
        k = _b64(_key_bytes(key))
        put: dict[str, Any] = {"key": k, "value": _b64(_value_bytes(value))}
        if lease:
            put["lease"] = str(lease)
        body = {"compare": [{"target": target, "result": "EQUAL", "key": k, field_name: str(revision)}],
                "success": [{"request_put": put}]}
        return bool((await self._call("/v3/kv/txn", body)).get("succeeded"))

    async def put_if_absent(self, key: str, value: bytes | str, *, lease: int = 0) -> bool:
        """Create the key only if it does not exist (one txn); whether it was created."""
        return await self._put_if(key, value, "CREATE", "create_revision", 0, lease)

    async def put_if_revision(self, key: str, value: bytes | str, mod_revision: int, *, lease: int = 0) -> bool:
        """Set the key only if its last change was at ``mod_revision`` (0: only if it does not
        exist), i.e. nobody changed it since it was read; whether it was set."""
        if mod_revision < 0:
            raise ValueError(f"mod_revision must be 0 (absent) or a revision, got {mod_revision}")
        return await self._put_if(key, value, "MOD", "mod_revision", mod_revision, lease)

    async def delete(self, key: str) -> int:
        """Delete the key; how many were deleted (0 or 1)."""
        payload = await self._call("/v3/kv/deleterange", {"key": _b64(_key_bytes(key))})
        return _int(payload, "deleted")

    async def delete_prefix(self, prefix: str) -> int:
        """Delete every key starting with ``prefix`` (which must not be empty); how many."""
        pfx = _key_bytes(prefix)
        if not pfx:
            raise ValueError("delete_prefix needs a non-empty prefix (an empty one would delete every key)")
        payload = await self._call("/v3/kv/deleterange", {"key": _b64(pfx), "range_end": _b64(prefix_range_end(pfx))})
        return _int(payload, "deleted")

    # --- leases ------------------------------------------------------------------------------

    async def grant(self, ttl_s: int) -> int:
        """A new lease of ``ttl_s`` seconds; its id. Keys put with it go when it expires."""
        if int(ttl_s) < 1:
            raise ValueError(f"a lease's TTL is at least 1 s, got {ttl_s}")
        payload = await self._call("/v3/lease/grant", {"TTL": str(int(ttl_s))})
        lease_id = _int(payload, "ID")
        if not lease_id:
            message, code = _error_text(payload, f"no lease id in {payload}")
            raise EtcdError(f"etcd /v3/lease/grant: {message}", code)
        return lease_id

    async def keepalive(self, lease_id: int) -> int:
        """Renew the lease once; its TTL again (seconds), or 0 if the lease is gone. The gateway's
        keepalive is a stream: one request is sent, one result read, and the stream closed."""
        path = "/v3/lease/keepalive"
        data = json.dumps({"ID": str(lease_id)}).encode()

        async def attempt(i: int) -> int:
            self._count(path, len(data))
            async with self._http.stream("POST", self.endpoints[i] + path, content=data) as resp:
                if resp.status_code != 200:
                    await self._refuse_stream(path, resp)
                lines = resp.aiter_lines()
                async for line in lines:
                    self.stats.bytes_received += len(line) + 1
                    if not line.strip():
                        continue
                    msg = json.loads(line)
                    if "result" not in msg:
                        message, code = _error_text(msg, line[:200])
                        if code in GRPC_RETRY_CODES:
                            raise _Retry(f"stream error: {message}", answered=True)
                        raise EtcdError(f"etcd {path}: {message}", code)
                    ttl = _int(msg["result"], "TTL")
                    break
                else:
                    raise _Retry("the keepalive stream ended without a result", answered=True)
                # The gateway ends the response right after its one answer: reading to that end
                # (briefly, in case it did not) lets the connection go back to the pool.
                with contextlib.suppress(asyncio.TimeoutError, httpx.HTTPError):
                    await asyncio.wait_for(self._drain(lines), KEEPALIVE_DRAIN_S)
                return ttl

        return await self._round(f"no endpoint answered {path}", attempt)

    async def _refuse_stream(self, path: str, resp: httpx.Response) -> None:
        """A streaming call answered with an error status: read the answer, count it, and raise
        what :meth:`_check` makes of it (a retry on another member, or the error)."""
        raw = await resp.aread()
        self.stats.bytes_received += len(raw)
        try:
            payload = json.loads(raw)
        except ValueError:
            payload = None
        self._check(path, resp.status_code, payload, raw)

    async def _drain(self, lines: AsyncIterator[str]) -> None:
        async for line in lines:
            self.stats.bytes_received += len(line) + 1

    async def revoke(self, lease_id: int) -> None:
        """End the lease now, deleting its keys. A lease already gone is not an error."""
        await self._call("/v3/lease/revoke", {"ID": str(lease_id)}, missing_ok=True)

    async def time_to_live(self, lease_id: int) -> int:
        """The lease's remaining seconds, or -1 if it does not exist (expired or revoked)."""
        payload = await self._call("/v3/lease/timetolive", {"ID": str(lease_id)})
        return int(payload.get("TTL", -1))

    # --- watch -------------------------------------------------------------------------------

    async def watch(self, prefix: str, *, start_revision: int = 0) -> AsyncIterator[WatchEvent]:
        """The changes to keys under ``prefix``, in revision order, from ``start_revision`` (0:
        from when the stream opens, which is only when iteration starts; pass the revision of a
        read + 1 to miss nothing after it). One long-lived streaming POST.

        The iteration never ends by itself: when the connection drops, the stream ends, or the
        member loses its leader, it raises EtcdUnavailable (also when no endpoint takes the
        watch); re-watch from the last event's ``revision + 1``. EtcdCompacted when
        ``start_revision`` is older than etcd keeps. Breaking out leaves the stream to be closed
        when the generator is; use ``contextlib.aclosing(client.watch(...))`` to close it at once.
        """
        path = "/v3/watch"
        pfx = _key_bytes(prefix)
        create: dict[str, Any] = {"key": _b64(pfx or b"\0"), "range_end": _b64(prefix_range_end(pfx))}
        if start_revision:
            create["start_revision"] = str(start_revision)
        data = json.dumps({"create_request": create}).encode()
        timeout = httpx.Timeout(self.timeout_s, read=None)

        async def attempt(i: int) -> httpx.Response:
            self._count(path, len(data))
            req = self._http.build_request("POST", self.endpoints[i] + path, content=data, timeout=timeout)
            resp = await self._http.send(req, stream=True)
            if resp.status_code != 200:
                try:
                    await self._refuse_stream(path, resp)
                finally:
                    await resp.aclose()
            return resp

        resp: httpx.Response = await self._round(f"no endpoint took the watch on {prefix!r}", attempt)
        endpoint = str(resp.request.url).removesuffix(path)
        last = start_revision - 1 if start_revision else 0
        try:
            async for line in resp.aiter_lines():
                self.stats.bytes_received += len(line) + 1
                if not line.strip():
                    continue
                msg = json.loads(line)
                result = msg.get("result")
                if result is None:
                    message, code = _error_text(msg, line[:200])
                    raise EtcdUnavailable(f"the watch on {prefix!r} failed at {endpoint}: {message}",
                                          [endpoint], f"code {code}: {message}")
                if result.get("canceled"):
                    compacted = _int(result, "compact_revision")
                    if compacted:
                        raise EtcdCompacted(f"etcd watch on {prefix!r} from revision {start_revision}: "
                                            f"compacted up to {compacted}; read again and watch from there",
                                            compacted)
                    reason = result.get("cancel_reason") or "cancelled by the server"
                    raise EtcdUnavailable(f"the watch on {prefix!r} was cancelled at {endpoint}: {reason}",
                                          [endpoint], reason)
                for ev in result.get("events") or []:
                    kv = _kv(ev.get("kv") or {})
                    last = kv.mod_revision
                    yield WatchEvent(type="delete" if ev.get("type") == "DELETE" else "put",
                                     kv=kv, revision=kv.mod_revision)
            raise EtcdUnavailable(f"the watch on {prefix!r} ended at {endpoint} (last revision {last})",
                                  [endpoint], "the stream ended")
        except httpx.TransportError as e:
            raise EtcdUnavailable(f"the watch on {prefix!r} dropped at {endpoint} (last revision {last})",
                                  [endpoint], _describe(e)) from e
        finally:
            await resp.aclose()

    # --- cluster -----------------------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        """The answering member's status for ``trenvx doctor``: endpoint, version, member_id,
        leader, dbSize, dbSizeInUse, raftTerm, raftIndex, raftAppliedIndex, isLearner, errors."""
        payload = await self._call("/v3/maintenance/status", {})
        header = payload.get("header") or {}
        out: dict[str, Any] = {"endpoint": self.endpoint, "version": payload.get("version", ""),
                               "member_id": _int(header, "member_id"),
                               "isLearner": bool(payload.get("isLearner")),
                               "errors": list(payload.get("errors") or [])}
        for name in ("leader", "dbSize", "dbSizeInUse", "raftTerm", "raftIndex", "raftAppliedIndex"):
            out[name] = _int(payload, name)
        return out

    async def members(self) -> list[dict[str, Any]]:
        """The cluster's members by name: id, name, clientURLs, peerURLs, isLearner (a member
        that has not started yet has no name and no clientURLs)."""
        payload = await self._call("/v3/cluster/member/list", {})
        members = [{"id": _int(m, "ID"), "name": m.get("name", ""), "clientURLs": list(m.get("clientURLs") or []),
                    "peerURLs": list(m.get("peerURLs") or []), "isLearner": bool(m.get("isLearner"))}
                   for m in payload.get("members") or []]
        return sorted(members, key=lambda m: (m["name"], m["id"]))

    # --- lifecycle ---------------------------------------------------------------------------

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "EtcdClient":
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()
