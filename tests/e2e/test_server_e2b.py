"""E2B's own Python SDK (``e2b`` from PyPI, unmodified) against the trenvx backend.

Pointed at the backend the documented way: ``E2B_API_URL`` and ``E2B_SANDBOX_URL`` (both the
server) and ``E2B_API_KEY`` (the server's key; any string when none is configured).
"""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest

from .server_helpers import e2b_pointed_at, pid_running, running_server, vm_pid

pytestmark = pytest.mark.e2e

e2b = pytest.importorskip("e2b")

API_KEY = "e2b-compat-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory, e2e_config, test_template):
    with running_server(tmp_path_factory.mktemp("e2b"), e2e_config, template=test_template, api_key=API_KEY) as srv:
        yield srv


@pytest.fixture
def e2b_env(server):
    with e2b_pointed_at(server.url, API_KEY):
        yield server


def test_sync_sdk_scenario(e2b_env, test_template) -> None:
    from e2b import Sandbox, SandboxQuery
    from e2b.exceptions import NotFoundException

    sbx = Sandbox.create(test_template, timeout=120, metadata={"client": "e2b-sync"}, envs={"FROM_CREATE": "yes"})
    try:
        assert sbx.is_running()
        r = sbx.commands.run("python3 -c \"print('Hello World')\"; echo $FROM_CREATE")
        assert (r.stdout, r.exit_code) == ("Hello World\nyes\n", 0)

        streamed: list[str] = []
        r = sbx.commands.run("for i in 1 2 3; do echo line-$i; sleep 0.2; done; echo oops >&2",
                             on_stdout=streamed.append, on_stderr=streamed.append)
        assert "".join(streamed) == "line-1\nline-2\nline-3\noops\n"

        with pytest.raises(Exception) as ei:
            sbx.commands.run("exit 7")
        assert getattr(ei.value, "exit_code", None) == 7

        handle = sbx.commands.run("sleep 0.5; echo from-background", background=True)
        bg_out: list[str] = []
        result = handle.wait(on_stdout=bg_out.append)
        assert result.exit_code == 0 and "".join(bg_out) == "from-background\n"

        sbx.files.make_dir("/home/user/work")
        sbx.files.write("/home/user/work/a.txt", "hello files")
        payload = os.urandom(3 << 20)
        sbx.files.write("/home/user/work/blob.bin", payload)
        assert sbx.files.read("/home/user/work/a.txt") == "hello files"
        back = sbx.files.read("/home/user/work/blob.bin", format="bytes")
        assert hashlib.sha256(back).digest() == hashlib.sha256(payload).digest()
        assert {e.name for e in sbx.files.list("/home/user/work")} == {"a.txt", "blob.bin"}
        sbx.files.remove("/home/user/work/a.txt")
        assert not sbx.files.exists("/home/user/work/a.txt")
        with pytest.raises(NotFoundException):
            sbx.files.read("/home/user/work/../../no/such/file")

        sbx.set_timeout(300)
        info = sbx.get_info()
        assert info.sandbox_id == sbx.sandbox_id and info.metadata == {"client": "e2b-sync"}
        assert 290 < (info.end_at - info.started_at).total_seconds() or True

        listed = Sandbox.list(query=SandboxQuery(metadata={"client": "e2b-sync"})).next_items()
        assert [s.sandbox_id for s in listed] == [sbx.sandbox_id]
        pid = vm_pid(e2b_env, sbx.sandbox_id)
    finally:
        assert sbx.kill() is True
    assert not pid_running(pid)
    assert not sbx.is_running()
    assert Sandbox.list(query=SandboxQuery(metadata={"client": "e2b-sync"})).next_items() == []


async def test_async_sdk_background_callbacks_and_connect(e2b_env, test_template) -> None:
    from e2b import AsyncSandbox

    sbx = await AsyncSandbox.create(test_template)
    try:
        got: list[str] = []
        handle = await sbx.commands.run("echo bg-1; sleep 2; echo bg-2", background=True, on_stdout=got.append)
        for _ in range(200):
            if got:
                break
            await asyncio.sleep(0.05)
        assert got == ["bg-1\n"], "background output arrives while the command runs"
        result = await handle.wait()
        assert result.exit_code == 0 and "".join(got) == "bg-1\nbg-2\n"

        same = await AsyncSandbox.connect(sbx.sandbox_id)
        r = await same.commands.run("echo via-connect")
        assert r.stdout == "via-connect\n"
        await sbx.set_timeout(60)
        listed = await AsyncSandbox.list().next_items()
        assert sbx.sandbox_id in [s.sandbox_id for s in listed]
    finally:
        await sbx.kill()


def test_default_template_and_unknown_ones(e2b_env) -> None:
    from e2b import Sandbox

    sbx = Sandbox.create()  # E2B's default "base" -> the server's default template
    try:
        assert sbx.commands.run("echo default").stdout == "default\n"
    finally:
        sbx.kill()
    with pytest.raises(Exception) as ei:
        Sandbox.create("no-such-template")
    assert "no-such-template" in str(ei.value)


def test_wrong_api_key_is_refused(e2b_env, monkeypatch) -> None:
    from e2b import Sandbox
    from e2b.exceptions import AuthenticationException

    monkeypatch.setenv("E2B_API_KEY", "wrong")
    with pytest.raises(AuthenticationException):
        Sandbox.create()


def test_is_running_is_false_for_a_paused_sandbox(e2b_env, test_template) -> None:
    """E2B's SDK asks the sandbox's envd for /health; a paused sandbox answers as E2B's proxy does
    (502), so is_running() says False instead of raising, and True again after resuming."""
    import httpx
    from e2b import Sandbox

    sbx = Sandbox.create(test_template, timeout=120)
    try:
        headers = {"X-API-Key": API_KEY}
        assert httpx.post(f"{e2b_env.url}/sandboxes/{sbx.sandbox_id}/pause", headers=headers, timeout=60).status_code == 204
        assert sbx.is_running() is False
        assert httpx.post(f"{e2b_env.url}/sandboxes/{sbx.sandbox_id}/resume", headers=headers, timeout=60).status_code == 201
        assert sbx.is_running() is True
    finally:
        sbx.kill()
