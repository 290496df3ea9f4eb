"""``/init``'s system changes: hostname, machine id, RNG reseed (and timestamp parsing).

The hostname test runs the agent in its own UTS namespace (``unshare --uts``, we are
root) with ``--etc-dir`` pointing at a scratch copy of /etc's files, so the host keeps its
name and files. The RNG ioctls run for real (mixing bytes into the host pool is harmless).
Setting the clock cannot be confined to a namespace (time namespaces do not cover
CLOCK_REALTIME), so it is skipped here and left to the end-to-end tests in a VM.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import httpx
import pytest

from tests.unit.test_agent_harness import start_agent
from trenvx.guest.agent.connect import ConnectError
from trenvx.guest.agent.identity import machine_id_for, parse_timestamp
from trenvx.guest.client import AgentClient


def test_parse_timestamp_forms() -> None:
    expected = 1714564800_123456789
    assert parse_timestamp("2024-05-01T12:00:00.123456789Z") == expected
    assert parse_timestamp("2024-05-01T14:00:00.123456789+02:00") == expected
    assert parse_timestamp("2024-05-01t12:00:00.1234567891234Z") == expected  # extra digits dropped
    assert parse_timestamp(expected) == expected  # ns
    assert parse_timestamp(str(expected)) == expected
    assert parse_timestamp(1714564800_123456) == 1714564800_123456000  # us
    assert parse_timestamp(1714564800_123) == 1714564800_123000000  # ms
    assert parse_timestamp(1714564800) == 1714564800_000000000  # s
    assert parse_timestamp(1714564800.5) == 1714564800_500000000
    assert parse_timestamp("2024-05-01T12:00:00Z") == 1714564800_000000000
    for bad in ("yesterday", "2024-13-45T99:00:00Z", True, None, [1]):
        with pytest.raises(ConnectError):
            parse_timestamp(bad)


def test_machine_id_is_stable_and_distinct() -> None:
    a, b = machine_id_for("sbx-a"), machine_id_for("sbx-b")
    assert len(a) == 32 and int(a, 16) >= 0
    assert a == machine_id_for("sbx-a") and a != b


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare(1)")
async def test_init_sets_hostname_machine_id_and_reseeds_rng(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "hosts").write_text("127.0.0.1\tlocalhost\n127.0.1.1\ttemplate-host\n::1\tlocalhost\n")
    (etc / "hostname").write_text("template-host\n")
    host_name_before = socket.gethostname()
    agent = start_agent(tmp_path, "--skip", "clock", "--etc-dir", str(etc), prefix=["unshare", "--uts"])
    try:
        async with AgentClient(agent.url) as c:
            response = await c._http.post("/init", json={
                "sandboxId": "sbx-identity-1", "hostname": "sbx-identity-1", "envVars": {"K": "v"},
                "entropy": "q83vEjRWeJCrze8SNFZ4kA==", "timestamp": "2024-05-01T12:00:00Z",
            })
            assert response.status_code == 204
            assert "x-init-warnings" not in response.headers, response.headers.get("x-init-warnings")
            result = await c.run(["/bin/hostname"])
            assert result.stdout.strip() == b"sbx-identity-1"
            result = await c.run("echo $K")
            assert result.stdout == b"v\n"
        assert (etc / "hostname").read_text() == "sbx-identity-1\n"
        hosts = (etc / "hosts").read_text().splitlines()
        assert "127.0.1.1\tsbx-identity-1" in hosts
        assert not any("template-host" in line for line in hosts)
        assert "127.0.0.1\tlocalhost" in hosts
        assert (etc / "machine-id").read_text() == machine_id_for("sbx-identity-1") + "\n"
    finally:
        agent.stop()
    assert socket.gethostname() == host_name_before


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_rng_reseed_ioctls_work_here() -> None:
    from trenvx.guest.agent.identity import SystemIdentity

    SystemIdentity().seed_rng(os.urandom(32))


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare(1)")
def test_hostname_failure_is_reported_not_fatal(tmp_path: Path) -> None:
    """An unwritable etc dir makes /init warn (X-Init-Warnings) but still succeed."""
    agent = start_agent(tmp_path, "--skip", "clock", "--skip", "rng", "--etc-dir", str(tmp_path / "missing"),
                        prefix=["unshare", "--uts"])
    try:
        response = httpx.post(agent.url + "/init", json={"hostname": "h1", "sandboxId": "x"})
        assert response.status_code == 204
        assert "hostname" in response.headers["x-init-warnings"]
        assert "machine_id" in response.headers["x-init-warnings"]
    finally:
        agent.stop()
