"""The HTTP clients the proxy reaches sandbox ports with, one per kind of endpoint.

- TCP endpoints (QEMU's forwards on 127.0.0.1, the agent's and any other port): one client shared
  by every sandbox, on :func:`~trenvx.guest.channel.forwarded_port_transport` (connections to one
  port opened one at a time, kept alive and reused).
- Hybrid vsock endpoints (Firecracker, Cloud Hypervisor): a client per endpoint, on
  :func:`~trenvx.guest.channel.transport_for`, whose connections go through that VM's vsock
  socket. A client is closed once its sandbox is no longer running: clients of ended sandboxes
  are swept whenever a new one is made, and all of them on :meth:`UpstreamClients.aclose`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import httpx

from ..guest.channel import forwarded_port_transport, transport_for
from ..guest.endpoint import AgentEndpoint, HybridVsockEndpoint

TIMEOUT = httpx.Timeout(connect=10.0, read=None, write=None, pool=None)
"""Connect within 10 s; then no limit: streams (command output, uploads) last as long as they last."""
TCP_LIMITS = httpx.Limits(max_connections=None, max_keepalive_connections=256, keepalive_expiry=30)
VSOCK_LIMITS = httpx.Limits(max_connections=None, max_keepalive_connections=32, keepalive_expiry=30)
"""Per sandbox: each vsock endpoint is one VM's."""


class UpstreamClients:
    """httpx clients to sandbox endpoints. ``is_running(sandbox_id)`` says whether a sandbox still runs."""

    def __init__(self, is_running: Callable[[str], bool]) -> None:
        self._is_running = is_running
        self._tcp: httpx.AsyncClient | None = None
        self._vsock: dict[HybridVsockEndpoint, tuple[str, httpx.AsyncClient]] = {}
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def tcp(self) -> httpx.AsyncClient:
        """The client shared by every TCP endpoint."""
        if self._tcp is None:
            self._tcp = httpx.AsyncClient(
                timeout=TIMEOUT, transport=forwarded_port_transport(TCP_LIMITS), follow_redirects=False,
            )
        return self._tcp

    def client_for(self, sandbox_id: str, endpoint: AgentEndpoint) -> httpx.AsyncClient:
        """The client whose connections reach ``endpoint`` of sandbox ``sandbox_id``."""
        if not isinstance(endpoint, HybridVsockEndpoint):
            return self.tcp
        entry = self._vsock.get(endpoint)
        if entry is not None:
            if entry[0] == sandbox_id:
                return entry[1]
            self._close_later(entry[1])  # the endpoint of an ended sandbox, now another's
        self._sweep()
        client = httpx.AsyncClient(
            timeout=TIMEOUT, transport=transport_for(endpoint, VSOCK_LIMITS), follow_redirects=False,
        )
        self._vsock[endpoint] = (sandbox_id, client)
        return client

    def vsock_clients(self) -> dict[HybridVsockEndpoint, str]:
        """The vsock endpoints that have a client, with their sandbox (for tests and diagnostics)."""
        return {ep: sid for ep, (sid, _) in self._vsock.items()}

    def _sweep(self) -> None:
        """Close the clients of sandboxes that no longer run (their connections would only fail)."""
        for ep, (sid, client) in list(self._vsock.items()):
            if not self._is_running(sid):
                del self._vsock[ep]
                self._close_later(client)

    def _close_later(self, client: httpx.AsyncClient) -> None:
        task = asyncio.get_running_loop().create_task(_close(client))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def aclose(self) -> None:
        clients = [c for _, c in self._vsock.values()]
        self._vsock.clear()
        if self._tcp is not None:
            clients.append(self._tcp)
            self._tcp = None
        for c in clients:
            await _close(c)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


async def _close(client: httpx.AsyncClient) -> None:
    with contextlib.suppress(Exception):
        await client.aclose()


__all__ = ["UpstreamClients"]
