"""sandbox-cli's ``sandbox pause`` and ``sandbox resume`` against the real server app (fake VMs:
a pause ends the VM's process, a resume starts one), and how ``ls``/``info`` show a paused sandbox."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from trenvx.cli import sandbox_cli
from trenvx.server.app import create_app

from .server_fakes import ThreadedServer, UpstreamState, fake_manager, make_config, make_template, upstream_app


@pytest.fixture
def server(tmp_path: Path):
    make_template(tmp_path, "tpl")
    cfg = make_config(tmp_path)
    with ThreadedServer(upstream_app(UpstreamState())) as upstream:
        m = fake_manager(cfg, upstream.port)
        with ThreadedServer(create_app(cfg, manager=m), lifespan="on") as srv:
            srv.manager = m  # type: ignore[attr-defined]
            yield srv


def cli(server, *args: str) -> tuple[int, str]:
    sandbox_cli._target = sandbox_cli.Target()  # the CLI keeps its options in a module global
    r = CliRunner().invoke(sandbox_cli.app, ["-p", str(server.port), "-i", "127.0.0.1", *args])
    return r.exit_code, r.output


def test_pause_ls_info_resume(server) -> None:
    code, out = cli(server, "sandbox", "create", "-t", "tpl")
    sid = out.strip()
    code, out = cli(server, "sandbox", "pause", sid)
    assert code == 0 and f"{sid} paused (memory)" in out and "stored" in out, out
    assert server.manager.get(sid).state == "paused"
    code, out = cli(server, "sandbox", "ls")
    assert code == 0 and sid in out and "paused (memory)" in out and "0.0 MiB" in out, out
    code, out = cli(server, "sandbox", "info", sid)
    assert "paused" in out and "memory since" in out, out
    code, out = cli(server, "sandbox", "pause", sid)
    assert code == 1 and "already paused" in out and "HTTP 409" in out, out
    code, out = cli(server, "sandbox", "resume", sid, "--timeout", "600")
    assert code == 0 and f"{sid} resumed" in out and "its memory restored" in out, out
    assert server.manager.get(sid).state == "running" and server.manager.get(sid).timeout_left > 590
    code, out = cli(server, "sandbox", "resume", sid)
    assert code == 0 and f"{sid} was running" in out
    code, out = cli(server, "--json", "sandbox", "pause", sid, "--filesystem")
    assert code == 0 and json.loads(out)["pause"]["kind"] == "filesystem", out
    code, out = cli(server, "--json", "sandbox", "resume", sid, "--reboot")
    assert code == 0 and json.loads(out)["resumed"] is True
    assert server.manager.suspender.calls[-1] == ("resume", sid, False)


def test_create_with_a_lifecycle(server) -> None:
    code, out = cli(server, "sandbox", "create", "-t", "tpl", "--on-timeout", "pause", "--auto-resume")
    assert code == 0, out
    lc = server.manager.get(out.strip()).lifecycle
    assert (lc.auto_pause, lc.auto_pause_memory, lc.auto_resume) == (True, True, True)
    code, out = cli(server, "sandbox", "info", out.strip())
    assert "on timeout" in out and "pause, traffic resumes it" in out, out
    code, out = cli(server, "sandbox", "create", "-t", "tpl", "--on-timeout", "pause-filesystem")
    lc = server.manager.get(out.strip()).lifecycle
    assert code == 0 and (lc.auto_pause, lc.auto_pause_memory, lc.auto_resume) == (True, False, False)
    code, out = cli(server, "sandbox", "info", out.strip())
    assert "pause (filesystem only)" in out, out
    code, out = cli(server, "sandbox", "create", "-t", "tpl")
    assert code == 0 and not server.manager.get(out.strip()).lifecycle.auto_pause
    code, out = cli(server, "sandbox", "create", "-t", "tpl", "--on-timeout", "sleep")
    assert code == 2 and "'sleep'" in out and "pause-filesystem" in out, out


def test_unknown_sandbox(server) -> None:
    for cmd in ("pause", "resume"):
        code, out = cli(server, "sandbox", cmd, "nosuchsandbox")
        assert code == 1 and "nosuchsandbox" in out and "HTTP 404" in out, out
