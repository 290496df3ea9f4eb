"""The sandbox's DNS resolver: a forwarder that answers only the names its egress rules allow.

A guest resolves through ``10.0.2.3:53`` (QEMU's user-networking address for the resolver, kept
in the snapshot, so every clone uses it). In ``netns`` mode the slot core binds a UDP socket to
that address inside the sandbox's network namespace and hands it to a :class:`DnsForwarder`,
which runs in the server's event loop in the host's namespace. Per query it:

1. parses the header and the question (stdlib only, strictly: exactly one question, no answer or
   authority records, at most one additional record and that one EDNS's OPT; anything else is
   answered FORMERR, or dropped when not even the header is there or it is not a query);
2. asks ``policy().dns_allowed(qname)`` (the rules are read per query: ``PUT /network`` changes
   them at runtime);
3. refused: answers REFUSED itself; no upstream ever sees the query, so a sandbox without egress
   cannot tunnel data out in query names (a sandbox whose rules let it reach a public resolver
   directly can, as on E2B: the rules, not this forwarder, decide that);
4. allowed: sends the raw query, under a fresh random transaction id, from a fresh socket with a
   random port made inside the sandbox's namespace (``upstream_socket``: the operator's blocked
   ranges apply, and the host's own resolver, which knows the host's LAN names, is out of reach),
   to every upstream (``[network] dns_upstreams``, public resolvers by default); the first answer that comes from an upstream's address with that id
   and the same question wins and goes back to the client with the client's id. No answer in
   ``timeout`` seconds: SERVFAIL.

At most ``max_inflight`` forwarded queries are pending per forwarder; beyond that a query is
dropped (the client retries), so a sandbox cannot make the host hold unbounded memory or sockets.

Only UDP is served. An answer too large for the client's UDP size comes back truncated (TC) as the
upstream sent it; a client retrying over TCP finds nothing listening and uses the truncated answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .policy import EgressPolicy

log = logging.getLogger(__name__)

DNS_PORT = 53
YIELD_EVERY = 32
"""Datagrams served before the reader yields to the event loop."""
MAX_UDP = 65535
HEADER = struct.Struct("!HHHHHH")

# Header flag bits and response codes (RFC 1035 4.1.1).
QR = 0x8000
OPCODE_MASK = 0x7800
RD = 0x0100
RA = 0x0080
RCODE_FORMERR = 1
RCODE_SERVFAIL = 2
RCODE_NOTIMP = 4
RCODE_REFUSED = 5
TYPE_OPT = 41

_NAME_BYTES = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_*")


class DnsFormatError(ValueError):
    """A packet that has a header but is not a well-formed single-question query."""


@dataclass(frozen=True)
class DnsQuery:
    """The parts of a query the forwarder decides on and answers with."""

    id: int
    flags: int
    qname: str
    """Lowercase, dot-separated, no trailing dot (the root is ``""``); a byte outside letters,
    digits, ``-``, ``_`` and ``*`` is written ``\\DDD`` as in zone files, so that a label holding a
    dot can never pass for two labels when matched against the rules."""
    qtype: int
    qclass: int
    question: bytes
    """The question section as sent (name, type, class), echoed in local answers."""

    @property
    def opcode(self) -> int:
        return (self.flags & OPCODE_MASK) >> 11


def _name_text(labels: list[bytes]) -> str:
    out = []
    for label in labels:
        out.append("".join(chr(b).lower() if b in _NAME_BYTES else f"\\{b:03d}" for b in label))
    return ".".join(out)


def parse_query(packet: bytes) -> DnsQuery | None:
    """The query in ``packet``; None when it is too short for a header or is not a query (a
    response, which must never be answered); :class:`DnsFormatError` when it has a query's header
    but is not exactly one question plus at most an EDNS OPT record. Never raises anything else."""
    if len(packet) < HEADER.size:
        return None
    qid, flags, qdcount, ancount, nscount, arcount = HEADER.unpack_from(packet)
    if flags & QR:
        return None
    if qdcount != 1 or ancount or nscount or arcount > 1:
        raise DnsFormatError(f"counts qd={qdcount} an={ancount} ns={nscount} ar={arcount}")
    pos = HEADER.size
    labels: list[bytes] = []
    wire_len = 0
    while True:
        if pos >= len(packet):
            raise DnsFormatError("question name runs past the end")
        n = packet[pos]
        if n & 0xC0:
            raise DnsFormatError("compressed or extended label in the question")
        pos += 1
        wire_len += n + 1
        if wire_len > 255:
            raise DnsFormatError("name longer than 255 bytes")
        if n == 0:
            break
        if pos + n > len(packet):
            raise DnsFormatError("label runs past the end")
        labels.append(packet[pos:pos + n])
        pos += n
    if pos + 4 > len(packet):
        raise DnsFormatError("question without type and class")
    qtype, qclass = struct.unpack_from("!HH", packet, pos)
    pos += 4
    question = packet[HEADER.size:pos]
    if arcount:
        # EDNS(0) OPT: root name, type 41, class (UDP size), TTL (flags), rdlength, rdata.
        if pos + 11 > len(packet) or packet[pos] != 0:
            raise DnsFormatError("additional record is not an OPT record")
        rtype, _cls, _ttl, rdlen = struct.unpack_from("!HHIH", packet, pos + 1)
        if rtype != TYPE_OPT:
            raise DnsFormatError("additional record is not an OPT record")
        pos += 11 + rdlen
        if pos > len(packet):
            raise DnsFormatError("OPT record runs past the end")
    if pos != len(packet):
        raise DnsFormatError("trailing bytes after the query")
    return DnsQuery(id=qid, flags=flags, qname=_name_text(labels), qtype=qtype, qclass=qclass, question=question)


def error_reply(packet: bytes, rcode: int, question: bytes = b"") -> bytes:
    """A response to the query ``packet`` (at least a header) with ``rcode``: its id, opcode and RD
    copied, RA set, the ``question`` echoed (empty for FORMERR, whose question is not trusted)."""
    qid, flags = struct.unpack_from("!HH", packet)
    out_flags = QR | (flags & (OPCODE_MASK | RD)) | RA | (rcode & 0xF)
    return HEADER.pack(qid, out_flags, 1 if question else 0, 0, 0, 0) + question


def answers_question(reply: bytes, upstream_id: int, question: bytes) -> bool:
    """Is ``reply`` a response with ``upstream_id`` to the question ``question`` (names compared
    without case, since resolvers may echo 0x20-randomised case differently)?"""
    if len(reply) < HEADER.size + len(question):
        return False
    rid, flags, qdcount = struct.unpack_from("!HHH", reply)
    if rid != upstream_id or not flags & QR or qdcount != 1:
        return False
    return reply[HEADER.size:HEADER.size + len(question)].lower() == question.lower()


class DnsForwarder:
    """Answers a sandbox's DNS queries on ``sock`` by its egress rules (see the module docstring).

    ``sock`` is a bound UDP socket (made non-blocking here); the forwarder owns it from
    :meth:`start` on and closes it in :meth:`aclose`. ``policy`` is called for every query.
    ``upstreams`` are ``(ip, port)`` pairs reachable from the host's namespace."""

    def __init__(
        self,
        sock: socket.socket,
        policy: Callable[[], EgressPolicy],
        upstreams: list[tuple[str, int]],
        *,
        timeout: float = 2.0,
        max_inflight: int = 64,
        name: str = "",
        upstream_socket: Callable[[], Awaitable[socket.socket]] | None = None,
    ) -> None:
        self.sock = sock
        self.upstream_socket = upstream_socket
        """Makes the UDP socket a query is forwarded from (the slot's: inside its namespace, so that
        the operator's blocked ranges apply and the host's own resolver and names stay out of
        reach); None: a socket of this process's namespace (tests)."""
        self.policy = policy
        self.upstreams = [(str(h), int(p)) for h, p in upstreams]
        self.timeout = timeout
        self.max_inflight = max_inflight
        self.name = name or "dns"
        self._reader: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self._closed = False
        self.stats = {"forwarded": 0, "refused": 0, "formerr": 0, "servfail": 0, "dropped": 0}
        """Counters since start, for logs and tests."""

    async def start(self) -> None:
        """Start answering queries on the socket."""
        if self._closed:
            raise RuntimeError("DnsForwarder is closed")
        if self._reader is None:
            self.sock.setblocking(False)
            self._reader = asyncio.get_running_loop().create_task(self._serve(), name=f"{self.name}-reader")

    async def aclose(self) -> None:
        """Stop: cancel pending queries, close their sockets and the listening socket. Idempotent."""
        if self._closed:
            return
        self._closed = True
        tasks = [t for t in (self._reader, *self._inflight) if t is not None]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._inflight.clear()
        self.sock.close()

    async def __aenter__(self) -> "DnsForwarder":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- serving ---------------------------------------------------------------------------

    def _reply(self, data: bytes, client: tuple[str, int]) -> None:
        """Send ``data`` to ``client`` without waiting: a full socket buffer drops the answer."""
        try:
            self.sock.sendto(data, client)
        except OSError as e:
            log.debug("%s: answer to %s dropped: %s", self.name, client, e)

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        served = 0
        while True:
            served += 1
            if served % YIELD_EVERY == 0:
                # sock_recvfrom returns without yielding while datagrams are queued: a guest that
                # floods its resolver must not starve the server's other work (measured: 100,000
                # datagrams read while a competing task ran once).
                await asyncio.sleep(0)
            try:
                packet, client = await loop.sock_recvfrom(self.sock, MAX_UDP)
            except asyncio.CancelledError:
                raise
            except OSError as e:  # e.g. ECONNREFUSED from an earlier ICMP error: keep serving
                if self.sock.fileno() == -1:
                    return
                log.debug("%s: recvfrom: %s", self.name, e)
                continue
            try:
                self._handle(packet, client)
            except Exception:  # a bug must not stop the resolver of a running sandbox
                log.exception("%s: query from %s", self.name, client)

    def _handle(self, packet: bytes, client: tuple[str, int]) -> None:
        try:
            query = parse_query(packet)
        except DnsFormatError as e:
            self.stats["formerr"] += 1
            log.debug("%s: FORMERR to %s: %s", self.name, client, e)
            self._reply(error_reply(packet, RCODE_FORMERR), client)
            return
        if query is None:
            self.stats["dropped"] += 1
            return
        if query.opcode != 0:
            self._reply(error_reply(packet, RCODE_NOTIMP, query.question), client)
            return
        if not self.policy().dns_allowed(query.qname):
            self.stats["refused"] += 1
            log.debug("%s: %r type %d refused by the egress rules", self.name, query.qname, query.qtype)
            self._reply(error_reply(packet, RCODE_REFUSED, query.question), client)
            return
        if len(self._inflight) >= self.max_inflight:
            self.stats["dropped"] += 1
            log.debug("%s: %d queries in flight, %r dropped", self.name, len(self._inflight), query.qname)
            return
        task = asyncio.get_running_loop().create_task(self._forward(packet, query, client))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _forward(self, packet: bytes, query: DnsQuery, client: tuple[str, int]) -> None:
        """Ask every upstream, relay the first matching answer with the client's id, else SERVFAIL."""
        upstream_id = int.from_bytes(os.urandom(2), "big")
        out = struct.pack("!H", upstream_id) + packet[2:]
        answer = None
        try:
            raw = await self.upstream_socket() if self.upstream_socket else socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            with raw as up:
                up.setblocking(False)
                up.bind(("0.0.0.0", 0))
                sent = 0
                for addr in self.upstreams:
                    with contextlib.suppress(OSError):
                        up.sendto(out, addr)
                        sent += 1
                if sent:
                    answer = await asyncio.wait_for(self._first_answer(up, upstream_id, query.question), self.timeout)
        except (TimeoutError, OSError) as e:
            log.debug("%s: %r: no answer from %s: %s", self.name, query.qname, self.upstreams, e or "timeout")
        if answer is None:
            self.stats["servfail"] += 1
            self._reply(error_reply(packet, RCODE_SERVFAIL, query.question), client)
            return
        self.stats["forwarded"] += 1
        self._reply(struct.pack("!H", query.id) + answer[2:], client)

    async def _first_answer(self, up: socket.socket, upstream_id: int, question: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        sources = set(self.upstreams)
        while True:
            try:
                reply, src = await loop.sock_recvfrom(up, MAX_UDP)
            except ConnectionRefusedError:  # ICMP port unreachable from one upstream: wait for the others
                continue
            if src[:2] in sources and answers_question(reply, upstream_id, question):
                return reply
