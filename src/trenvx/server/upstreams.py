"""The HTTP clients the proxy reaches sandbox ports with: one per endpoint of each running VM.

An endpoint is a TCP address (a slot's guest address, QEMU's forwards on 127.0.0.1) or a port
behind a hybrid vsock socket (Firecracker, Cloud Hypervisor). Its client keeps connections alive
(:func:`~trenvx.guest.channel.transport_for`: connections to a forwarded port are opened one at a
time) and belongs to one VM, named by its sandbox and VMM process. Addresses outlive their VMs: a
slot's address, a forwarded port or a vsock socket path goes to a later VM once a sandbox ends or
moves. A connection kept from the earlier VM must never carry the later one's first request (its
namespace went away without a FIN, so the connection looks alive; the request met a reset and a
502). So a client is closed, with its connections, as soon as its endpoint is asked for by
another VM, and clients of VMs that no longer run are swept whenever a new client is made.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import httpx

from ..guest.channel import transport_for
from ..guest.endpoint import AgentEndpoint

TIMEOUT = httpx.Timeout(connect=10.0, read=None, write=None, pool=None)
"""Connect within 10 s; then no limit: streams (command output, uploads) last as long as they last."""
LIMITS = httpx.Limits(max_connections=None, max_keepalive_connections=32, keepalive_expiry=30)
"""Per endpoint of one VM."""

VmOwner = tuple[str, int | None]
"""A sandbox id and the pid of the VMM process that runs it now (None: it did not run)."""


class UpstreamClients:
    """httpx clients to sandbox endpoints. ``vmm_of(sandbox_id)`` is the pid of the VMM process that
    runs the sandbox now, or None when it does not run."""

    def __init__(self, vmm_of: Callable[[str], int | None]) -> None:
        self._vmm_of = vmm_of
        self._clients: dict[AgentEndpoint, tuple[VmOwner, httpx.AsyncClient]] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def client_for(self, sandbox_id: str, endpoint: AgentEndpoint) -> httpx.AsyncClient:
        """The client whose connections reach ``endpoint`` of the VM that runs ``sandbox_id`` now."""
        owner = (sandbox_id, self._vmm_of(sandbox_id))
        entry = self._clients.get(endpoint)
        if entry is not None:
            if entry[0] == owner:
                return entry[1]
            del self._clients[endpoint]
            self._close_later(entry[1])  # another VM's: its connections reach nothing of this one
        self._sweep()
        # trust_env off: an HTTP(S)_PROXY of the server's environment must not carry sandbox traffic.
        client = httpx.AsyncClient(timeout=TIMEOUT, transport=transport_for(endpoint, LIMITS),
                                   follow_redirects=False, trust_env=False)
        self._clients[endpoint] = (owner, client)
        return client

    def owners(self) -> dict[AgentEndpoint, VmOwner]:
        """The endpoints that have a client, with the VM each belongs to (for tests and diagnostics)."""
        return {ep: owner for ep, (owner, _) in self._clients.items()}

    def _sweep(self) -> None:
        """Close the clients of VMs that no longer run (their connections would only fail)."""
        for ep, ((sid, pid), client) in list(self._clients.items()):
            now = self._vmm_of(sid)
            if now is None or now != pid:
                del self._clients[ep]
                self._close_later(client)

    def _close_later(self, client: httpx.AsyncClient) -> None:
        task = asyncio.get_running_loop().create_task(_close(client))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def aclose(self) -> None:
        clients = [c for _, c in self._clients.values()]
        self._clients.clear()
        for c in clients:
            await _close(c)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


async def _close(client: httpx.AsyncClient) -> None:
    with contextlib.suppress(Exception):
        await client.aclose()


__all__ = ["UpstreamClients", "VmOwner"]
