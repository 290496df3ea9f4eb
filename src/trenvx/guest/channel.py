"""How the host reaches a guest: TCP to a port that the VMM forwards into the VM, or a hybrid vsock
socket (:mod:`trenvx.guest.vsock`); :func:`transport_for` picks the transport for an endpoint.

With QEMU's user networking a forwarded port is a host socket that QEMU opens with
``listen(fd, 1)``: a backlog of one. A burst of new connections to it overflows the host's accept
queue; the kernel then answers with SYN cookies and, when those fail, resets connections
(measured here: 16 concurrent commands against a fresh sandbox lost 3-7 of them to
``ConnectionResetError``, with ``TcpExtListenOverflows`` and "Possible SYN flooding" on the host).

:func:`forwarded_port_transport` is an httpx transport whose connections to any one port are
opened one at a time, so QEMU accepts each before the next arrives; kept-alive connections are
reused as usual, so only the first requests of a burst pay for the queueing.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterable
from typing import Any

import httpcore
import httpx

from .endpoint import AgentEndpoint, HybridVsockEndpoint


class SerialConnectBackend(httpcore.AsyncNetworkBackend):
    """Opens TCP connections to one (host, port) one after another; others go in parallel."""

    def __init__(self, inner: httpcore.AsyncNetworkBackend | None = None) -> None:
        self._inner = inner or httpcore.AnyIOBackend()
        self._locks: dict[tuple[str, int], tuple[asyncio.Lock, int]] = {}

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        key = (host, port)
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                return await self._inner.connect_tcp(
                    host, port, timeout=timeout, local_address=local_address, socket_options=socket_options
                )
        finally:
            lock, users = self._locks[key]
            if users <= 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        return await self._inner.connect_unix_socket(path, timeout=timeout, socket_options=socket_options)

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


_PLAIN_HTTP: ssl.SSLContext | None = None


def plain_http_ssl_context() -> ssl.SSLContext:
    """One TLS context for every agent transport, made once. Agents speak plain HTTP, so it is never
    used; without it httpx builds a verifying context (loading the CA bundle: ~20 ms) per client,
    which was a third of a hot-pool create."""
    global _PLAIN_HTTP
    if _PLAIN_HTTP is None:
        _PLAIN_HTTP = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    return _PLAIN_HTTP


def transport_on(backend: httpcore.AsyncNetworkBackend, limits: httpx.Limits) -> httpx.AsyncHTTPTransport:
    """A plain-HTTP httpx transport whose connections ``backend`` opens."""
    transport = httpx.AsyncHTTPTransport(limits=limits, verify=plain_http_ssl_context())
    # httpx takes no network backend, so the connection pool is rebuilt with one, same limits.
    transport._pool = httpcore.AsyncConnectionPool(
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        network_backend=backend,
    )
    return transport


def forwarded_port_transport(limits: httpx.Limits) -> httpx.AsyncHTTPTransport:
    """An httpx transport for ports forwarded into VMs (see the module's docstring)."""
    return transport_on(SerialConnectBackend(), limits)


def transport_for(endpoint: AgentEndpoint, limits: httpx.Limits) -> httpx.AsyncHTTPTransport:
    """The httpx transport that reaches ``endpoint`` (TCP forward or hybrid vsock)."""
    if isinstance(endpoint, HybridVsockEndpoint):
        from .vsock import hybrid_vsock_transport

        return hybrid_vsock_transport(endpoint.uds_path, endpoint.port, limits)
    return forwarded_port_transport(limits)
