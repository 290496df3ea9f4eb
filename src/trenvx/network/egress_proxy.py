"""The egress proxy: domain rules (``allowOut: ["example.com", "*.example.com"]``) on TCP connections.

A sandbox's egress rules allow IPs and CIDRs, which nftables enforces in the sandbox's network
namespace, and domains, which no packet filter can see. When a policy has allowed domains, the
slot core's nftables rules REDIRECT the guest's TCP connections to denied IPs to this proxy's
listening socket inside the namespace. For each such connection the proxy:

1. finds where the guest meant to go (``SO_ORIGINAL_DST``, see :func:`original_dst`);
2. refuses it outright when that is the proxy itself, the guest's network (``10.0.2.0/24``),
   loopback, ``0.0.0.0/8`` or any network given in ``forbidden`` (the operator's blocked ranges);
3. passes it at once when ``policy().ip_allowed(ip)`` (the rules changed since nftables
   redirected it); else reads the client's first bytes (up to 16 KiB, for up to 10 s, kept for the
   upstream) and takes the name they carry: the SNI of a TLS ClientHello (which may be spread over
   several reads and records) or the ``Host`` of an HTTP/1.x request (:func:`sniff`);
4. passes it when ``policy().domain_allowed(name)``, else resets it;
5. connects, with the slot core's ``connect`` (a socket made inside the namespace), to the
   *original* IP and port, never to an address the name resolves to: the guest chose the IP and
   the name only gates it, as in E2B. Then it sends the buffered bytes and splices both ways,
   passing a half-close on as a half-close, until both sides are done.

The name is the one in the connection's first request or ClientHello, as in E2B: later requests
on a kept-alive HTTP connection are not looked at, and a TLS client using Encrypted Client Hello is
judged by its outer (public) name. An ambiguous first request (two ``Host`` headers, two SNI
extensions, a ``Host`` that differs from an absolute URI's) names nothing and is refused.

At most ``max_connections`` connections are served at once; more are reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import socket
import struct
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from .policy import EgressPolicy

log = logging.getLogger(__name__)

SO_ORIGINAL_DST = 80
"""``linux/netfilter_ipv4.h``: the pre-NAT destination of a conntracked IPv4 connection."""

SNIFF_LIMIT = 16 * 1024
DEFAULT_FORBIDDEN = (
    ipaddress.IPv4Network("10.0.2.0/24"),
    ipaddress.IPv4Network("127.0.0.0/8"),
    ipaddress.IPv4Network("0.0.0.0/8"),
)
"""Never connected to, whatever the rules: the guest's own network (the guest, the proxy, the
resolver), loopback, and "this network"."""

_HOSTNAME = re.compile(r"^[a-z0-9_-]+(\.[a-z0-9_-]+)*$")


# -- first bytes: TLS ClientHello SNI, HTTP/1.x Host ----------------------------------------------


@dataclass(frozen=True)
class Sniff:
    """What a connection's first bytes say. ``more``: not enough bytes yet to tell; ``tls``: a
    complete ClientHello; ``http``: a complete HTTP/1.x request head; ``other``: neither, or
    malformed or ambiguous. ``name`` is the SNI or Host (lowercase, no port, no trailing dot) when
    there is exactly one valid one."""

    kind: Literal["more", "tls", "http", "other"]
    name: str | None = None


MORE = Sniff("more")
OTHER = Sniff("other")


def clean_hostname(raw: str) -> str | None:
    """``raw`` as a lowercase host name without trailing dot, or None if it is not one."""
    name = raw.strip().lower()
    if name.endswith("."):
        name = name[:-1]
    if not name or len(name) > 253 or not _HOSTNAME.match(name):
        return None
    return name


class _Truncated(Exception):
    pass


class _Reader:
    """Bounds-checked big-endian reads over a complete handshake message."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise _Truncated
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def vector(self, len_bytes: int) -> bytes:
        return self.take(self.uint(len_bytes))

    @property
    def done(self) -> bool:
        return self.pos >= len(self.data)


