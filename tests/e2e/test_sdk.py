"""sandbox_sdk end to end, TrEnv-X surface: a real backend, real VMs restored from the test template.

The backend is the session's ``trenvx serve`` (``backend_url`` in ``tests/conftest.py``).
``tests/e2e/test_sdk_e2b.py`` covers the E2B-style surface and reuses these fixtures.
"""

from __future__ import annotations

import asyncio
import os
import sys
import textwrap
import time
from pathlib import Path

from tests.e2e.server_helpers import free_port

import httpx
import pytest

from sandbox_sdk import BackendUnreachableError, SandboxNotFoundError, TemplateNotFoundError, exceptions
from sandbox_sdk.e2b import AsyncSandbox
from sandbox_sdk.sandbox import Sandbox

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
E2E_CONFIG = ROOT / "tests" / "e2e" / "e2e_config.toml"
async def _kill_new(backend: str, before: set[str]) -> None:
    for s in await AsyncSandbox.list(api_url=backend):
        if s.sandbox_id not in before:
            await AsyncSandbox.kill(s.sandbox_id, api_url=backend)


# The example of the issue, verbatim except for the template name.
EXAMPLE = textwrap.dedent(
    """
    import asyncio
    from sandbox_sdk.sandbox import Sandbox
    async def main():
        ci = await Sandbox.create(template="default-sandbox", target_addr="127.0.0.1")
        p = await ci.process.start("python -c \\"print('Hello World')\\"")
        await p.wait()
        print(p.stdout)
    asyncio.run(main())
    """
)


async def _has_python(backend: str, template: str) -> bool:
    async with await AsyncSandbox.create(template, api_url=backend) as s:
        r = await s.commands.run("command -v python || true")
        return bool(r.stdout.strip())


async def test_trenvx_example_verbatim(sdk_backend: str, backend_port: int, test_template: str, tmp_path: Path) -> None:
    if not await _has_python(sdk_backend, test_template):
        pytest.skip(f"template {test_template} has no `python` command (the example runs `python -c`)")
    before = {s.sandbox_id for s in await AsyncSandbox.list(api_url=sdk_backend)}
    code = EXAMPLE.replace('"default-sandbox"', repr(test_template))
    env = {k: v for k, v in os.environ.items() if k not in ("SANDBOX_BACKEND_ADDR", "TRENVX_API_URL")}
    env["SANDBOX_BACKEND_PORT"] = str(backend_port)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode == 0, err.decode()
        assert out.decode() == "Hello World\n"
    finally:
        await _kill_new(sdk_backend, before)


async def test_examples_hello_py(sdk_backend: str, backend_port: int, test_template: str) -> None:
    env = {
        **os.environ,
        "SANDBOX_BACKEND_ADDR": "127.0.0.1",
        "SANDBOX_BACKEND_PORT": str(backend_port),
        "TRENVX_TEMPLATE": test_template,
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "examples" / "hello.py"),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    assert "Hello World" in out.decode()


@pytest.fixture
async def ci(sdk_backend: str, backend_port: int, test_template: str) -> Sandbox:
    s = await Sandbox.create(
        template=test_template,
        target_addr="127.0.0.1",
        port=backend_port,
        cwd="/srv",
        env_vars={"SBX_GLOBAL": "g"},
        metadata={"suite": "sdk-trenvx"},
    )
    yield s
    await s.close()


async def test_processes(ci: Sandbox) -> None:
    p = await ci.process.start("python3 -c \"print('Hello World')\"")
    await p.wait()
    assert p.stdout == "Hello World" and p.exit_code == 0 and p.error is False

    lines: list[tuple[str, float]] = []
    exits: list[int] = []
    t0 = time.monotonic()
    p = await ci.process.start(
        "echo $SBX_GLOBAL $SBX_LOCAL; pwd; sleep 2; echo late; echo bad >&2; exit 5",
        env_vars={"SBX_LOCAL": "l"},
        on_stdout=lambda m: lines.append((m.line, time.monotonic() - t0)),
        on_exit=exits.append,
    )
    out = await p.wait(timeout=60)
    assert [line for line, _ in lines] == ["g l", "/srv", "late"]
    assert lines[2][1] - lines[1][1] > 1.5  # "/srv" arrived before the sleep ended: streamed
    assert out.exit_code == 5 and exits == [5] and out.stderr == "bad" and p.error is True
    assert all(m.timestamp > 0 for m in out.messages)

    p = await ci.process.start("cat", process_id="cat-1", cwd="/tmp")
    await p.send_stdin("hello\n")
    for _ in range(100):
        if p.stdout == "hello":
            break
        await asyncio.sleep(0.05)
    assert p.stdout == "hello" and p.process_id == "cat-1"
    await p.kill()
    out = await p.wait(timeout=30)
    assert out.exit_code != 0

    out = await ci.process.start_and_wait("echo $((6*7))", timeout=60)
    assert out.stdout == "42"
    assert (await ci.simple_process.start_and_wait("whoami")).stdout == "root"


