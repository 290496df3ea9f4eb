"""Network settings through the HTTP API in-process (no VMs, a stand-in network): E2B's create
fields and PUT /network become EgressPolicy objects handed to the manager, GET reports them, what
trenvx does not enforce is a 400 naming the field; who sees tokens; ``trenvx serve``'s refusal to
bind beyond loopback without an API key; and E2B's own SDK (unmodified ``e2b``) against the app."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from trenvx.network.policy import EgressPolicy
from trenvx.server.app import create_app
from trenvx.server.auth import is_loopback
from trenvx.server.runner import UnsafeBind, check_bind, resolve_api_key

from .server_fakes import ThreadedServer, UpstreamState, fake_api, fake_manager, make_config, make_template, upstream_app


@pytest.fixture(scope="module")
def upstream():
    with ThreadedServer(upstream_app(UpstreamState())) as s:
        yield s


@pytest.fixture
async def api(tmp_path: Path, upstream):
    async with fake_api(tmp_path, upstream.port, network=True) as c:
        yield c


async def create(c: httpx.AsyncClient, **body) -> dict:
    r = await c.post("/v2/sandboxes", json={"templateID": "tpl", **body})
    assert r.status_code == 201, r.text
    return r.json()


# -- create -----------------------------------------------------------------------------------


async def test_create_with_e2b_network_fields(api) -> None:
    body = await create(api, allow_internet_access=True, network={
        "allowOut": ["1.1.1.1", "10.1.0.0/16", "Example.COM", "*.pypi.org"], "denyOut": ["0.0.0.0/0"],
        "dnsServers": ["1.1.1.1"], "allowPublicTraffic": True, "maskRequestHost": "${PORT}-app.example.org",
        "httpsPorts": [], "rules": {}, "egressProxy": None,
    })
    sb = api.manager.get(body["sandboxID"])
    assert sb.egress == EgressPolicy.from_e2b(allow_out=["1.1.1.1", "10.1.0.0/16", "example.com", "*.pypi.org"],
                                              deny_out=["0.0.0.0/0"], dns_servers=["1.1.1.1"])
    assert sb.egress.domain_allowed("files.pypi.org") and not sb.egress.domain_allowed("pypi.org")
    assert body["trafficAccessToken"] is None
    d = (await api.get(f"/sandboxes/{body['sandboxID']}")).json()
    assert d["network"] == {"allowOut": ["1.1.1.1", "10.1.0.0/16", "example.com", "*.pypi.org"],
                            "denyOut": ["0.0.0.0/0"], "dnsServers": ["1.1.1.1"], "allowPublicTraffic": True,
                            "maskRequestHost": "${PORT}-app.example.org"}
    assert d["allowInternetAccess"] is True


async def test_create_without_network_fields_is_open_and_passes_no_policy(api) -> None:
    sid = (await create(api))["sandboxID"]
    sb = api.manager.get(sid)
    assert sb.egress.is_default and sb.allow_public_traffic
    d = (await api.get(f"/sandboxes/{sid}")).json()
    assert d["network"] == {"allowOut": [], "denyOut": [], "allowPublicTraffic": True}
    assert "allowInternetAccess" not in d and "trafficAccessToken" not in d  # null is left out (E2B's client)


async def test_no_internet_is_deny_all(api) -> None:
    sid = (await create(api, allow_internet_access=False))["sandboxID"]
    sb = api.manager.get(sid)
    assert sb.egress.internet_off and not sb.egress.ip_allowed("8.8.8.8")
    d = (await api.get(f"/sandboxes/{sid}")).json()
    assert d["allowInternetAccess"] is False and d["network"]["denyOut"] == ["0.0.0.0/0"]


async def test_private_sandbox_gets_a_traffic_token_on_create_connect_and_get(api) -> None:
    body = await create(api, network={"allowPublicTraffic": False})
    token = body["trafficAccessToken"]
    assert token and api.manager.get(body["sandboxID"]).traffic_access_token == token
    assert api.manager.get(body["sandboxID"]).egress.is_default
    r = await api.post(f"/sandboxes/{body['sandboxID']}/connect", json={"timeout": 60})
    assert r.status_code == 200 and r.json()["trafficAccessToken"] == token
    d = (await api.get(f"/sandboxes/{body['sandboxID']}")).json()
    assert d["trafficAccessToken"] == token and d["network"]["allowPublicTraffic"] is False


@pytest.mark.parametrize("network,field,words", [
    ({"rules": {"api.example.com": [{"transform": {"headers": {"A": "b"}}}]}}, "network.rules", "not supported"),
    ({"egressProxy": {"address": "proxy:1080"}}, "network.egressProxy", "not supported"),
    ({"egressProxy": {}}, "network.egressProxy", "send it null"),
    ({"httpsPorts": [3000]}, "network.httpsPorts", "not supported"),
    ({"httpsPorts": [0]}, "network.httpsPorts", "greater"),
    ({"allowOut": ["not a host!"]}, "network.allowOut", "'not a host!'"),
    ({"allowOut": ["2001:db8::1"]}, "network.allowOut", "IPv6"),
    ({"denyOut": ["example.com"]}, "network.denyOut", "no domain"),
    ({"denyOut": "0.0.0.0/0"}, "network.denyOut", "list"),
    ({"dnsServers": ["dns.google"]}, "network.dnsServers", "IPv4"),
    ({"dnsServers": ["1.1.1.1"] * 11}, "network.dnsServers", "10"),
    ({"allowPublicTraffic": "false"}, "network.allowPublicTraffic", "bool"),
    ({"allowout": ["1.1.1.1"]}, "network.allowout", "unknown field"),
    ("open", "network", "object"),
])
async def test_bad_network_is_400_naming_the_field(api, network, field, words) -> None:
    r = await api.post("/sandboxes", json={"templateID": "tpl", "network": network})
    assert r.status_code == 400, r.text
    msg = r.json()["message"]
    assert field in msg and words.lower() in msg.lower(), msg
    assert api.manager.list() == []


async def test_bad_allow_internet_access_is_400(api) -> None:
    r = await api.post("/sandboxes", json={"templateID": "tpl", "allow_internet_access": "no"})
    assert r.status_code == 400 and "allow_internet_access" in r.json()["message"]


async def test_create_with_rules_on_a_host_that_cannot_enforce_them_is_409(api) -> None:
    api.manager.network_unavailable = 'network = "user": sandboxes have no egress'
    r = await api.post("/sandboxes", json={"templateID": "tpl", "network": {"allowOut": ["1.1.1.1"]}})
    assert r.status_code == 409 and "no egress" in r.json()["message"]
    assert (await api.post("/sandboxes", json={"templateID": "tpl"})).status_code == 201


# -- PUT /network -----------------------------------------------------------------------------


async def test_put_network_replaces_the_rules(api) -> None:
    sid = (await create(api, network={"allowOut": ["1.1.1.1"], "denyOut": ["8.8.0.0/16"],
                                      "maskRequestHost": "h"}))["sandboxID"]
    r = await api.put(f"/sandboxes/{sid}/network", json={"allowOut": ["example.com"], "allow_internet_access": False})
    assert r.status_code == 204, r.text
    want = EgressPolicy.from_e2b(allow_internet_access=False, allow_out=["example.com"])
    assert api.manager.egress_applied[-1] == (sid, want) and api.manager.get(sid).egress == want
    d = (await api.get(f"/sandboxes/{sid}")).json()
    assert d["network"]["allowOut"] == ["example.com"] and d["network"]["denyOut"] == ["0.0.0.0/0"]
    assert d["network"]["dnsServers"] == ["8.8.8.8"] and d["allowInternetAccess"] is False
    assert d["network"]["maskRequestHost"] == "h"  # not an egress rule: PUT leaves it
    # omitted fields are cleared: {} opens everything again
    assert (await api.put(f"/sandboxes/{sid}/network", json={})).status_code == 204
    assert api.manager.get(sid).egress.is_default
    d = (await api.get(f"/sandboxes/{sid}")).json()
    assert (d["network"]["allowOut"], d["network"]["denyOut"], d.get("allowInternetAccess")) == ([], [], None)


@pytest.mark.parametrize("body,status,words", [
    ({"denyOut": ["example.com"]}, 400, "denyOut"),
    ({"allowOut": [""]}, 400, "allowOut"),
    ({"rules": {"x.com": []}}, 400, "rules"),
    ({"egressProxy": {"address": "p:1"}}, 400, "egressProxy"),
    ({"allowPublicTraffic": False}, 400, "allowPublicTraffic"),
    ({"allow_internet_access": 0}, 400, "allow_internet_access"),
    (None, 400, "JSON body"),
])
async def test_put_network_errors(api, body, status, words) -> None:
    sid = (await create(api, network={"denyOut": ["9.9.9.9"]}))["sandboxID"]
    r = await api.put(f"/sandboxes/{sid}/network", json=body) if body is not None else \
        await api.put(f"/sandboxes/{sid}/network")
    assert r.status_code == status and words in r.json()["message"], r.text
    assert api.manager.get(sid).egress == EgressPolicy.from_e2b(deny_out=["9.9.9.9"])  # unchanged


async def test_put_network_unknown_sandbox_is_404_and_unenforceable_is_409(api) -> None:
    r = await api.put("/sandboxes/nosuch/network", json={"allowOut": ["1.1.1.1"]})
    assert r.status_code == 404 and "nosuch" in r.json()["message"]
    sid = (await create(api))["sandboxID"]
    api.manager.network_unavailable = "egress rules need network namespaces (run the server as root)"
    r = await api.put(f"/sandboxes/{sid}/network", json={"allow_internet_access": False})
    assert r.status_code == 409 and "namespaces" in r.json()["message"]
    assert api.manager.get(sid).egress.is_default


async def test_the_real_manager_without_a_network_answers_409_not_500(tmp_path: Path, upstream) -> None:
    make_template(tmp_path, "tpl")
    cfg = make_config(tmp_path)
    m = fake_manager(cfg, upstream.port)  # set_network raises NetworkUnavailable until slots exist
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(cfg, manager=m)),
                                 base_url="http://t") as c:
        sid = (await create(c))["sandboxID"]
        r = await c.put(f"/sandboxes/{sid}/network", json={"denyOut": ["1.2.3.4"]})
        assert r.status_code in (204, 409), r.text
    await m.close()


# -- who sees tokens ---------------------------------------------------------------------------


async def test_tokens_only_for_key_holders(tmp_path: Path, upstream) -> None:
    make_template(tmp_path, "tpl")
    cfg = make_config(tmp_path, api_key="s3cret")
    m = fake_manager(cfg, upstream.port, network=True)
    app = create_app(cfg, manager=m)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        r = await c.post("/sandboxes", json={"templateID": "tpl", "network": {"allowPublicTraffic": False}},
                         headers={"X-API-Key": "s3cret"})
        sid = r.json()["sandboxID"]
        for method, path in (("GET", f"/sandboxes/{sid}"), ("POST", f"/sandboxes/{sid}/connect"),
                             ("POST", f"/v2/sandboxes/{sid}/connect"), ("PUT", f"/sandboxes/{sid}/network")):
            for headers in ({}, {"X-API-Key": "wrong"}):
                r = await c.request(method, path, json={}, headers=headers)
                assert r.status_code == 401, (method, path, r.text)
                assert "Token" not in r.text and m.get(sid).access_token not in r.text
        r = await c.get(f"/sandboxes/{sid}", headers={"X-API-Key": "s3cret"})
        assert r.json()["envdAccessToken"] == m.get(sid).access_token and r.json()["trafficAccessToken"]
    await m.close()


@pytest.mark.parametrize("client,ok", [
    (("127.0.0.1", 1), True), (("127.8.9.1", 1), True), (("::1", 1), True), (("::ffff:127.0.0.1", 1), True),
    (None, True), (("10.0.2.15", 1), False), (("192.168.1.5", 1), False), (("::ffff:10.0.0.1", 1), False),
    (("2001:db8::1", 1), False),
])
async def test_without_a_key_only_local_callers_are_served(tmp_path: Path, upstream, client, ok) -> None:
    make_template(tmp_path, "tpl")
    cfg = make_config(tmp_path)
    m = fake_manager(cfg, upstream.port)
    app = create_app(cfg, manager=m)
    transport = httpx.ASGITransport(app=app, client=client)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        r = await c.post("/sandboxes", json={"templateID": "tpl"})
        if ok:
            assert r.status_code == 201, r.text
        else:
            assert r.status_code == 403 and "api_key" in r.json()["message"] and "TRENVX_API_KEY" in r.json()["message"]
            assert m.list() == []
            for path in ("/sandboxes", "/templates", "/metrics"):
                assert (await c.get(path)).status_code == 403, path
            assert (await c.get("/health")).status_code == 200
    await m.close()


# -- trenvx serve: no key, no open bind ---------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "localhost", "::1", "[::1]", "::ffff:127.0.0.1"])
def test_loopback_binds_need_no_key(host: str) -> None:
    assert is_loopback(host)
    check_bind(host, 5000, "")


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "10.0.0.5", "192.168.1.10", "example.org", "my-host"])
def test_other_binds_need_a_key(host: str) -> None:
    with pytest.raises(UnsafeBind) as ei:
        check_bind(host, 5000, "", "/etc/trenvx.toml")
    msg = str(ei.value)
    assert '[orchestrator]\n    api_key = "' in msg and "TRENVX_API_KEY" in msg and "/etc/trenvx.toml" in msg
    assert "127.0.0.1" in msg
    check_bind(host, 5000, "a-key")


def test_api_key_from_the_environment_wins(monkeypatch) -> None:
    monkeypatch.delenv("TRENVX_API_KEY", raising=False)
    assert resolve_api_key("") == ("", "")
    assert resolve_api_key("from-config") == ("from-config", "config")
    monkeypatch.setenv("TRENVX_API_KEY", "from-env")
    assert resolve_api_key("from-config") == ("from-env", "TRENVX_API_KEY")


def test_serve_refuses_an_open_bind_before_anything_starts(tmp_path: Path, monkeypatch) -> None:
    from trenvx.cli.admin import app

    root = tmp_path / "root"
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'data_root = "{root}"\n[orchestrator]\nhost = "0.0.0.0"\n')
    monkeypatch.delenv("TRENVX_API_KEY", raising=False)
    monkeypatch.delenv("TRENVX_DATA_ROOT", raising=False)
    r = CliRunner().invoke(app, ["serve", "--config", str(cfg)])
    assert r.exit_code == 2, r.output
    out = " ".join(r.output.split())
    assert "without an API key" in out and 'api_key = "' in out and "TRENVX_API_KEY" in out
    assert not root.exists()  # no data_root, lock, log or manager was made
    r = CliRunner().invoke(app, ["serve", "--config", str(cfg), "--host", "10.1.2.3"])
    assert r.exit_code == 2


# -- E2B's own SDK, unmodified, against the app ---------------------------------------------------


def test_unmodified_e2b_sdk_network_round_trip(tmp_path: Path, upstream, monkeypatch) -> None:
    e2b = pytest.importorskip("e2b")
    make_template(tmp_path, "tpl")
    cfg = make_config(tmp_path, api_key="e2b-key")
    m = fake_manager(cfg, upstream.port, network=True)
    with ThreadedServer(create_app(cfg, manager=m), lifespan="on") as srv:
        url = f"http://127.0.0.1:{srv.port}"
        for k, v in (("E2B_API_URL", url), ("E2B_SANDBOX_URL", url), ("E2B_API_KEY", "e2b-key")):
            monkeypatch.setenv(k, v)
        monkeypatch.delenv("E2B_DEBUG", raising=False)
        sbx = e2b.Sandbox.create("tpl", timeout=60, allow_internet_access=False, network={
            "allow_out": ["1.1.1.1", "*.example.com"], "deny_out": lambda ctx: [ctx.all_traffic],
            "dns_servers": ["9.9.9.9"], "allow_public_traffic": False, "mask_request_host": "${PORT}-x.test",
        })
        try:
            sb = m.get(sbx.sandbox_id)
            assert sb.egress == EgressPolicy.from_e2b(allow_internet_access=False, allow_out=["1.1.1.1", "*.example.com"],
                                                      deny_out=["0.0.0.0/0"], dns_servers=["9.9.9.9"])
            assert sbx.traffic_access_token and sbx.traffic_access_token == sb.traffic_access_token
            info = sbx.get_info()
            assert info.allow_internet_access is False
            assert info.network == {"allow_out": ["1.1.1.1", "*.example.com"], "deny_out": ["0.0.0.0/0"],
                                    "dns_servers": ["9.9.9.9"], "allow_public_traffic": False,
                                    "mask_request_host": "${PORT}-x.test"}
            sbx.update_network({"allow_out": ["10.0.0.0/8"], "deny_out": ["0.0.0.0/0"]})
            assert sb.egress == EgressPolicy.from_e2b(allow_out=["10.0.0.0/8"], deny_out=["0.0.0.0/0"])
            info = sbx.get_info()
            assert info.network["allow_out"] == ["10.0.0.0/8"] and "dns_servers" not in info.network
            assert info.allow_internet_access is None
            with pytest.raises(e2b.exceptions.SandboxException, match="rules.*not supported by trenvx"):
                sbx.update_network({"rules": {"api.example.com": [{"transform": {"headers": {"A": "b"}}}]}})
            with pytest.raises(e2b.exceptions.SandboxException, match="network.denyOut"):
                e2b.Sandbox.create("tpl", network={"deny_out": ["example.com"]})
        finally:
            sbx.kill()
