"""The egress proxy: SNI and Host sniffing on real and hand-made first bytes, and allow/deny
decisions end to end through the proxy on loopback (the original destination is injected and the
connector maps it to a loopback echo server, so nothing leaves 127.0.0.1); one test, as root,
checks ``SO_ORIGINAL_DST`` behind a real nftables REDIRECT in a private network namespace."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.netns_outside import make_certificate
from trenvx.network.egress_proxy import (
    MORE,
    OTHER,
    EgressProxy,
    Sniff,
    original_dst,
    parse_client_hello,
    parse_http_host,
    sniff,
)
from trenvx.network.policy import DEFAULT_POLICY, NO_EGRESS, EgressPolicy

REPO = Path(__file__).resolve().parents[2]
OUTSIDE_IP = "203.0.113.10"  # the destination the "guest" chose (documentation range; never dialled)
DOMAINS_ONLY = EgressPolicy.from_e2b(deny_out=["0.0.0.0/0"], allow_out=["*.example.com", "example.org"])


# -- ClientHellos ----------------------------------------------------------------------------------


def client_hello(server_hostname: str | None) -> bytes:
    """The first flight of a real TLS client (Python's ssl, OpenSSL) for ``server_hostname``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def reframe(hello: bytes, size: int) -> bytes:
    """The handshake of a one-record ``hello`` spread over records of ``size`` bytes each."""
    assert hello[0] == 0x16 and int.from_bytes(hello[3:5], "big") == len(hello) - 5
    handshake = hello[5:]
    out = b""
    for i in range(0, len(handshake), size):
        part = handshake[i:i + size]
        out += hello[:3] + len(part).to_bytes(2, "big") + part
    return out


def hand_made_hello(extensions: list[tuple[int, bytes]] | None) -> bytes:
    """A minimal ClientHello record with ``extensions`` (None: no extensions block at all)."""
    body = b"\x03\x03" + bytes(32) + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
    if extensions is not None:
        exts = b"".join(t.to_bytes(2, "big") + len(d).to_bytes(2, "big") + d for t, d in extensions)
        body += len(exts).to_bytes(2, "big") + exts
    handshake = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + len(handshake).to_bytes(2, "big") + handshake


def sni_ext(*names: bytes, name_type: int = 0) -> tuple[int, bytes]:
    entries = b"".join(bytes([name_type]) + len(n).to_bytes(2, "big") + n for n in names)
    return 0, len(entries).to_bytes(2, "big") + entries


def test_sni_of_a_real_client_hello() -> None:
    hello = client_hello("API.Example.com")
    assert sniff(hello) == Sniff("tls", "api.example.com")
    assert sniff(client_hello(None)) == Sniff("tls", None)
    assert sniff(client_hello("192.0.2.1")) == Sniff("tls", None), "no SNI is sent for an IP address"


def test_every_prefix_of_a_client_hello_asks_for_more() -> None:
    hello = client_hello("a.example.com")
    for i in range(len(hello)):
        assert sniff(hello[:i]) == MORE, i
    assert sniff(hello + b"\x14\x03\x03\x00\x01\x01") == Sniff("tls", "a.example.com"), "bytes after it do not matter"


@pytest.mark.parametrize("size", [1, 7, 100, 512])
def test_client_hello_split_over_records(size: int) -> None:
    split = reframe(client_hello("x.example.org"), size)
    assert sniff(split) == Sniff("tls", "x.example.org")
    for cut in range(0, len(split), max(1, len(split) // 50)):
        assert sniff(split[:cut]) == MORE


def test_hand_made_client_hellos() -> None:
    assert sniff(hand_made_hello(None)) == Sniff("tls", None)
    assert sniff(hand_made_hello([])) == Sniff("tls", None)
    assert sniff(hand_made_hello([(10, b"\x00\x02\x00\x1d"), sni_ext(b"Host.Test.")])) == Sniff("tls", "host.test")
    # Ambiguous or invalid names name nothing.
    assert sniff(hand_made_hello([sni_ext(b"a.test"), sni_ext(b"b.test")])) == OTHER
    assert sniff(hand_made_hello([sni_ext(b"a.test", b"b.test")])) == OTHER
    assert sniff(hand_made_hello([sni_ext(b"bad name.test")])) == OTHER
    assert sniff(hand_made_hello([sni_ext(b"*.example.com")])) == OTHER
    assert sniff(hand_made_hello([sni_ext(b"\xff.test")])) == OTHER
    assert sniff(hand_made_hello([sni_ext()])) == OTHER
    assert sniff(hand_made_hello([sni_ext(b"a.test", name_type=1)])) == OTHER
    # Malformed structures.
    good = hand_made_hello([sni_ext(b"a.test")])
    assert sniff(good[:-3] + b"\x00\x09\x00") == OTHER, "an extension longer than the block"
    assert sniff(b"\x17\x03\x03\x00\x05hello") == OTHER, "application data, not a handshake"
    assert sniff(b"\x16\x03\x01\x00\x04\x02\x00\x00\x00") == OTHER, "a ServerHello"
    assert sniff(b"\x16\x02") == OTHER
    assert sniff(b"\x16\x03\x01\x00\x00") == OTHER, "an empty record"
    first = reframe(good, 10)
    assert sniff(first[:15] + b"\x15\x03\x03\x00\x02\x02\x28") == OTHER, "an alert in the middle of the hello"


# -- HTTP ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("data,expected", [
    (b"GET / HTTP/1.1\r\nHost: Example.ORG\r\n\r\n", Sniff("http", "example.org")),
    (b"GET / HTTP/1.1\r\nhost:api.example.com:8080\r\nAccept: */*\r\n\r\n", Sniff("http", "api.example.com")),
    (b"POST /x HTTP/1.0\nHost: a.test.\n\nbody", Sniff("http", "a.test")),
    (b"GET / HTTP/1.0\r\n\r\n", Sniff("http", None)),
    (b"GET http://a.test/x HTTP/1.1\r\nHost: a.test\r\n\r\n", Sniff("http", "a.test")),
    (b"GET http://user@a.test:81/x HTTP/1.1\r\n\r\n", Sniff("http", "a.test")),
    (b"GET http://a.test/ HTTP/1.1\r\nHost: b.test\r\n\r\n", OTHER),
    (b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n", OTHER),
    (b"GET / HTTP/1.1\r\nHost: [2001:db8::1]:80\r\n\r\n", OTHER),
    (b"GET / HTTP/1.1\r\nHost: a.test:http\r\n\r\n", OTHER),
    (b"GET / HTTP/1.1\r\nHost : a.test\r\n\r\n", OTHER),
    (b"GET / HTTP/1.1\r\nX: y\r\n folded\r\nHost: a.test\r\n\r\n", OTHER),
    (b"GET / HTTP/2.0\r\nHost: a.test\r\n\r\n", OTHER),
    (b"get / HTTP/1.1\r\nHost: a.test\r\n\r\n", OTHER),
    (b"SSH-2.0-OpenSSH_9.2\r\n", OTHER),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", OTHER),
    (b"\x00\x01binary", OTHER),
    (b"GET", MORE),
    (b"GET /index.html HTT", MORE),
    (b"GET / HTTP/1.1\r", MORE),
    (b"GET / HTTP/1.1\r\nHost: a.test\r\n", MORE),
    (b"GET / HTTP/1.1\r\nHost: a.test\r\n\r", MORE),
])
def test_http_host(data: bytes, expected: Sniff) -> None:
    assert sniff(data) == expected


def test_every_prefix_of_a_request_head_asks_for_more() -> None:
    request = b"GET /some/path?q=1 HTTP/1.1\r\nUser-Agent: curl/8\r\nHost: www.example.com\r\nAccept: */*\r\n\r\n"
    for i in range(1, len(request)):
        assert sniff(request[:i]) == MORE, request[:i]
    assert sniff(request) == Sniff("http", "www.example.com")


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=400))
def test_sniffers_never_raise(data: bytes) -> None:
    for result in (sniff(data), parse_client_hello(data), parse_http_host(data)):
        assert result.kind in ("more", "tls", "http", "other")


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_sniffers_never_raise_on_mutated_client_hellos(data: st.DataObject) -> None:
    hello = bytearray(hand_made_hello([(10, b"\x00\x02\x00\x1d"), sni_ext(b"a.example.com")]))
    for _ in range(data.draw(st.integers(1, 4))):
        hello[data.draw(st.integers(0, len(hello) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(hello)))
    assert sniff(bytes(hello[:cut])).kind in ("more", "tls", "other")


# -- end to end on loopback ------------------------------------------------------------------------


@dataclass
class Echo:
    """A loopback server that sends ``banner`` on connect, echoes until EOF, then says ``bye`` and
    closes; it records the bytes of each connection."""

    banner: bytes = b""
    received: list[bytes] = field(default_factory=list)
    server: asyncio.AbstractServer | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got = bytearray()
        self.received.append(b"")
        try:
            if self.banner:
                writer.write(self.banner)
            while data := await reader.read(65536):
                got += data
                self.received[-1] = bytes(got)
                writer.write(data)
                await writer.drain()
            writer.write(b"bye")
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    @property
    def addr(self) -> tuple[str, int]:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[:2]


@dataclass
class Harness:
    proxy: EgressProxy
    addr: tuple[str, int]
    echo: Echo
    dials: list[tuple[str, int]]
    dst: list[tuple[str, int]]
    """What the injected ``original_dst`` answers (settable per test)."""


@contextlib.asynccontextmanager
async def harness(policy: Callable[[], EgressPolicy], *, banner: bytes = b"",
                  dst: tuple[str, int] = (OUTSIDE_IP, 443), upstream: tuple[str, int] | None = None,
                  **kw: object) -> AsyncIterator[Harness]:
    loop = asyncio.get_running_loop()
    echo = Echo(banner=banner)
    echo.server = await asyncio.start_server(echo._serve, "127.0.0.1", 0)
    dials: list[tuple[str, int]] = []
    echo_addr = upstream or echo.addr

    async def connect(ip: str, port: int) -> socket.socket:
        dials.append((ip, port))
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            await loop.sock_connect(s, echo_addr)  # the "outside" host, on loopback
        except OSError:
            s.close()
            raise
        return s

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    current = [dst]
    proxy = EgressProxy(listener, policy, connect, name="test", original_dst=lambda _s: current[0], **kw)  # type: ignore[arg-type]
    await proxy.start()
    try:
        yield Harness(proxy, listener.getsockname()[:2], echo, dials, current)
    finally:
        await proxy.aclose()
        echo.server.close()
        await echo.server.wait_closed()


async def talk(addr: tuple[str, int], data: bytes, *, half_close: bool = True, timeout: float = 5) -> bytes:
    """Send ``data`` (then EOF), return all the proxy sends back until it closes (b"" on a reset)."""
    reader, writer = await asyncio.open_connection(*addr)
    try:
        writer.write(data)
        await writer.drain()
        if half_close:
            writer.write_eof()
        async with asyncio.timeout(timeout):
            return await reader.read(-1)
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


async def test_allowed_sni_is_spliced_to_the_original_destination() -> None:
    hello = reframe(client_hello("api.example.com"), 50)
    async with harness(lambda: DOMAINS_ONLY) as h:
        got = await talk(h.addr, hello)
        assert got == hello + b"bye"
        assert h.dials == [(OUTSIDE_IP, 443)], "the original IP and port, not a resolution of the name"
        assert h.echo.received == [hello]
        assert h.proxy.stats["allowed"] == 1


async def test_denied_sni_is_reset_and_never_dialled() -> None:
    async with harness(lambda: DOMAINS_ONLY) as h:
        for name in ("evil.test", "example.com", "example.org.evil.test"):
            assert await talk(h.addr, client_hello(name)) == b""
        assert await talk(h.addr, client_hello(None)) == b""
        assert h.dials == [] and h.echo.received == []
        assert h.proxy.stats["refused"] == 4


async def test_http_host_decides() -> None:
    async with harness(lambda: DOMAINS_ONLY, dst=(OUTSIDE_IP, 80)) as h:
        request = b"GET / HTTP/1.1\r\nHost: example.org:80\r\n\r\n"
        assert await talk(h.addr, request) == request + b"bye"
        assert await talk(h.addr, b"GET / HTTP/1.1\r\nHost: other.test\r\n\r\n") == b""
        assert await talk(h.addr, b"GET / HTTP/1.0\r\n\r\n") == b""
        assert h.dials == [(OUTSIDE_IP, 80)]


async def test_request_split_over_writes_is_put_together() -> None:
    request = b"GET /x HTTP/1.1\r\nHost: www.example.com\r\nContent-Length: 4\r\n\r\nbody"
    async with harness(lambda: DOMAINS_ONLY, dst=(OUTSIDE_IP, 80)) as h:
        reader, writer = await asyncio.open_connection(*h.addr)
        for i in range(0, len(request), 9):
            writer.write(request[i:i + 9])
            await writer.drain()
            await asyncio.sleep(0.01)
        writer.write_eof()
        async with asyncio.timeout(5):
            assert await reader.read(-1) == request + b"bye"
        writer.close()


async def test_an_allowed_ip_passes_without_waiting_for_the_client() -> None:
    policy = EgressPolicy.from_e2b(deny_out=["0.0.0.0/0"], allow_out=[OUTSIDE_IP, "example.org"])
    async with harness(lambda: policy, banner=b"SSH-2.0-server\r\n", dst=(OUTSIDE_IP, 22)) as h:
        reader, writer = await asyncio.open_connection(*h.addr)
        async with asyncio.timeout(2):
            assert await reader.readline() == b"SSH-2.0-server\r\n", "a server-speaks-first protocol works"
        writer.close()
        assert h.dials == [(OUTSIDE_IP, 22)]


async def test_rules_are_read_per_connection() -> None:
    current = [NO_EGRESS]
    hello = client_hello("a.example.com")
    async with harness(lambda: current[0]) as h:
        assert await talk(h.addr, hello) == b""
        current[0] = DOMAINS_ONLY
        assert await talk(h.addr, hello) == hello + b"bye"
        current[0] = DEFAULT_POLICY
        assert await talk(h.addr, b"anything") == b"anythingbye"


async def test_recheck_resets_spliced_connections_the_new_rules_deny() -> None:
    current = [DOMAINS_ONLY]
    hello = client_hello("a.example.com")
    async with harness(lambda: current[0]) as h:
        reader, writer = await asyncio.open_connection(*h.addr)
        writer.write(hello)
        await writer.drain()
        async with asyncio.timeout(5):
            assert await reader.readexactly(len(hello)) == hello  # spliced: the echo sent it back
        assert h.proxy.recheck() == 0  # the same rules: nothing to cut
        current[0] = EgressPolicy.from_e2b(deny_out=["0.0.0.0/0"], allow_out=["other.test"])
        assert h.proxy.recheck() == 1
        try:
            async with asyncio.timeout(5):
                rest = await reader.read(-1)
        except ConnectionResetError:
            rest = b""
        assert rest in (b"", b"bye")  # reset (or closed) by the proxy, never kept open
        writer.close()


@pytest.mark.parametrize("dst", [("127.0.0.1", 8080), ("10.0.2.2", 5000), ("10.0.2.3", 53), ("0.0.0.0", 80),
                                 ("198.51.100.7", 443)])
async def test_loops_and_forbidden_networks_are_never_dialled(dst: tuple[str, int]) -> None:
    async with harness(lambda: DEFAULT_POLICY, dst=dst, forbidden=["198.51.100.0/24"]) as h:
        assert await talk(h.addr, client_hello("a.example.com")) == b""
        assert h.dials == []


async def test_the_proxy_itself_is_never_dialled() -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    dials: list[tuple[str, int]] = []

    async def connect(ip: str, port: int) -> socket.socket:
        dials.append((ip, port))
        raise OSError("must not be called")

    own = listener.getsockname()[:2]
    proxy = EgressProxy(listener, lambda: DEFAULT_POLICY, connect, original_dst=lambda _s: own, forbidden=())
    proxy.forbidden = ()  # only the own-address check is left
    async with proxy:
        assert proxy.is_forbidden(*own)
        assert not proxy.is_forbidden(own[0], own[1] + 1)
        assert await talk(own, b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n") == b""
    assert dials == []


async def test_a_silent_client_is_dropped_after_the_sniff_timeout() -> None:
    async with harness(lambda: DOMAINS_ONLY, sniff_timeout=0.2) as h:
        reader, writer = await asyncio.open_connection(*h.addr)
        t0 = asyncio.get_running_loop().time()
        async with asyncio.timeout(3):
            with contextlib.suppress(ConnectionResetError):
                assert await reader.read(-1) == b""
        assert asyncio.get_running_loop().time() - t0 < 2
        writer.close()
        assert h.dials == []


async def test_no_name_in_the_first_bytes_is_refused() -> None:
    async with harness(lambda: DOMAINS_ONLY, sniff_limit=1024) as h:
        assert await talk(h.addr, b"GET / HTTP/1.1\r\nX-Pad: " + b"a" * 2000 + b"\r\nHost: a.example.com\r\n\r\n") == b""
        assert await talk(h.addr, b"GET / HTTP/1.1\r\nHost: a.example.com\r\n") == b"", "EOF before the head ends"
        assert h.dials == []


async def test_half_close_is_passed_on() -> None:
    """The client sends and half-closes, then still reads everything the server sends afterwards."""
    async with harness(lambda: DEFAULT_POLICY) as h:
        payload = os.urandom(300_000)
        assert await talk(h.addr, payload) == payload + b"bye"
        assert h.echo.received == [payload]


async def test_failed_upstream_connect_resets_the_client() -> None:
    async with harness(lambda: DEFAULT_POLICY) as h:
        h.echo.server.close()  # type: ignore[union-attr]
        await h.echo.server.wait_closed()  # type: ignore[union-attr]
        assert await talk(h.addr, b"x") == b""
        assert h.proxy.stats["failed"] == 1


async def test_a_missing_original_destination_is_refused() -> None:
    def no_dst(_s: socket.socket) -> tuple[str, int]:
        raise OSError(2, "No such file or directory")

    async with harness(lambda: DEFAULT_POLICY) as h:
        h.proxy.original_dst = no_dst
        assert await talk(h.addr, b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n") == b""
        assert h.dials == []


async def test_connections_over_the_limit_are_reset() -> None:
    async with harness(lambda: DOMAINS_ONLY, max_connections=2, sniff_timeout=30) as h:
        held = [await asyncio.open_connection(*h.addr) for _ in range(2)]
        await asyncio.sleep(0.1)
        assert h.proxy.active == 2
        assert await talk(h.addr, client_hello("a.example.com")) == b""
        assert h.proxy.stats["over_limit"] == 1
        for _, w in held:
            w.close()


async def test_aclose_ends_open_connections_and_closes_the_listener() -> None:
    async with harness(lambda: DEFAULT_POLICY) as h:
        reader, writer = await asyncio.open_connection(*h.addr)
        writer.write(b"ping")
        async with asyncio.timeout(2):
            assert await reader.readexactly(4) == b"ping"
        await h.proxy.aclose()
        await h.proxy.aclose()
        async with asyncio.timeout(2):
            with contextlib.suppress(ConnectionResetError):
                assert await reader.read(-1) == b""
        writer.close()
        assert h.proxy.active == 0
        assert h.proxy.listener.fileno() == -1


async def test_a_real_tls_handshake_through_the_proxy(tmp_path: Path) -> None:
    """The buffered ClientHello reaches the server intact: the handshake verifies and completes."""
    cert, key = make_certificate(tmp_path, names=("allowed.test", "other.test"), ips=())
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)

    async def hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            writer.write(b"hello " + await reader.readline())
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(hello, "127.0.0.1", 0, ssl=server_ctx)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    policy = EgressPolicy.from_e2b(deny_out=["0.0.0.0/0"], allow_out=["allowed.test"])
    try:
        async with harness(lambda: policy, upstream=server.sockets[0].getsockname()[:2]) as h:
            reader, writer = await asyncio.open_connection(*h.addr, ssl=client_ctx, server_hostname="allowed.test")
            writer.write(b"tls\n")
            async with asyncio.timeout(5):
                assert await reader.readline() == b"hello tls\n"
            writer.close()
            with pytest.raises((ConnectionError, ssl.SSLError)):
                async with asyncio.timeout(5):
                    await asyncio.open_connection(*h.addr, ssl=client_ctx, server_hostname="other.test")
            assert h.dials == [(OUTSIDE_IP, 443)]
    finally:
        server.close()
        await server.wait_closed()


# -- SO_ORIGINAL_DST behind a real REDIRECT ----------------------------------------------------------

NETNS_SCRIPT = textwrap.dedent("""
    import asyncio, socket, subprocess, sys
    from trenvx.network.egress_proxy import EgressProxy, original_dst
    from trenvx.network.policy import EgressPolicy

    async def main() -> None:
        loop = asyncio.get_running_loop()
        async def echo(r, w):
            w.write(b"echo:" + await r.read(100)); await w.drain(); w.close()
        server = await asyncio.start_server(echo, "203.0.113.10", 81)
        listener = socket.socket(); listener.bind(("127.0.0.1", 0)); listener.listen(8)
        port = listener.getsockname()[1]
        rules = ("table ip tvxt {\\n chain redir {\\n  type nat hook output priority -100;\\n"
                 f"  ip daddr 203.0.113.10 tcp dport 80 redirect to :{port}\\n }}\\n}}\\n")
        subprocess.run(["nft", "-f", "-"], check=True, text=True, input=rules)
        seen = []
        def record(sock):
            dst = original_dst(sock); seen.append(dst); return dst
        async def connect(ip, port):  # port 80 is redirected: the test's upstream is on 81
            s = socket.socket(); s.setblocking(False); await loop.sock_connect(s, (ip, port + 1)); return s
        policy = EgressPolicy.from_e2b(deny_out=["0.0.0.0/0"], allow_out=["ok.test"])
        async with EgressProxy(listener, lambda: policy, connect, original_dst=record):
            r, w = await asyncio.open_connection("203.0.113.10", 80)
            w.write(b"GET / HTTP/1.1\\r\\nHost: ok.test\\r\\n\\r\\n"); w.write_eof()
            answer = await r.read(-1); w.close()
        server.close()
        print(seen, answer)
        assert seen == [("203.0.113.10", 80)], seen
        assert answer.startswith(b"echo:GET / HTTP/1.1"), answer

    asyncio.run(main())
""")


def test_original_dst_behind_an_nftables_redirect() -> None:
    if os.geteuid() != 0 or not shutil.which("nft") or not shutil.which("ip"):
        pytest.skip("needs root, nft and ip to make a private network namespace")
    ns = f"tvxt-odst-{os.getpid()}"
    if subprocess.run(["ip", "netns", "add", ns], capture_output=True).returncode != 0:
        pytest.skip("ip netns add failed: network namespaces are unavailable")
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "-n", ns, "addr", "add", "203.0.113.10/32", "dev", "lo"], check=True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
        done = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", NETNS_SCRIPT],
                              capture_output=True, text=True, timeout=60, env=env)
        assert done.returncode == 0, done.stdout + done.stderr
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def test_original_dst_without_nat_is_the_local_address_or_an_error() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        with socket.create_connection(listener.getsockname()) as _c:
            conn, _ = listener.accept()
            with conn:
                try:
                    assert original_dst(conn) == listener.getsockname()
                except OSError:
                    pass  # no conntrack entry for loopback traffic here