def _client_hello_sni(body: bytes) -> Sniff:
    """The SNI of a complete ClientHello message body (after the 4-byte handshake header)."""
    r = _Reader(body)
    try:
        if r.uint(1) != 3:  # legacy_version major
            return OTHER
        r.take(1 + 32)  # minor, random
        if len(r.vector(1)) > 32:  # legacy_session_id
            return OTHER
        r.vector(2)  # cipher_suites
        r.vector(1)  # legacy_compression_methods
        if r.done:  # no extensions (SSL 3.0-style hello): no SNI
            return Sniff("tls")
        exts = _Reader(r.vector(2))
        if not r.done:
            return OTHER
        name: str | None = None
        seen_sni = False
        while not exts.done:
            ext_type = exts.uint(2)
            ext = exts.vector(2)
            if ext_type != 0:
                continue
            if seen_sni:
                return OTHER  # two server_name extensions: which one would the server use?
            seen_sni = True
            names = _Reader(ext)
            entries = _Reader(names.vector(2))
            if not names.done:
                return OTHER
            found: list[bytes] = []
            while not entries.done:
                name_type = entries.uint(1)
                value = entries.vector(2)
                if name_type == 0:
                    found.append(value)
            if len(found) != 1:
                return OTHER
            try:
                name = clean_hostname(found[0].decode("ascii"))
            except UnicodeDecodeError:
                name = None
            if name is None:
                return OTHER
        return Sniff("tls", name)
    except _Truncated:
        return OTHER


def parse_client_hello(data: bytes) -> Sniff:
    """Sniff a TLS ClientHello from a connection's first bytes, which may hold it only in part, in
    any number of handshake records. Never raises."""
    handshake = bytearray()
    pos = 0
    while True:
        header = data[pos:pos + 5]
        if len(header) >= 1 and header[0] != 0x16:
            # A record that is not a handshake before the ClientHello is complete.
            return OTHER
        if len(header) >= 2 and header[1] != 3:
            return OTHER
        if len(header) < 5:
            break
        length = int.from_bytes(header[3:5], "big")
        if length == 0 or length > 16384 + 2048:
            return OTHER
        fragment = data[pos + 5:pos + 5 + length]
        handshake += fragment
        pos += 5 + len(fragment)
        if len(handshake) >= 4:
            if handshake[0] != 1:  # not a ClientHello
                return OTHER
            msg_len = int.from_bytes(handshake[1:4], "big")
            if len(handshake) >= 4 + msg_len:
                return _client_hello_sni(bytes(handshake[4:4 + msg_len]))
        if len(fragment) < length:
            break  # the record itself is not all there yet
    if handshake[:1] not in (b"", b"\x01"):
        return OTHER
    return MORE


_TOKEN = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_REQUEST_LINE = re.compile(rb"^([A-Z]{1,20}) ([\x21-\x7e]+) HTTP/1\.[01]$")
_PARTIAL_REQUEST_LINE = re.compile(rb"^[A-Z]{1,20}(?: [\x21-\x7e]*(?: [A-Z0-9/.]{0,8})?)?\r?$")
_ABSOLUTE_URI = re.compile(rb"^[hH][tT][tT][pP][sS]?://([^/?#]*)")


def _host_of(authority: str) -> str | None:
    """The host of an HTTP authority (``Host`` value or absolute URI's), port and userinfo dropped."""
    authority = authority.strip().rpartition("@")[2]
    if authority.startswith("["):  # an IPv6 literal, no name
        return None
    host, colon, port = authority.partition(":")
    if colon and not port.isdigit() and port != "":
        return None
    return clean_hostname(host)


def parse_http_host(data: bytes) -> Sniff:
    """Sniff an HTTP/1.x request head from a connection's first bytes. Never raises."""
    end_line = data.find(b"\n")
    if end_line < 0:
        return MORE if _PARTIAL_REQUEST_LINE.match(data) else OTHER
    request_line = data[:end_line].rstrip(b"\r")
    m = _REQUEST_LINE.match(request_line)
    if not m:
        return OTHER
    ends = [i for i in (data.find(b"\r\n\r\n", end_line - 1), data.find(b"\n\n", end_line)) if i >= 0]
    if not ends:
        return MORE
    head = data[end_line + 1:min(ends)]
    hosts: list[str] = []
    for raw in head.split(b"\n") if head.strip(b"\r\n") else []:
        line = raw.rstrip(b"\r")
        if not line:
            continue
        if line[:1] in (b" ", b"\t"):
            return OTHER  # obsolete line folding: ambiguous
        field, colon, value = line.partition(b":")
        if not colon or not _TOKEN.match(field):
            return OTHER
        if field.lower() == b"host":
            try:
                hosts.append(value.decode("ascii").strip())
            except UnicodeDecodeError:
                return OTHER
    if len(hosts) > 1:
        return OTHER
    host = _host_of(hosts[0]) if hosts else None
    if hosts and host is None:
        return OTHER
    absolute = _ABSOLUTE_URI.match(m.group(2))
    if absolute:
        uri_host = _host_of(absolute.group(1).decode("ascii"))
        if uri_host is None or (host is not None and uri_host != host):
            return OTHER
        host = uri_host
    return Sniff("http", host)


