"""The servers of the test suite's stand-in internet, run by :mod:`tests.netns_outside` inside the
``tvxt-out`` network namespace (``ip netns exec tvxt-out python -m tests.netns_outside_server``).

- HTTP on every ``--http`` address, port 80, and HTTP over TLS on every ``--tls`` address, port
  443 (the certificate given): any request is answered ``200`` with the JSON
  ``{"peer": client ip, "host": Host header or null, "server": local ip, "path": ..., "tls": ...}``;
  on the DNS address, ``GET /dns-log`` answers ``{"queries": [every qname received, in order]}``
  and ``POST /dns-log/clear`` empties it.
- DNS over UDP on ``--dns``, port 53: A records from ``--record NAME=IP`` (``*.suffix`` for every
  name under ``suffix``), an empty NOERROR for other types of a known name, NXDOMAIN otherwise.

Prints ``ready`` on stdout when everything listens; exits on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import ssl
import struct
import sys
from collections.abc import Awaitable, Callable

MAX_HEAD = 64 * 1024


class DnsServer(asyncio.DatagramProtocol):
    """A tiny authoritative server for the test names; records every qname it is asked."""

    def __init__(self, records: dict[str, str], log: list[str]) -> None:
        self.records = records
        self.log = log
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def lookup(self, name: str) -> str | None:
        if name in self.records:
            return self.records[name]
        for pattern, ip in self.records.items():
            if pattern.startswith("*.") and name.endswith(pattern[1:]) and len(name) > len(pattern) - 1:
                return ip
        return None

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if len(data) < 12 or data[2] & 0x80:
            return
        qid, flags, qdcount = struct.unpack_from("!HHH", data)
        labels, pos = [], 12
        try:
            while data[pos]:
                n = data[pos]
                if n & 0xC0:
                    return
                labels.append(data[pos + 1:pos + 1 + n].decode("ascii", "replace"))
                pos += 1 + n
            qtype, qclass = struct.unpack_from("!HH", data, pos + 1)
        except (IndexError, struct.error):
            return
        question = data[12:pos + 5]
        name = ".".join(labels).lower()
        self.log.append(name)
        ip = self.lookup(name)
        rcode = 3 if ip is None else 0
        answers = b""
        if ip is not None and qtype == 1 and qclass == 1:
            answers = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + socket.inet_aton(ip)
        out_flags = 0x8000 | 0x0400 | (flags & 0x0100) | rcode  # QR, AA, RD copied
        reply = struct.pack("!HHHHHH", qid, out_flags, 1, 1 if answers else 0, 0, 0) + question + answers
        assert self.transport is not None
        self.transport.sendto(reply, addr)


async def http_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, tls: bool,
                          dns_ip: str | None, dns_log: list[str]) -> None:
    """Answer HTTP/1.x requests on one connection (keep-alive unless asked to close)."""
    peer = writer.get_extra_info("peername")[0]
    local = writer.get_extra_info("sockname")[0]
    try:
        while True:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
                return
            lines = head.decode("latin-1").split("\r\n")
            parts = lines[0].split(" ")
            method, path, version = (parts + ["", "", ""])[:3]
            headers: dict[str, str] = {}
            for line in lines[1:]:
                if ":" in line:
                    k, v = line.split(":", 1)
                    headers[k.strip().lower()] = v.strip()
            length = int(headers.get("content-length", "0") or 0)
            if length:
                await reader.readexactly(length)
            if local == dns_ip and path == "/dns-log":
                body: dict[str, object] = {"queries": list(dns_log)}
            elif local == dns_ip and path == "/dns-log/clear" and method == "POST":
                dns_log.clear()
                body = {"queries": []}
            else:
                body = {"peer": peer, "host": headers.get("host"), "server": local, "path": path, "tls": tls}
            data = json.dumps(body).encode()
            close = version == "HTTP/1.0" or headers.get("connection", "").lower() == "close"
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(data)}\r\nConnection: {'close' if close else 'keep-alive'}\r\n\r\n".encode()
                + data
            )
            await writer.drain()
            if close:
                return
    except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
        return
    finally:
        writer.close()


async def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--http", action="append", default=[], help="address serving HTTP on port 80")
    ap.add_argument("--tls", action="append", default=[], help="address serving HTTPS on port 443")
    ap.add_argument("--dns", help="address serving DNS on port 53 and its log on port 80")
    ap.add_argument("--record", action="append", default=[], help="NAME=IP (NAME may be *.suffix)")
    ap.add_argument("--cert")
    ap.add_argument("--key")
    args = ap.parse_args(argv)

    dns_log: list[str] = []
    servers: list[asyncio.AbstractServer] = []

    def handler(tls: bool) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
        return lambda r, w: http_connection(r, w, tls=tls, dns_ip=args.dns, dns_log=dns_log)

    for ip in [*args.http, *([args.dns] if args.dns else [])]:
        servers.append(await asyncio.start_server(handler(False), ip, 80, reuse_address=True))
    if args.tls:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(args.cert, args.key)
        for ip in args.tls:
            servers.append(await asyncio.start_server(handler(True), ip, 443, ssl=ctx, reuse_address=True))
    loop = asyncio.get_running_loop()
    if args.dns:
        records = dict(r.lower().split("=", 1) for r in args.record)
        await loop.create_datagram_endpoint(lambda: DnsServer(records, dns_log), local_addr=(args.dns, 53))
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    for s in servers:
        s.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
