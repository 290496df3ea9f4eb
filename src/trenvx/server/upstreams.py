"""The HTTP clients the proxy reaches sandbox ports with: one per running VM.

An endpoint is a TCP address (a slot's guest address, QEMU's forwards on 127.0.0.1) or a port
behind a hybrid vsock socket (Firecracker, Cloud Hypervisor). A client keeps connections alive
(:func:`~trenvx.guest.channel.transport_for`: connections to a forwarded port are opened one at a
time) and belongs to one VM, named by its sandbox and VMM process. Addresses outlive their VMs: a
slot's address, a forwarded port or a vsock socket path goes to a later VM once a sandbox ends or
moves. A connection kept from the earlier VM must never carry the later one's request (its
namespace went away without a FIN, so the connection looks alive; the request met a reset and a
502). So each VM has its own client: its TCP ports share one (httpx pools connections per
address, so a sandbox reached on many ports still has one client), a vsock endpoint has its own
(its transport is bound to the socket). The clients of VMs that no longer run are closed whenever
a new VM's client is made, so they are bounded by the VMs that run.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Hashable

import httpx

from ..guest.channel import forwarded_port_transport, transport_for
from ..guest.endpoint import AgentEndpoint, HybridVsockEndpoint

TIMEOUT = httpx.Timeout(connect=10.0, read=None, write=None, pool=None)
"""Connect within 10 s; then no limit: streams (command output, uploads) last as long as they last."""
KEEPALIVE_S = 4.0
"""How long an idle connection is kept: under the 5 s after which Node's and uvicorn's servers close
theirs, so that the proxy does not pick one as they close it (a request sent then meets a reset)."""
LIMITS = httpx.Limits(max_connections=None, max_keepalive_connections=32, keepalive_expiry=KEEPALIVE_S)
"""Per VM (per vsock endpoint of a VM)."""

VmOwner = tuple[str, Hashable]
"""A sandbox id and what identifies the VMM process that runs it now (None: it did not run)."""
_Key = tuple[VmOwner, HybridVsockEndpoint | None]


class UpstreamClients:
    """httpx clients to sandbox endpoints. ``vmm_of(sandbox_id)`` identifies the VMM process that
    runs the sandbox now (any hashable that differs between two processes), or None when it does
    not run."""

    def __init__(self, vmm_of: Callable[[str], Hashable | None]) -> None:
        self._vmm_of = vmm_of
        self._clients: dict[_Key, httpx.AsyncClient] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def client_for(self, sandbox_id: str, endpoint: AgentEndpoint) -> httpx.AsyncClient:
        """The client whose connections reach ``endpoint`` of the VM that runs ``sandbox_id`` now."""
        owner: VmOwner = (sandbox_id, self._vmm_of(sandbox_id))
        key: _Key = (owner, endpoint if isinstance(endpoint, HybridVsockEndpoint) else None)
        client = self._clients.get(key)
        if client is not None:
            return client
        self._sweep()
        if isinstance(endpoint, HybridVsockEndpoint):
            transport = transport_for(endpoint, LIMITS)
        else:
            transport = forwarded_port_transport(LIMITS)
        # trust_env off: nothing of the server's environment (.netrc, proxies) applies to sandbox traffic.
        client = httpx.AsyncClient(timeout=TIMEOUT, transport=transport, follow_redirects=False, trust_env=False)
        self._clients[key] = client
        return client

    def owners(self) -> dict[VmOwner, int]:
        """The VMs that have clients, with how many (for tests and diagnostics)."""
        out: dict[VmOwner, int] = {}
        for owner, _ in self._clients:
            out[owner] = out.get(owner, 0) + 1
        return out

    def _sweep(self) -> None:
        """Close the clients of VMs that no longer run (their connections would only fail)."""
        current: dict[str, Hashable | None] = {}
        for key, client in list(self._clients.items()):
            (sid, vmm), _ = key
            if sid not in current:
                current[sid] = self._vmm_of(sid)
            if current[sid] is None or current[sid] != vmm:
                del self._clients[key]
                self._close_later(client)

    def _close_later(self, client: httpx.AsyncClient) -> None:
        task = asyncio.get_running_loop().create_task(_close(client))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def aclose(self) -> None:
        clients = list(self._clients.values())
        self._clients.clear()
        for c in clients:
            await _close(c)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


async def _close(client: httpx.AsyncClient) -> None:
    with contextlib.suppress(Exception):
        await client.aclose()


__all__ = ["UpstreamClients", "VmOwner"]
