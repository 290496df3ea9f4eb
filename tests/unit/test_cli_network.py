"""sandbox-cli's network options against the real server app (fake VMs, a stand-in network):
``create --no-internet --allow-out --deny-out``, ``network ID ...`` (show / replace / --clear),
``info ID`` showing the rules, and errors naming the bad entry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from trenvx.cli import sandbox_cli
from trenvx.network.policy import EgressPolicy
from trenvx.server.app import create_app

from .server_fakes import ThreadedServer, UpstreamState, fake_manager, make_config, make_template, upstream_app


@pytest.fixture
def server(tmp_path: Path):
    make_template(tmp_path, "tpl")
    cfg = make_config(tmp_path)
    with ThreadedServer(upstream_app(UpstreamState())) as upstream:
        m = fake_manager(cfg, upstream.port, network=True)
        with ThreadedServer(create_app(cfg, manager=m), lifespan="on") as srv:
            srv.manager = m  # type: ignore[attr-defined]
            yield srv


def cli(server, *args: str) -> tuple[int, str]:
    sandbox_cli._target = sandbox_cli.Target()  # the CLI keeps its options in a module global
    r = CliRunner().invoke(sandbox_cli.app, ["-p", str(server.port), "-i", "127.0.0.1", *args])
    return r.exit_code, r.output


def test_create_with_rules_then_info_and_network(server) -> None:
    code, out = cli(server, "sandbox", "create", "-t", "tpl", "--no-internet", "--allow-out", "1.1.1.1",
                    "--allow-out", "*.example.com", "--deny-out", "10.0.0.0/8", "--dns-server", "9.9.9.9")
    assert code == 0, out
    sid = out.strip()
    m = server.manager
    assert m.get(sid).egress == EgressPolicy.from_e2b(
        allow_internet_access=False, allow_out=["1.1.1.1", "*.example.com"], deny_out=["10.0.0.0/8"],
        dns_servers=["9.9.9.9"])

    code, out = cli(server, "sandbox", "info", sid)
    assert code == 0, out
    for words in ("template", "tpl", "only what allow-out names", "1.1.1.1, *.example.com",
                  "10.0.0.0/8, 0.0.0.0/0", "9.9.9.9", "internet access", "off"):
        assert words in out, (words, out)
    code, out = cli(server, "--json", "sandbox", "info", sid)
    assert json.loads(out)["network"]["allowOut"] == ["1.1.1.1", "*.example.com"]

    code, out = cli(server, "sandbox", "network", sid)
    assert code == 0 and "only what allow-out names" in out

    code, out = cli(server, "sandbox", "network", sid, "--deny-out", "192.0.2.0/24")
    assert code == 0, out
    assert m.get(sid).egress == EgressPolicy.from_e2b(deny_out=["192.0.2.0/24"])
    assert "open, except what deny-out names" in out and "192.0.2.0/24" in out

    code, out = cli(server, "sandbox", "network", sid, "--no-internet")
    assert code == 0 and m.get(sid).egress.internet_off and "no egress" in out

    code, out = cli(server, "--json", "sandbox", "network", sid, "--clear")
    assert code == 0 and m.get(sid).egress.is_default
    assert json.loads(out)["network"]["denyOut"] == []


def test_create_private_and_open(server) -> None:
    code, out = cli(server, "--json", "sandbox", "create", "-t", "tpl", "--no-public-traffic")
    assert code == 0, out
    data = json.loads(out)
    assert data["trafficAccessToken"] == server.manager.get(data["sandboxID"]).traffic_access_token
    code, out = cli(server, "sandbox", "info", data["sandboxID"])
    assert "public traffic" in out and "traffic access token" in out
    code, out = cli(server, "sandbox", "create", "-t", "tpl")
    assert code == 0 and server.manager.get(out.strip()).egress.is_default


def test_errors_name_the_entry(server) -> None:
    code, out = cli(server, "sandbox", "create", "-t", "tpl", "--deny-out", "example.com")
    assert code == 1 and "denyOut" in out and "example.com" in out and "HTTP 400" in out
    sid = cli(server, "sandbox", "create", "-t", "tpl")[1].strip()
    code, out = cli(server, "sandbox", "network", sid, "--allow-out", "bad host")
    assert code == 1 and "allowOut" in out and "bad host" in out
    code, out = cli(server, "sandbox", "network", sid, "--clear", "--no-internet")
    assert code == 2 and "--clear" in out
    code, out = cli(server, "sandbox", "network", "nosuch", "--no-internet")
    assert code == 1 and "HTTP 404" in out
