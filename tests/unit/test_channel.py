"""Connections to a port forwarded by QEMU's user networking are opened one at a time."""

from __future__ import annotations

import asyncio

from trenvx.guest.channel import SerialConnectBackend


class RecordingBackend:
    def __init__(self) -> None:
        self.active: dict[int, int] = {}
        self.peak: dict[int, int] = {}

    async def connect_tcp(self, host: str, port: int, **kw: object) -> str:
        self.active[port] = self.active.get(port, 0) + 1
        self.peak[port] = max(self.peak.get(port, 0), self.active[port])
        await asyncio.sleep(0.01)
        self.active[port] -= 1
        return f"{host}:{port}"


async def test_one_port_is_connected_serially_and_ports_in_parallel() -> None:
    inner = RecordingBackend()
    backend = SerialConnectBackend(inner)  # type: ignore[arg-type]
    t0 = asyncio.get_running_loop().time()
    streams = await asyncio.gather(*(backend.connect_tcp("127.0.0.1", 1000 + i % 2) for i in range(10)))
    elapsed = asyncio.get_running_loop().time() - t0
    assert sorted(set(streams)) == ["127.0.0.1:1000", "127.0.0.1:1001"]
    assert inner.peak == {1000: 1, 1001: 1}
    assert elapsed < 0.09, "the two ports must not wait for each other"
    assert backend._locks == {}, "no lock is kept for ports nobody is connecting to"
