"""The sandbox's DNS forwarder on loopback: names the egress rules allow are forwarded to the
upstreams and their answers relayed with the client's id; other names get REFUSED without any
upstream seeing them; malformed queries get FORMERR or nothing; the parser never raises."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trenvx.network.dns import (
    RCODE_FORMERR,
    RCODE_REFUSED,
    RCODE_SERVFAIL,
    DnsFormatError,
    DnsForwarder,
    error_reply,
    parse_query,
)
from trenvx.network.policy import DEFAULT_POLICY, NO_EGRESS, EgressPolicy

ONLY_EXAMPLE = EgressPolicy.from_e2b(deny_out=["0.0.0.0/0"], allow_out=["*.example.com", "example.org"])


def encode_name(name: str) -> bytes:
    return b"".join(bytes([len(p)]) + p.encode() for p in name.split(".") if p) + b"\x00"


def query(name: str, qid: int = 0x1234, qtype: int = 1, *, opt: bool = False, flags: int = 0x0100) -> bytes:
    """A standard query (RD set), optionally with an EDNS(0) OPT record."""
    packet = struct.pack("!HHHHHH", qid, flags, 1, 0, 0, 1 if opt else 0) + encode_name(name) + struct.pack("!HH", qtype, 1)
    if opt:
        packet += b"\x00" + struct.pack("!HHIH", 41, 1232, 0, 0)
    return packet


def rcode(packet: bytes) -> int:
    return struct.unpack_from("!H", packet, 2)[0] & 0xF


class FakeUpstream(asyncio.DatagramProtocol):
    """A resolver on 127.0.0.1 that records queries and answers each with one A record (or not at
    all when ``silent``; ``spoof_first`` sends a wrong-id answer before the right one)."""

    def __init__(self, answer_ip: str = "192.0.2.7", *, silent: bool = False, spoof_first: bool = False,
                 delay: float = 0.0) -> None:
        self.answer_ip = answer_ip
        self.silent = silent
        self.spoof_first = spoof_first
        self.delay = delay
        self.received: list[bytes] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received.append(data)
        if not self.silent:
            asyncio.get_running_loop().call_later(self.delay, self._answer, data, addr)

    def _answer(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        qid = struct.unpack_from("!H", data)[0]
        end = data.index(b"\x00", 12) + 5
        question = data[12:end]
        answer = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + socket.inet_aton(self.answer_ip)
        if self.spoof_first:
            bad = struct.pack("!HHHHHH", qid ^ 1, 0x8180, 1, 1, 0, 0) + question + answer[:-4] + socket.inet_aton("6.6.6.6")
            self.transport.sendto(bad, addr)
        self.transport.sendto(struct.pack("!HHHHHH", qid, 0x8180, 1, 1, 0, 0) + question + answer, addr)

    @property
    def addr(self) -> tuple[str, int]:
        assert self.transport is not None
        return self.transport.get_extra_info("sockname")[:2]


@contextlib.asynccontextmanager
async def upstream(**kw: object) -> AsyncIterator[FakeUpstream]:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(lambda: FakeUpstream(**kw), local_addr=("127.0.0.1", 0))  # type: ignore[arg-type]
    try:
        yield proto
    finally:
        transport.close()


@contextlib.asynccontextmanager
async def forwarder(policy: Callable[[], EgressPolicy], upstreams: list[tuple[str, int]],
                    **kw: object) -> AsyncIterator[tuple[DnsForwarder, tuple[str, int]]]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    addr = sock.getsockname()
    fwd = DnsForwarder(sock, policy, upstreams, **kw)  # type: ignore[arg-type]
    await fwd.start()
    try:
        yield fwd, addr
    finally:
        await fwd.aclose()


async def ask(addr: tuple[str, int], packet: bytes, timeout: float = 3.0) -> bytes | None:
    """Send ``packet`` to ``addr`` and return the answer, None when none comes in ``timeout``."""
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        s.bind(("127.0.0.1", 0))
        await loop.sock_sendto(s, packet, addr)
        try:
            async with asyncio.timeout(timeout):
                data, _ = await loop.sock_recvfrom(s, 65535)
                return data
        except TimeoutError:
            return None


# -- forwarding ------------------------------------------------------------------------------------


async def test_allowed_query_is_forwarded_and_the_answer_carries_the_clients_id() -> None:
    async with upstream() as up, forwarder(lambda: DEFAULT_POLICY, [up.addr]) as (fwd, addr):
        q = query("www.example.net", qid=0xBEEF)
        answer = await ask(addr, q)
        assert answer is not None
        assert answer[:2] == b"\xbe\xef" and rcode(answer) == 0
        assert answer.endswith(socket.inet_aton("192.0.2.7"))
        assert len(up.received) == 1
        assert up.received[0][2:] == q[2:], "the query goes upstream unchanged but for its id"
        assert fwd.stats["forwarded"] == 1


async def test_edns_query_is_forwarded() -> None:
    async with upstream() as up, forwarder(lambda: DEFAULT_POLICY, [up.addr]) as (_, addr):
        answer = await ask(addr, query("a.example.com", opt=True))
        assert answer is not None and rcode(answer) == 0
        assert len(up.received) == 1


async def test_first_answering_upstream_wins_and_a_silent_one_does_not_delay_it() -> None:
    async with upstream(silent=True) as mute, upstream(answer_ip="192.0.2.9") as up, \
            forwarder(lambda: DEFAULT_POLICY, [mute.addr, up.addr], timeout=5) as (_, addr):
        t0 = asyncio.get_running_loop().time()
        answer = await ask(addr, query("x.test"))
        assert answer is not None and answer.endswith(socket.inet_aton("192.0.2.9"))
        assert asyncio.get_running_loop().time() - t0 < 1
        assert len(mute.received) == 1


async def test_an_answer_with_another_id_is_ignored() -> None:
    async with upstream(spoof_first=True) as up, forwarder(lambda: DEFAULT_POLICY, [up.addr]) as (_, addr):
        answer = await ask(addr, query("x.test"))
        assert answer is not None and answer.endswith(socket.inet_aton("192.0.2.7"))


async def test_no_answer_in_time_is_servfail() -> None:
    async with upstream(silent=True) as up, forwarder(lambda: DEFAULT_POLICY, [up.addr], timeout=0.2) as (fwd, addr):
        answer = await ask(addr, query("slow.test", qid=7))
        assert answer is not None and answer[:2] == b"\x00\x07" and rcode(answer) == RCODE_SERVFAIL
        assert fwd.stats["servfail"] == 1


async def test_no_upstreams_is_servfail_at_once() -> None:
    async with forwarder(lambda: DEFAULT_POLICY, []) as (_, addr):
        answer = await ask(addr, query("x.test"), timeout=1)
        assert answer is not None and rcode(answer) == RCODE_SERVFAIL


# -- refusals --------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy,name", [
    (NO_EGRESS, "example.com"),
    (NO_EGRESS, "anything.test"),
    (ONLY_EXAMPLE, "evil.test"),
    (ONLY_EXAMPLE, "example.com"),  # "*.example.com" is not the apex
    (ONLY_EXAMPLE, "x.example.org"),
    (ONLY_EXAMPLE, "data-to-exfiltrate.evil.test"),
])
async def test_refused_names_never_reach_an_upstream(policy: EgressPolicy, name: str) -> None:
    async with upstream() as up, forwarder(lambda: policy, [up.addr]) as (fwd, addr):
        q = query(name, qid=0x4242)
        answer = await ask(addr, q)
        assert answer is not None
        assert answer[:2] == b"\x42\x42" and rcode(answer) == RCODE_REFUSED
        assert answer[12:] == q[12:], "the question is echoed"
        await asyncio.sleep(0.05)
        assert up.received == []
        assert fwd.stats["refused"] == 1


async def test_allowed_domains_are_forwarded_when_the_rest_is_denied() -> None:
    async with upstream() as up, forwarder(lambda: ONLY_EXAMPLE, [up.addr]) as (_, addr):
        for name in ("api.example.com", "a.b.EXAMPLE.com", "example.org"):
            answer = await ask(addr, query(name))
            assert answer is not None and rcode(answer) == 0, name
        assert len(up.received) == 3


async def test_a_label_holding_a_dot_cannot_pass_for_an_allowed_name() -> None:
    policy = EgressPolicy.from_e2b(deny_out=["0.0.0.0/0"], allow_out=["example.org"])
    packet = struct.pack("!HHHHHH", 1, 0x0100, 1, 0, 0, 0) + b"\x0bexample.org\x00" + struct.pack("!HH", 1, 1)
    parsed = parse_query(packet)
    assert parsed is not None and parsed.qname == "example\\046org"
    async with upstream() as up, forwarder(lambda: policy, [up.addr]) as (_, addr):
        answer = await ask(addr, packet)
        assert answer is not None and rcode(answer) == RCODE_REFUSED
        assert up.received == []


async def test_rules_are_read_per_query() -> None:
    current = [NO_EGRESS]
    async with upstream() as up, forwarder(lambda: current[0], [up.addr]) as (_, addr):
        first = await ask(addr, query("x.test"))
        assert first is not None and rcode(first) == RCODE_REFUSED
        current[0] = DEFAULT_POLICY
        second = await ask(addr, query("x.test"))
        assert second is not None and rcode(second) == 0
        assert len(up.received) == 1


# -- malformed input and limits --------------------------------------------------------------------


async def test_malformed_queries() -> None:
    two_questions = struct.pack("!HHHHHH", 9, 0x0100, 2, 0, 0, 0) + (encode_name("a.test") + b"\x00\x01\x00\x01") * 2
    compressed = struct.pack("!HHHHHH", 9, 0x0100, 1, 0, 0, 0) + b"\xc0\x0c" + b"\x00\x01\x00\x01"
    trailing = query("a.test", qid=9) + b"hidden data"
    with_answer = struct.pack("!HHHHHH", 9, 0x0100, 1, 1, 0, 0) + encode_name("a.test") + b"\x00\x01\x00\x01"
    not_opt = query("a.test", qid=9, opt=True)[:-10] + struct.pack("!HHIH", 16, 1, 0, 0)
    truncated = query("a.test", qid=9)[:-3]
    async with upstream() as up, forwarder(lambda: DEFAULT_POLICY, [up.addr]) as (fwd, addr):
        for packet in (two_questions, compressed, trailing, with_answer, not_opt, truncated):
            answer = await ask(addr, packet)
            assert answer is not None, packet
            assert answer[:2] == b"\x00\x09" and rcode(answer) == RCODE_FORMERR
            assert struct.unpack_from("!H", answer, 2)[0] & 0x8000, "a response"
        # Too short for a header, or a response: no answer at all (no reflection loops).
        assert await ask(addr, b"\x00\x01\x02", timeout=0.2) is None
        response = bytearray(query("a.test"))
        response[2] |= 0x80
        assert await ask(addr, bytes(response), timeout=0.2) is None
        assert up.received == []
        assert fwd.stats["formerr"] == 6
        # Still serving.
        ok = await ask(addr, query("a.test"))
        assert ok is not None and rcode(ok) == 0


async def test_in_flight_queries_are_bounded() -> None:
    async with upstream(silent=True) as up, \
            forwarder(lambda: DEFAULT_POLICY, [up.addr], timeout=0.5, max_inflight=2) as (fwd, addr):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for i in range(5):
                s.sendto(query(f"n{i}.test", qid=i), addr)
            await asyncio.sleep(0.2)
            assert len(up.received) == 2
            assert fwd.stats["dropped"] == 3
        await asyncio.sleep(0.5)
        assert not fwd._inflight


async def test_aclose_is_idempotent_and_closes_everything() -> None:
    async with upstream(silent=True) as up:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        fwd = DnsForwarder(sock, lambda: DEFAULT_POLICY, [up.addr], timeout=30)
        await fwd.start()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(query("pending.test"), sock.getsockname())
        await asyncio.sleep(0.1)
        assert len(fwd._inflight) == 1
        await fwd.aclose()
        await fwd.aclose()
        assert sock.fileno() == -1
        assert not fwd._inflight


# -- parser and resolv.conf ------------------------------------------------------------------------


def test_parse_query_fields() -> None:
    q = parse_query(query("WWW.Example.COM", qid=0xAB, qtype=28))
    assert q is not None
    assert (q.id, q.qname, q.qtype, q.qclass, q.opcode) == (0xAB, "www.example.com", 28, 1, 0)
    root = parse_query(struct.pack("!HHHHHH", 1, 0, 1, 0, 0, 0) + b"\x00\x00\x02\x00\x01")
    assert root is not None and root.qname == ""
    with pytest.raises(DnsFormatError):
        parse_query(struct.pack("!HHHHHH", 1, 0, 1, 0, 0, 0) + b"\x3f" + b"a" * 63 + b"\x3f" + b"a" * 63
                    + b"\x3f" + b"a" * 63 + b"\x3f" + b"a" * 63 + b"\x00\x00\x01\x00\x01")


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=600))
def test_parse_query_never_raises_anything_else(data: bytes) -> None:
    try:
        q = parse_query(data)
    except DnsFormatError:
        error_reply(data, RCODE_FORMERR)
        return
    if q is not None:
        error_reply(data, RCODE_REFUSED, q.question)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=12, max_size=12), st.lists(st.binary(min_size=0, max_size=70), max_size=6), st.binary(max_size=20))
def test_parse_query_on_near_valid_packets(header: bytes, labels: list[bytes], tail: bytes) -> None:
    data = header + b"".join(bytes([len(lb)]) + lb for lb in labels) + b"\x00" + tail
    try:
        parse_query(data)
    except DnsFormatError:
        pass


