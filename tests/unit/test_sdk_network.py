"""sandbox_sdk's network options against a fake backend: the create and PUT /network bodies sent
(E2B's Python shapes in, E2B's REST shapes out), the info parsed back, client-side mistakes named;
and the three surfaces (async, sync, TrEnv-X) against the real server app in-process."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from sandbox_sdk import exceptions
from sandbox_sdk.e2b import ALL_TRAFFIC, AsyncSandbox, Sandbox
from sandbox_sdk.sandbox import Sandbox as TrenvxSandbox

from .test_sdk_client import FakeBackend, conn


@pytest.fixture
def fake() -> FakeBackend:
    return FakeBackend()


def body_of(fake: FakeBackend, path: str) -> dict[str, Any]:
    return json.loads(fake.last(path).content)


async def test_create_sends_e2b_network_fields(fake: FakeBackend) -> None:
    fake.sandbox["trafficAccessToken"] = "traffic-tok"
    sbx = await AsyncSandbox.create("tpl", allow_internet_access=False, network={
        "allow_out": ["1.1.1.1", "*.example.com"], "deny_out": lambda ctx: [ctx.all_traffic],
        "dns_servers": ["9.9.9.9"], "allow_public_traffic": False, "mask_request_host": "${PORT}-x.test",
    }, **conn(fake))
    body = body_of(fake, "/sandboxes")
    assert body["allow_internet_access"] is False
    assert body["network"] == {"allowOut": ["1.1.1.1", "*.example.com"], "denyOut": ["0.0.0.0/0"],
                               "dnsServers": ["9.9.9.9"], "allowPublicTraffic": False,
                               "maskRequestHost": "${PORT}-x.test"}
    assert sbx.traffic_access_token == "traffic-tok"
    await sbx.close()


async def test_create_without_network_sends_none_and_has_no_traffic_token(fake: FakeBackend) -> None:
    sbx = await AsyncSandbox.create("tpl", **conn(fake))
    body = body_of(fake, "/sandboxes")
    assert "network" not in body and "allow_internet_access" not in body
    assert sbx.traffic_access_token is None
    await sbx.close()


async def test_unsupported_options_reach_the_backend_which_names_them(fake: FakeBackend) -> None:
    fake.route("POST", "/sandboxes", lambda r: httpx.Response(400, json={
        "code": 400, "message": "body field network.rules: per-domain request transform rules are not supported"}))
    with pytest.raises(exceptions.InvalidArgumentError, match="network.rules"):
        await AsyncSandbox.create("tpl", network={"rules": {"api.example.com": []}, "https_ports": [3000],
                                                  "egress_proxy": {"address": "p:1080"}}, **conn(fake))
    assert body_of(fake, "/sandboxes")["network"] == {"rules": {"api.example.com": []}, "httpsPorts": [3000],
                                                      "egressProxy": {"address": "p:1080"}}


@pytest.mark.parametrize("kwargs,words", [
    ({"network": {"allow_out": "1.1.1.1"}}, "wrap a single entry"),
    ({"network": {"deny_out": [1]}}, "not a string"),
    ({"network": {"allowOut": ["1.1.1.1"]}}, "unknown option(s) 'allowOut'"),
    ({"network": {"allow_public_traffic": "no"}}, "True or False"),
    ({"network": ["1.1.1.1"]}, "must be a dict"),
    ({"allow_internet_access": "no"}, "True or False"),
])
async def test_client_side_mistakes_are_named_before_sending(fake: FakeBackend, kwargs, words) -> None:
    with pytest.raises(exceptions.InvalidArgumentError) as ei:
        await AsyncSandbox.create("tpl", **kwargs, **conn(fake))
    assert words in str(ei.value)
    assert fake.requests == []


async def test_update_network_and_info(fake: FakeBackend) -> None:
    fake.route("PUT", "/sandboxes/sbx1/network", lambda r: httpx.Response(204))
    fake.route("GET", "/sandboxes/sbx1", lambda r: httpx.Response(200, json={
        **fake.sandbox, "state": "running", "allowInternetAccess": False,
        "network": {"allowOut": ["example.com"], "denyOut": ["0.0.0.0/0"], "dnsServers": ["8.8.8.8"],
                    "allowPublicTraffic": True}}))
    sbx = await AsyncSandbox.create("tpl", **conn(fake))
    await sbx.update_network({"allow_out": ["example.com"], "allow_internet_access": False})
    assert body_of(fake, "/sandboxes/sbx1/network") == {"allowOut": ["example.com"], "allow_internet_access": False}
    await AsyncSandbox.update_network("sbx1", {}, **conn(fake))
    assert body_of(fake, "/sandboxes/sbx1/network") == {}
    info = await sbx.get_info()
    assert info.allow_internet_access is False
    assert info.network == {"allow_out": ["example.com"], "deny_out": ["0.0.0.0/0"], "dns_servers": ["8.8.8.8"],
                            "allow_public_traffic": True}
    with pytest.raises(exceptions.InvalidArgumentError, match="egressProxy"):
        await sbx.update_network({"egressProxy": {}})
    fake.route("PUT", "/sandboxes/sbx1/network", lambda r: httpx.Response(
        409, json={"code": 409, "message": "egress rules need network namespaces"}))
    with pytest.raises(exceptions.ConflictError, match="namespaces"):
        await sbx.update_network({"deny_out": [ALL_TRAFFIC]})
    fake.route("PUT", "/sandboxes/sbx1/network", lambda r: httpx.Response(404, json={"code": 404, "message": "gone"}))
    with pytest.raises(exceptions.SandboxNotFoundError):
        await sbx.update_network({})
    await sbx.close()


def test_sync_surface(fake: FakeBackend) -> None:
    fake.route("PUT", "/sandboxes/sbx1/network", lambda r: httpx.Response(204))
    fake.sandbox["trafficAccessToken"] = "t2"
    sbx = Sandbox.create("tpl", allow_internet_access=True, network={"deny_out": ["10.0.0.0/8"]}, **conn(fake))
    assert body_of(fake, "/sandboxes")["network"] == {"denyOut": ["10.0.0.0/8"]}
    assert sbx.traffic_access_token == "t2"
    sbx.update_network({"deny_out": ["10.0.0.0/8"], "dns_servers": []})
    assert body_of(fake, "/sandboxes/sbx1/network") == {"denyOut": ["10.0.0.0/8"], "dnsServers": []}
    Sandbox.update_network("sbx1", {"allow_internet_access": True}, **conn(fake))
    assert body_of(fake, "/sandboxes/sbx1/network") == {"allow_internet_access": True}
    sbx.close()


async def test_trenvx_surface(fake: FakeBackend) -> None:
    fake.route("PUT", "/sandboxes/sbx1/network", lambda r: httpx.Response(204))
    ci = await TrenvxSandbox.create(template="default-sandbox", allow_internet_access=False,
                                    network={"allow_out": ["pypi.org"]}, **conn(fake))
    body = body_of(fake, "/sandboxes")
    assert body["allow_internet_access"] is False and body["network"] == {"allowOut": ["pypi.org"]}
    assert ci.traffic_access_token is None
    await ci.update_network({"allow_out": ["pypi.org", "*.pythonhosted.org"], "deny_out": [ALL_TRAFFIC]})
    assert body_of(fake, "/sandboxes/sbx1/network") == {"allowOut": ["pypi.org", "*.pythonhosted.org"],
                                                        "denyOut": ["0.0.0.0/0"]}
    info = await ci.get_info()
    assert info.sandbox_id == "sbx1" and info.network is None
    await ci.close()


# -- against the real server app (fake VMs, stand-in network) ------------------------------------------


async def test_all_surfaces_against_the_server_app(tmp_path: Path) -> None:
    from trenvx.network.policy import EgressPolicy
    from trenvx.server.app import create_app

    from .server_fakes import ThreadedServer, UpstreamState, fake_manager, make_config, make_template, upstream_app

    make_template(tmp_path, "tpl")
    cfg = make_config(tmp_path)
    with ThreadedServer(upstream_app(UpstreamState())) as upstream:
        m = fake_manager(cfg, upstream.port, network=True)
        await m.start()
        transport = httpx.ASGITransport(app=create_app(cfg, manager=m))
        c = {"api_url": "http://t", "transport": transport}
        sbx = await AsyncSandbox.create("tpl", allow_internet_access=False,
                                        network={"allow_out": ["1.1.1.1"], "allow_public_traffic": False}, **c)
        assert m.get(sbx.sandbox_id).egress == EgressPolicy.from_e2b(allow_internet_access=False, allow_out=["1.1.1.1"])
        assert sbx.traffic_access_token == m.get(sbx.sandbox_id).traffic_access_token
        again = await AsyncSandbox.connect(sbx.sandbox_id, **c)
        assert again.traffic_access_token == sbx.traffic_access_token
        await again.update_network({"deny_out": ["10.0.0.0/8"]})
        info = await sbx.get_info()
        assert info.network == {"allow_out": [], "deny_out": ["10.0.0.0/8"], "allow_public_traffic": False}
        assert info.allow_internet_access is None
        with pytest.raises(exceptions.InvalidArgumentError, match="network.denyOut.*example.com"):
            await AsyncSandbox.create("tpl", network={"deny_out": ["example.com"]}, **c)
        with pytest.raises(exceptions.InvalidArgumentError, match="network.httpsPorts.*not supported by trenvx"):
            await AsyncSandbox.create("tpl", network={"https_ports": [8443]}, **c)
        ci = await TrenvxSandbox.create(template="tpl", network={"allow_out": ["example.com"],
                                                                 "deny_out": [ALL_TRAFFIC]}, **c)
        assert (await ci.get_info()).network == {"allow_out": ["example.com"], "deny_out": ["0.0.0.0/0"],
                                                 "dns_servers": ["8.8.8.8"], "allow_public_traffic": True}
        for s in (again, sbx):
            await s.kill()
        await ci.close()
        await m.close()
