"""Hybrid vsock: the host transport against a stand-in VMM socket doing the CONNECT handshake in
front of a real agent; the agent's AF_VSOCK listener starts where vsock exists and is skipped
cleanly where it does not."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import httpcore
import pytest

from tests.standins.hybrid_vsock import HybridVsockStandIn
from trenvx.guest.agent import vsock as agent_vsock
from trenvx.guest.agent.server import Agent, AgentHTTPServer
from trenvx.guest.agent.identity import SYSTEM_STEPS, SystemIdentity
from trenvx.guest.client import AgentClient
from trenvx.guest.endpoint import HybridVsockEndpoint, TcpEndpoint
from trenvx.guest.vsock import VsockHandshakeError, vsock_connect, vsock_socket


@pytest.fixture
def agent_tcp(tmp_path: Path):  # noqa: ANN201 - an in-process agent on 127.0.0.1
    import threading

    agent = Agent(system=SystemIdentity(skip=set(SYSTEM_STEPS), etc=str(tmp_path)))
    server = AgentHTTPServer(("127.0.0.1", 0), agent)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield server.server_address[:2]
    server.shutdown()
    server.server_close()
    agent.shutdown()


async def test_agent_client_over_hybrid_vsock(tmp_path: Path, agent_tcp) -> None:  # noqa: ANN001
    standin = HybridVsockStandIn(tmp_path / "v.sock", {49983: agent_tcp})
    await standin.start()
    try:
        async with AgentClient.for_endpoint(HybridVsockEndpoint(tmp_path / "v.sock", 49983)) as client:
            await client.wait_healthy(5.0)
            result = await client.run("echo over-vsock")
            assert result.exit_code == 0 and result.stdout.strip() == b"over-vsock"
            await asyncio.gather(*(client.health() for _ in range(8)))
        assert standin.connects and set(standin.connects) == {49983}
    finally:
        await standin.close()


async def test_handshake_refusals_are_connect_errors(tmp_path: Path, agent_tcp) -> None:  # noqa: ANN001
    standin = HybridVsockStandIn(tmp_path / "v.sock", {49983: agent_tcp})
    await standin.start()
    try:
        with pytest.raises(VsockHandshakeError, match="nothing listens on guest vsock port 1234"):
            await vsock_connect(tmp_path / "v.sock", 1234)
        with pytest.raises(httpcore.ConnectError, match="cannot connect to the VMM's vsock socket"):
            await vsock_connect(tmp_path / "absent.sock", 49983)
        async with AgentClient.for_endpoint(HybridVsockEndpoint(tmp_path / "v.sock", 1234)) as client:
            assert await client.health() is False  # a transport error, retried by wait_healthy
    finally:
        await standin.close()


async def test_bytes_after_the_ok_line_are_not_lost(tmp_path: Path) -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.read(100))
        await writer.drain()
        writer.close()

    target = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = target.sockets[0].getsockname()[1]
    standin = HybridVsockStandIn(tmp_path / "v.sock", {5: ("127.0.0.1", port)}, extra_after_ok=b"early")
    await standin.start()
    try:
        stream = await vsock_connect(tmp_path / "v.sock", 5)
        assert await stream.read(3) == b"ear" and await stream.read(10) == b"ly"
        await stream.write(b"ping")
        assert await stream.read(10) == b"ping"
        await stream.aclose()
    finally:
        await standin.close()
        target.close()


def test_tcp_endpoint_keeps_qemu_urls() -> None:
    assert TcpEndpoint("127.0.0.1", 4000).base_url == "http://127.0.0.1:4000"


def test_agent_vsock_listener_absent_or_present(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    agent = Agent(system=SystemIdentity(skip=set(SYSTEM_STEPS), etc=str(tmp_path)))
    try:
        def no_vsock(*a, **k):  # noqa: ANN002, ANN003, ANN202
            raise OSError(97, "Address family not supported by protocol")

        with monkeypatch.context() as m:
            m.setattr(agent_vsock.AgentVsockServer, "__init__", no_vsock)
            assert agent_vsock.start_vsock_listener(agent, 49983) is None
        if not hasattr(socket, "AF_VSOCK"):
            return
        try:  # where this host has vsock (e.g. it is itself a VM), the listener really binds
            server = agent_vsock.start_vsock_listener(agent, 40000 + (id(agent) % 20000))
        except OSError:
            server = None
        if server is not None:
            assert server.socket.family == socket.AF_VSOCK
            agent_vsock.stop_vsock_listener(server)
    finally:
        agent.shutdown()


async def test_vsock_socket_hands_over_a_plain_connected_socket(tmp_path: Path, agent_tcp) -> None:  # noqa: ANN001
    standin = HybridVsockStandIn(tmp_path / "v.sock", {49983: agent_tcp})
    await standin.start()
    try:
        sock = await vsock_socket(tmp_path / "v.sock", 49983)
        reader, writer = await asyncio.open_connection(sock=sock)  # as websockets' connect(sock=...) does
        writer.write(b"GET /health HTTP/1.1\r\nHost: vsock\r\nConnection: close\r\n\r\n")
        await writer.drain()
        assert (await reader.read()).startswith(b"HTTP/1.")
        writer.close()
        with pytest.raises(VsockHandshakeError, match="nothing listens on guest vsock port 7"):
            await vsock_socket(tmp_path / "v.sock", 7)
    finally:
        await standin.close()
    chatty = HybridVsockStandIn(tmp_path / "c.sock", {49983: agent_tcp}, extra_after_ok=b"hello")
    await chatty.start()
    try:
        with pytest.raises(VsockHandshakeError, match="spoke before the client did"):
            await vsock_socket(tmp_path / "c.sock", 49983)
    finally:
        await chatty.close()
