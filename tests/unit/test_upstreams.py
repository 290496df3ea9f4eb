"""UpstreamClients: a client (and its kept-alive connections) belongs to one VM of one sandbox.

A slot's address, a forwarded port or a vsock socket goes to a later VM once a sandbox ends, is
paused and resumed, or moves. The e2e counterpart (a reused slot address, real VMs) is in
tests/e2e/test_network.py; here the ownership rules alone, with a dict for the running VMs."""

from __future__ import annotations

from pathlib import Path

from trenvx.guest.endpoint import HybridVsockEndpoint, TcpEndpoint
from trenvx.server.upstreams import UpstreamClients


def clients(running: dict[str, int]) -> UpstreamClients:
    return UpstreamClients(running.get)


async def test_one_vm_has_one_client_for_all_its_tcp_ports() -> None:
    running = {"a": 100}
    up = clients(running)
    first = up.client_for("a", TcpEndpoint("10.200.0.2", 49983))
    assert up.client_for("a", TcpEndpoint("10.200.0.2", 49983)) is first
    for port in range(1000, 3000):  # a port scan of a sandbox makes no client per port
        assert up.client_for("a", TcpEndpoint("10.200.0.2", port)) is first
    assert up.owners() == {("a", 100): 1}
    await up.aclose()
    assert first.is_closed


async def test_an_address_taken_by_another_sandbox_is_reached_with_that_sandboxs_client() -> None:
    running = {"a": 100}
    up = clients(running)
    ep = TcpEndpoint("10.200.0.2", 49983)
    old = up.client_for("a", ep)
    del running["a"]
    running["b"] = 200  # the slot's address is b's now
    new = up.client_for("b", ep)
    assert new is not old and not new.is_closed
    assert up.owners() == {("b", 200): 1}  # a's client was closed when b's was made
    await up.aclose()
    assert old.is_closed and new.is_closed
    assert up.owners() == {}


async def test_the_same_sandbox_in_a_new_vmm_process_gets_a_new_client() -> None:
    running = {"a": 100}
    up = clients(running)
    ep = HybridVsockEndpoint(Path("/tmp/x.vsock"), 49983)
    old = up.client_for("a", ep)
    running["a"] = 101  # paused and resumed: another VMM process behind the same path
    new = up.client_for("a", ep)
    assert new is not old
    assert up.owners() == {("a", 101): 1}
    await up.aclose()
    assert old.is_closed


async def test_vsock_endpoints_have_a_client_each() -> None:
    up = clients({"a": 1})
    agent = up.client_for("a", HybridVsockEndpoint(Path("/tmp/a.vsock"), 49983))
    other = up.client_for("a", HybridVsockEndpoint(Path("/tmp/a.vsock"), 8080))
    assert agent is not other and up.owners() == {("a", 1): 2}
    await up.aclose()


async def test_clients_of_ended_vms_are_swept_when_a_new_one_is_made() -> None:
    running = {"a": 100, "b": 200}
    up = clients(running)
    a_client = up.client_for("a", TcpEndpoint("10.200.0.2", 49983))
    up.client_for("b", TcpEndpoint("10.200.0.6", 49983))
    del running["a"]
    up.client_for("c", TcpEndpoint("10.200.0.10", 49983))  # c not (yet) running: still given a client
    assert set(up.owners()) == {("b", 200), ("c", None)}
    await up.aclose()
    assert a_client.is_closed
