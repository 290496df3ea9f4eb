"""UpstreamClients: a client (and its kept-alive connections) belongs to one VM of one sandbox.

A slot's address, a forwarded port or a vsock socket goes to a later VM once a sandbox ends, is
paused and resumed, or moves. The e2e counterpart (a reused slot address, real VMs) is in
tests/e2e/test_network.py; here the ownership rules alone, with a dict for the running VMs."""

from __future__ import annotations

from pathlib import Path

import httpx

from trenvx.guest.endpoint import HybridVsockEndpoint, TcpEndpoint
from trenvx.server.upstreams import UpstreamClients


def clients(running: dict[str, int]) -> UpstreamClients:
    return UpstreamClients(running.get)


async def test_one_vm_reuses_its_client_per_endpoint() -> None:
    running = {"a": 100}
    up = clients(running)
    ep = TcpEndpoint("10.200.0.2", 49983)
    first = up.client_for("a", ep)
    assert up.client_for("a", ep) is first
    assert up.client_for("a", TcpEndpoint("10.200.0.2", 8080)) is not first
    await up.aclose()
    assert first.is_closed


async def test_an_endpoint_taken_by_another_sandbox_gets_a_new_client_and_the_old_one_closes() -> None:
    running = {"a": 100}
    up = clients(running)
    ep = TcpEndpoint("10.200.0.2", 49983)
    old = up.client_for("a", ep)
    del running["a"]
    running["b"] = 200  # the slot's address is b's now
    new = up.client_for("b", ep)
    assert new is not old and not new.is_closed
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
    assert up.owners() == {ep: ("a", 101)}
    await up.aclose()
    assert old.is_closed


async def test_clients_of_ended_vms_are_swept_when_a_new_one_is_made() -> None:
    running = {"a": 100, "b": 200}
    up = clients(running)
    a_ep, b_ep = TcpEndpoint("10.200.0.2", 49983), TcpEndpoint("10.200.0.6", 49983)
    a_client = up.client_for("a", a_ep)
    up.client_for("b", b_ep)
    del running["a"]
    up.client_for("c", TcpEndpoint("10.200.0.10", 49983))  # c not (yet) running: still given a client
    assert set(up.owners()) == {b_ep, TcpEndpoint("10.200.0.10", 49983)}
    await up.aclose()
    assert a_client.is_closed


async def test_the_servers_proxy_environment_is_not_used(monkeypatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("ALL_PROXY", "http://127.0.0.1:9")
    up = clients({"a": 1})
    client = up.client_for("a", TcpEndpoint("10.200.0.2", 49983))
    assert isinstance(client._transport_for_url(httpx.URL("http://10.200.0.2:49983/")), httpx.AsyncHTTPTransport)
    assert not client._mounts
    await up.aclose()
