"""A stand-in for a VMM's hybrid vsock socket: answers ``CONNECT <port>\\n`` with ``OK <n>\\n`` when
``port`` is in ``ports`` (then pipes the bytes to that port's TCP target), else closes, as
Firecracker and Cloud Hypervisor do when nothing listens on the guest port."""

from __future__ import annotations

import asyncio
from pathlib import Path


class HybridVsockStandIn:
    def __init__(self, path: Path, ports: dict[int, tuple[str, int]], extra_after_ok: bytes = b"") -> None:
        self.path = path
        self.ports = ports
        self.extra_after_ok = extra_after_ok
        self.connects: list[int] = []
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))

    async def close(self) -> None:
        if self._server:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            words = line.split()
            if len(words) != 2 or words[0] != b"CONNECT" or not words[1].isdigit() or int(words[1]) not in self.ports:
                return
            port = int(words[1])
            self.connects.append(port)
            r2, w2 = await asyncio.open_connection(*self.ports[port])
            writer.write(b"OK 1073741824\n" + self.extra_after_ok)
            await writer.drain()

            async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
                try:
                    while data := await src.read(65536):
                        dst.write(data)
                        await dst.drain()
                except ConnectionError:
                    pass
                finally:
                    dst.close()

            await asyncio.gather(pipe(reader, w2), pipe(r2, writer))
        except asyncio.CancelledError:  # the stand-in's loop is shutting down: the connection just ends
            pass
        finally:
            writer.close()
