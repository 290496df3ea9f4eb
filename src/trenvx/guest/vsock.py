"""The host side of hybrid vsock: HTTP to a guest port through the VMM's unix socket.

Firecracker and Cloud Hypervisor expose a guest's virtio-vsock device on the host as one unix
socket. A host-initiated connection writes ``CONNECT <port>\\n``; the VMM answers
``OK <host-side port>\\n`` once the guest accepted, or closes the connection when nothing listens
on that guest port. After the ``OK`` line the connection carries the guest port's bytes.

:class:`HybridVsockBackend` is an httpcore network backend doing that handshake in place of a
TCP connect, and :func:`hybrid_vsock_transport` an httpx transport built on it: an
``httpx.AsyncClient`` with it speaks HTTP to the guest agent as if over TCP (keep-alive and
connection pooling included). :func:`vsock_socket` hands a handshaken connection over as a plain
socket (for websockets).
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpcore
import httpx

HANDSHAKE_TIMEOUT_S = 5.0
MAX_REPLY = 64
"""Longest acceptable handshake reply line (``OK 4294967295\\n`` is 14 bytes)."""


class VsockHandshakeError(httpcore.ConnectError):
    """The VMM refused or dropped the ``CONNECT`` (the guest port does not listen, or the VM is gone)."""


class _PrefixedStream(httpcore.AsyncNetworkStream):
    """A stream whose first reads return bytes already received with the handshake reply."""

    def __init__(self, inner: httpcore.AsyncNetworkStream, prefix: bytes) -> None:
        self._inner = inner
        self._prefix = prefix

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        if self._prefix:
            out, self._prefix = self._prefix[:max_bytes], self._prefix[max_bytes:]
            return out
        return await self._inner.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(self, *args: Any, **kwargs: Any) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("TLS over hybrid vsock is not supported")

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


async def vsock_connect(
    uds_path: str | Path, port: int, *, timeout: float | None = HANDSHAKE_TIMEOUT_S,
    backend: httpcore.AsyncNetworkBackend | None = None,
) -> httpcore.AsyncNetworkStream:
    """A stream to guest vsock ``port`` through the VMM's unix socket ``uds_path`` (handshake done)."""
    backend = backend or httpcore.AnyIOBackend()
    try:
        stream = await backend.connect_unix_socket(str(uds_path), timeout=timeout)
    except (httpcore.ConnectError, httpcore.ConnectTimeout) as e:
        raise httpcore.ConnectError(f"cannot connect to the VMM's vsock socket {uds_path}: {e}") from e
    try:
        await stream.write(f"CONNECT {port}\n".encode(), timeout=timeout)
        buf = b""
        while b"\n" not in buf:
            chunk = await stream.read(MAX_REPLY, timeout=timeout)
            if not chunk:
                raise VsockHandshakeError(
                    f"the VMM closed {uds_path} after CONNECT {port}: nothing listens on guest vsock port "
                    f"{port} (yet), or the VM is gone"
                )
            buf += chunk
            if len(buf) > MAX_REPLY and b"\n" not in buf:
                raise VsockHandshakeError(f"no handshake line from {uds_path} after CONNECT {port}: {buf[:MAX_REPLY]!r}")
        line, _, rest = buf.partition(b"\n")
        words = line.split()
        if len(words) != 2 or words[0] != b"OK" or not words[1].isdigit():
            raise VsockHandshakeError(
                f"unexpected reply {line[:MAX_REPLY]!r} from {uds_path} to CONNECT {port} (expected 'OK <port>')"
            )
    except BaseException:
        await stream.aclose()
        raise
    return _PrefixedStream(stream, rest) if rest else stream


async def vsock_socket(uds_path: str | Path, port: int, *, timeout: float | None = HANDSHAKE_TIMEOUT_S) -> socket.socket:
    """A connected plain socket to guest vsock ``port`` (handshake done), for libraries that take a
    socket rather than a stream (``websockets``: ``connect(..., sock=...)``). The caller owns it.

    Refuses a guest port that sent bytes right after the ``OK`` line: they would be lost in the handover.
    """
    stream = await vsock_connect(uds_path, port, timeout=timeout)
    try:
        if isinstance(stream, _PrefixedStream):
            raise VsockHandshakeError(
                f"guest vsock port {port} behind {uds_path} spoke before the client did; cannot hand the "
                f"connection over as a plain socket"
            )
        raw = stream.get_extra_info("socket")
        if not isinstance(raw, socket.socket):
            raise httpcore.ConnectError(f"no socket under the stream to {uds_path}: {type(stream).__name__}")
        sock = raw.dup()  # closing the stream closes its descriptor, not the connection
    finally:
        await stream.aclose()
    sock.setblocking(False)
    return sock


class HybridVsockBackend(httpcore.AsyncNetworkBackend):
    """Every "TCP" connection httpcore opens goes to guest vsock ``port`` through ``uds_path``."""

    def __init__(self, uds_path: str | Path, port: int, inner: httpcore.AsyncNetworkBackend | None = None) -> None:
        self.uds_path = Path(uds_path)
        self.port = port
        self._inner = inner or httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        return await vsock_connect(self.uds_path, self.port, timeout=timeout, backend=self._inner)

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        return await self._inner.connect_unix_socket(path, timeout=timeout, socket_options=socket_options)

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def hybrid_vsock_transport(uds_path: str | Path, port: int, limits: httpx.Limits) -> httpx.AsyncHTTPTransport:
    """An httpx transport whose requests reach guest vsock ``port`` behind ``uds_path``."""
    from .channel import transport_on

    return transport_on(HybridVsockBackend(uds_path, port), limits)


__all__ = ["HybridVsockBackend", "VsockHandshakeError", "hybrid_vsock_transport", "vsock_connect", "vsock_socket"]