def sniff(data: bytes) -> Sniff:
    """What a connection's first bytes name: TLS ClientHello SNI or HTTP/1.x Host. Never raises."""
    if not data:
        return MORE
    if data[0] == 0x16:
        return parse_client_hello(data)
    return parse_http_host(data)


# -- the proxy -----------------------------------------------------------------------------------


def original_dst(sock: socket.socket) -> tuple[str, int]:
    """The destination ``(ip, port)`` the client connected to before nftables redirected it
    (``getsockopt(SOL_IP, SO_ORIGINAL_DST)``; :class:`OSError` if the connection has no
    conntrack entry)."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, packed = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(packed), port


def _reset(sock: socket.socket) -> None:
    """Close ``sock`` with an RST (linger 0), so a refused client fails at once."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class EgressProxy:
    """Serves the connections redirected to ``listener`` by the rules of ``policy`` (see the
    module docstring).

    ``listener`` is a listening TCP socket (made non-blocking here; the proxy owns it from
    :meth:`start` and closes it in :meth:`aclose`). ``connect(ip, port)`` returns a connected
    non-blocking socket from inside the sandbox's namespace. ``original_dst`` is injectable for
    tests. ``forbidden`` adds networks never to connect to (e.g. the operator's blocked ranges)."""

    def __init__(
        self,
        listener: socket.socket,
        policy: Callable[[], EgressPolicy],
        connect: Callable[[str, int], Awaitable[socket.socket]],
        *,
        name: str = "",
        original_dst: Callable[[socket.socket], tuple[str, int]] = original_dst,
        forbidden: Iterable[str | ipaddress.IPv4Network] = (),
        max_connections: int = 128,
        sniff_timeout: float = 10.0,
        sniff_limit: int = SNIFF_LIMIT,
        connect_timeout: float = 10.0,
    ) -> None:
        self.listener = listener
        self.policy = policy
        self.connect = connect
        self.name = name or "egress"
        self.original_dst = original_dst
        self.forbidden = DEFAULT_FORBIDDEN + tuple(ipaddress.IPv4Network(n) for n in forbidden)
        self.max_connections = max_connections
        self.sniff_timeout = sniff_timeout
        self.sniff_limit = sniff_limit
        self.connect_timeout = connect_timeout
        self._own: tuple[str, int] | None = None
        self._acceptor: asyncio.Task[None] | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self._closed = False
        self.stats = {"allowed": 0, "refused": 0, "failed": 0, "over_limit": 0}
        self._live: dict[asyncio.Task[None], tuple[str, str | None]] = {}
        """Spliced connections: their task, original IP and the allowed name they gave (if any)."""
        """Counters since start, for logs and tests."""

    @property
    def active(self) -> int:
        """Connections being sniffed or spliced now."""
        return len(self._conns)

    async def start(self) -> None:
        """Start accepting on the listener."""
        if self._closed:
            raise RuntimeError("EgressProxy is closed")
        if self._acceptor is None:
            self.listener.setblocking(False)
            host, port = self.listener.getsockname()[:2]
            self._own = (host, port)
            self._acceptor = asyncio.get_running_loop().create_task(self._accept(), name=f"{self.name}-accept")

    async def aclose(self) -> None:
        """Stop accepting, reset every open connection, close the listener. Idempotent."""
        if self._closed:
            return
        self._closed = True
        tasks = [t for t in (self._acceptor, *self._conns) if t is not None]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._conns.clear()
        self.listener.close()

    async def __aenter__(self) -> "EgressProxy":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def is_forbidden(self, ip: str, port: int) -> bool:
        """Is ``ip:port`` the proxy itself or in a network never connected to?"""
        try:
            addr = ipaddress.IPv4Address(ip)
        except ValueError:
            return True
        if self._own is not None and (ip, port) == self._own:
            return True
        return any(addr in n for n in self.forbidden)

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        over_limit = False
        while True:
            try:
                client, _ = await loop.sock_accept(self.listener)
            except asyncio.CancelledError:
                raise
            except OSError as e:  # EMFILE, ENOBUFS, ...: do not spin
                log.warning("%s: accept: %s", self.name, e)
                await asyncio.sleep(0.1)
                continue
            if len(self._conns) >= self.max_connections:
                self.stats["over_limit"] += 1
                if not over_limit:  # once per episode, not once per connection
                    log.warning("%s: %d connections open: new ones are reset", self.name, len(self._conns))
                over_limit = True
                _reset(client)
                continue
            over_limit = False
            task = loop.create_task(self._serve(client))
            self._conns.add(task)
            task.add_done_callback(self._conns.discard)

    async def _read_name(self, client: socket.socket) -> tuple[bytes, Sniff, str]:
        """The client's first bytes, what they name, and why sniffing stopped when they name nothing."""
        loop = asyncio.get_running_loop()
        buf = b""
        deadline = loop.time() + self.sniff_timeout
        while len(buf) < self.sniff_limit:
            try:
                async with asyncio.timeout_at(deadline):
                    chunk = await loop.sock_recv(client, self.sniff_limit - len(buf))
            except TimeoutError:
                return buf, OTHER, f"nothing conclusive in {self.sniff_timeout:g}s"
            if not chunk:
                return buf, OTHER, "closed before naming a host"
            buf += chunk
            result = sniff(buf)
            if result.kind != "more":
                return buf, result, "" if result.name else f"{result.kind}, no valid name"
        return buf, OTHER, f"no name in the first {self.sniff_limit} bytes"

    async def _serve(self, client: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        upstream: socket.socket | None = None
        spliced = False
        try:
            try:
                ip, port = self.original_dst(client)
            except OSError as e:
                self.stats["refused"] += 1
                log.info("%s: connection without an original destination refused: %s", self.name, e)
                return
            if self.is_forbidden(ip, port):
                self.stats["refused"] += 1
                log.info("%s: %s:%d refused: never reachable through the proxy", self.name, ip, port)
                return
            buf = b""
            name: str | None = None
            if self.policy().ip_allowed(ip):
                why = "its IP is allowed"
            else:
                buf, result, note = await self._read_name(client)
                policy = self.policy()
                if policy.ip_allowed(ip):
                    why = "its IP is allowed"
                elif result.name is not None and policy.domain_allowed(result.name):
                    why = f"{'SNI' if result.kind == 'tls' else 'Host'} {result.name} is allowed"
                    name = result.name
                else:
                    self.stats["refused"] += 1
                    if result.name is not None:
                        note = f"{'SNI' if result.kind == 'tls' else 'Host'} {result.name} is not allowed"
                    log.info("%s: %s:%d refused: %s", self.name, ip, port, note)
                    return
            try:
                async with asyncio.timeout(self.connect_timeout):
                    upstream = await self.connect(ip, port)
            except (OSError, TimeoutError) as e:
                self.stats["failed"] += 1
                log.info("%s: %s:%d allowed (%s) but the connection failed: %s", self.name, ip, port, why,
                         e or "timeout")
                return
            upstream.setblocking(False)
            self.stats["allowed"] += 1
            log.info("%s: %s:%d allowed: %s", self.name, ip, port, why)
            me = asyncio.current_task()
            if me is not None:
                self._live[me] = (ip, name)
            if buf:
                await loop.sock_sendall(upstream, buf)
            spliced = await self._splice(client, upstream)
        except OSError as e:
            log.debug("%s: connection ended: %s", self.name, e)
        except Exception:  # a bug (or a connector's) must not go unnoticed, nor leak the sockets
            log.exception("%s: connection failed", self.name)
        finally:
            self._live.pop(asyncio.current_task(), None)  # type: ignore[arg-type]
            if spliced:
                client.close()
            else:
                _reset(client)
            if upstream is not None:
                if spliced:
                    upstream.close()
                else:
                    _reset(upstream)

    def recheck(self) -> int:
        """Reset the connections the current rules no longer allow (called when they change);
        how many were reset."""
        policy = self.policy()
        cut = 0
        for task, (ip, name) in list(self._live.items()):
            if policy.ip_allowed(ip) or (name is not None and policy.domain_allowed(name)):
                continue
            task.cancel()
            cut += 1
        if cut:
            log.info("%s: %d connections reset: the new rules no longer allow them", self.name, cut)
        return cut

    async def _splice(self, a: socket.socket, b: socket.socket) -> bool:
        """Copy both ways until both directions have ended; True when both ended cleanly (EOF
        passed on as a half-close), False when one side failed (then both are reset)."""
        loop = asyncio.get_running_loop()

        async def pipe(src: socket.socket, dst: socket.socket) -> None:
            chunks = 0
            while data := await loop.sock_recv(src, 65536):
                await loop.sock_sendall(dst, data)
                chunks += 1
                if chunks % 16 == 0:  # both calls can complete without yielding: let other tenants run
                    await asyncio.sleep(0)
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

        tasks = [loop.create_task(pipe(a, b)), loop.create_task(pipe(b, a))]
        try:
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return all(not t.cancelled() and t.exception() is None for t in done) and not pending