async def test_filesystem_and_transfers(ci: Sandbox, tmp_path: Path) -> None:
    fs = ci.filesystem
    await fs.make_dir("/root/work/sub")
    await fs.write("/root/work/a.txt", "alpha")
    await fs.write_bytes("/root/work/b.bin", bytes(range(256)))
    assert await fs.read("/root/work/a.txt") == "alpha"
    assert await fs.read_bytes("/root/work/b.bin") == bytes(range(256))
    listing = {f.name: f.is_dir for f in await fs.list("/root/work")}
    assert listing == {"a.txt": False, "b.bin": False, "sub": True}

    watcher = fs.watch_dir("/root/work/sub")
    events = []
    watcher.add_event_listener(events.append)
    await watcher.start()
    await fs.write("/root/work/sub/new.txt", "1")
    for _ in range(100):
        if any(e.name == "new.txt" for e in events):
            break
        await asyncio.sleep(0.05)
    await watcher.stop()
    assert any(e.path == "/root/work/sub/new.txt" for e in events)

    await fs.remove("/root/work/a.txt")
    assert "a.txt" not in {f.name for f in await fs.list("/root/work")}

    local = tmp_path / "up.bin"
    local.write_bytes(os.urandom(3 << 20))
    with open(local, "rb") as f:
        remote = await ci.upload_file(f, remote_path="/root/work/up.bin")
    assert await ci.download_file(remote) == local.read_bytes()
    dest = await ci.download_file(remote, local_path=tmp_path / "down.bin")
    assert Path(dest).read_bytes() == local.read_bytes()
    assert (await ci.upload_file(str(local))) == "/home/user/up.bin"


async def test_identity_list_and_kill(sdk_backend: str, backend_port: int, test_template: str) -> None:
    ci = await Sandbox.create(
        template=test_template, target_addr="127.0.0.1", port=backend_port, metadata={"suite": "sdk-list"}
    )
    try:
        assert ci.id and ci.get_hostname(8080).startswith(f"8080-{ci.id}.")
        listed = await Sandbox.list("127.0.0.1", port=backend_port)
        mine = [s for s in listed if s.sandbox_id == ci.id]
        assert mine and mine[0].metadata == {"suite": "sdk-list"} and mine[0].template_id == test_template
        assert await Sandbox.kill(ci.id, "127.0.0.1", port=backend_port) is True
        assert ci.id not in {s.sandbox_id for s in await Sandbox.list("127.0.0.1", port=backend_port)}
        with pytest.raises(SandboxNotFoundError):
            await ci.process.start("true")
        with pytest.raises(SandboxNotFoundError):
            await ci.filesystem.read("/etc/hostname")
        assert await Sandbox.kill(ci.id, "127.0.0.1", port=backend_port) is False
    finally:
        await ci.close()


async def test_close_kills_and_context_manager(sdk_backend: str, backend_port: int, test_template: str) -> None:
    async with await Sandbox.create(template=test_template, target_addr="127.0.0.1", port=backend_port) as ci:
        sid = ci.id
        assert await ci.is_running()
    assert sid not in {s.sandbox_id for s in await Sandbox.list("127.0.0.1", port=backend_port)}


async def test_errors(sdk_backend: str, backend_port: int, keyed_backend: str) -> None:
    with pytest.raises(TemplateNotFoundError, match="no-such-template"):
        await Sandbox.create(template="no-such-template", target_addr="127.0.0.1", port=backend_port)
    dead = free_port()
    with pytest.raises(BackendUnreachableError, match=str(dead)):
        await Sandbox.create(target_addr="127.0.0.1", port=dead)
    with pytest.raises(ConnectionError):
        await Sandbox.list("127.0.0.1", port=dead)
    keyed_port = httpx.URL(keyed_backend).port
    with pytest.raises(exceptions.AuthenticationError, match="API key"):
        await Sandbox.list("127.0.0.1", port=keyed_port, api_key="wrong-key")
    with pytest.raises(exceptions.AuthenticationError):  # no key (or the environment's, not this one)
        await Sandbox.create(target_addr="127.0.0.1", port=keyed_port)
    assert await Sandbox.list("127.0.0.1", port=keyed_port, api_key="right-key") == []


def test_the_readme_python_example_runs_and_closes_its_sandbox(sdk_backend: str, backend_port: int,
                                                               test_template: str) -> None:
    """The README's example, as a user would paste it (only the template name is this suite's)."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    import httpx

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    code = re.search(r"```python\n(import asyncio\nfrom sandbox_sdk.sandbox import Sandbox\n.*?)```", readme, re.S)
    assert code, "the README's Python example is gone"
    source = code.group(1).replace('template="default-sandbox"', f'template="{test_template}"')
    before = {s["sandboxID"] for s in httpx.get(f"{sdk_backend}/sandboxes", timeout=30).json()}
    out = subprocess.run([sys.executable, "-c", source], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "SANDBOX_BACKEND_PORT": str(backend_port)})
    assert out.returncode == 0, out.stderr
    assert "Hello World" in out.stdout
    after = {s["sandboxID"] for s in httpx.get(f"{sdk_backend}/sandboxes", timeout=30).json()}
    assert after <= before, f"the example left sandboxes running: {after - before}"
