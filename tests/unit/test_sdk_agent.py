"""sandbox_sdk against the real guest agent, run on the host, in direct mode (no backend).

This checks the SDK's envd protocol code (Connect streams, files, PTY, watch) against the
agent that runs inside every VM; ``tests/e2e/test_sdk*.py`` repeat it through the backend
with real VMs.
"""

from __future__ import annotations

import asyncio
import getpass
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from sandbox_sdk import exceptions
from sandbox_sdk.e2b import AsyncSandbox, PtySize, Sandbox
from sandbox_sdk.sandbox import Sandbox as TrenvxSandbox

pytest.importorskip("trenvx.guest.agent")

USER = getpass.getuser()
TOKEN = "sdk-test-token"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def agent_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = _free_port()
    log = tmp_path_factory.mktemp("agent") / "agent.log"
    src = Path(__file__).resolve().parents[2] / "src"
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "trenvx.guest.agent", "--host", "127.0.0.1", "--port", str(port), "--skip", "all"],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"agent did not start: {log.read_text()}") from None
                time.sleep(0.05)
        # Commands run with `bash -l`: keep the host user's login profile (which may run slow or
        # noisy tools) out of them with an empty HOME. Also set an access token.
        home = tmp_path_factory.mktemp("home")
        init = {"envVars": {"HOME": str(home)}, "accessToken": TOKEN}
        httpx.post(f"{url}/init", json=init, timeout=10).raise_for_status()
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
async def sbx(agent_url: str) -> "AsyncSandbox":
    s = await AsyncSandbox.connect_direct(agent_url, user=USER, access_token=TOKEN)
    yield s
    await s.close()


async def test_output_streams_as_it_arrives(sbx: AsyncSandbox) -> None:
    t0 = time.monotonic()
    seen: list[tuple[str, float]] = []
    r = await sbx.commands.run(
        "echo first; sleep 1; echo second", on_stdout=lambda s: seen.append((s, time.monotonic() - t0))
    )
    assert r.stdout == "first\nsecond\n"
    assert [s for s, _ in seen] == ["first\n", "second\n"]
    assert seen[1][1] - seen[0][1] > 0.7  # the first line came before the command ended


async def test_commands(sbx: AsyncSandbox, tmp_path: Path) -> None:
    r = await sbx.commands.run("echo $A; pwd; echo e >&2", envs={"A": "x y"}, cwd=str(tmp_path))
    assert r.stdout == f"x y\n{tmp_path}\n" and r.stderr == "e\n"
    with pytest.raises(exceptions.CommandExitError) as ei:
        await sbx.commands.run("echo bad >&2; exit 7")
    assert ei.value.exit_code == 7 and ei.value.stderr == "bad\n"

    h = await sbx.commands.run("cat", background=True, stdin=True)
    await h.send_stdin("one\n")
    await sbx.commands.send_stdin(h.pid, b"two\n")
    await h.close_stdin()
    assert (await h.wait()).stdout == "one\ntwo\n"

    h = await sbx.commands.run("read a; read b; echo $a+$b", background=True, stdin=True)
    await sbx.commands.stream_stdin(h.pid, ["1\n", b"2\n"])
    assert (await h.wait()).stdout == "1+2\n"

    h = await sbx.commands.run("sleep 60", background=True, tag="sleeper")
    listed = {p.pid: p for p in await sbx.commands.list()}
    assert h.pid in listed and listed[h.pid].tag == "sleeper" and listed[h.pid].args[-1] == "sleep 60"
    assert await h.kill() is True
    with pytest.raises(exceptions.CommandExitError):
        await h.wait()
    assert await sbx.commands.kill(h.pid) is False


async def test_command_timeout_kills_it(sbx: AsyncSandbox) -> None:
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        await sbx.commands.run("sleep 30", timeout=1)
    assert time.monotonic() - t0 < 10
    for _ in range(50):
        if not any(p.args[-1:] == ["sleep 30"] for p in await sbx.commands.list()):
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("the timed-out command is still running")


async def test_connect_to_a_running_command(sbx: AsyncSandbox) -> None:
    h = await sbx.commands.run("sleep 0.5; echo late", background=True)
    await h.disconnect()
    h2 = await sbx.commands.connect(h.pid)
    assert (await h2.wait()).stdout == "late\n"


async def test_files(sbx: AsyncSandbox, tmp_path: Path) -> None:
    d = str(tmp_path)
    info = await sbx.files.write(f"{d}/sub/a.txt", "hello")
    assert info.path == f"{d}/sub/a.txt"
    assert await sbx.files.read(f"{d}/sub/a.txt") == "hello"
    assert await sbx.files.read(f"{d}/sub/a.txt", format="bytes") == bytearray(b"hello")
    assert b"".join([c async for c in await sbx.files.read(f"{d}/sub/a.txt", format="stream")]) == b"hello"
    await sbx.files.write_files([{"path": f"{d}/m1", "data": b"1"}, {"path": f"{d}/m2", "data": "2"}])
    assert (tmp_path / "m1").read_bytes() == b"1" and (tmp_path / "m2").read_text() == "2"
    names = {e.name for e in await sbx.files.list(d)}
    assert names == {"sub", "m1", "m2"}
    deep = {e.path for e in await sbx.files.list(d, depth=2)}
    assert f"{d}/sub/a.txt" in deep
    st = await sbx.files.get_info(f"{d}/sub/a.txt")
    assert st.size == 5 and not st.is_dir and st.modified_time is not None
    assert await sbx.files.exists(f"{d}/sub") and not await sbx.files.exists(f"{d}/none")
    assert await sbx.files.make_dir(f"{d}/x/y") is True
    assert await sbx.files.make_dir(f"{d}/x/y") is False
    moved = await sbx.files.rename(f"{d}/m1", f"{d}/x/m1")
    assert moved.path == f"{d}/x/m1" and (tmp_path / "x" / "m1").exists()
    await sbx.files.remove(f"{d}/x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(FileNotFoundError):
        await sbx.files.read(f"{d}/none")
    with pytest.raises(exceptions.PathNotFoundError):
        await sbx.files.get_info(f"{d}/none")


async def test_large_files_stream_both_ways(sbx: AsyncSandbox, tmp_path: Path) -> None:
    src = tmp_path / "big.bin"
    with open(src, "wb") as f:
        for _ in range(32):
            f.write(os.urandom(1 << 20))
    with open(src, "rb") as f:
        await sbx.files.write(str(tmp_path / "up.bin"), f)
    assert (tmp_path / "up.bin").read_bytes() == src.read_bytes()
    n = await sbx.files.download_to(str(src), tmp_path / "down.bin")
    assert n == 32 << 20 and (tmp_path / "down.bin").read_bytes() == src.read_bytes()
    chunks = 0
    async for chunk in await sbx.files.read(str(src), format="stream"):
        chunks += 1
        assert len(chunk) <= 1 << 20
    assert chunks > 1


async def test_watch_dir(sbx: AsyncSandbox, tmp_path: Path) -> None:
    events = []
    w = await sbx.files.watch_dir(str(tmp_path), on_event=events.append)
    await sbx.files.write(str(tmp_path / "new.txt"), "x")
    for _ in range(50):
        if any(e.name == "new.txt" for e in events):
            break
        await asyncio.sleep(0.1)
    await w.stop()
    assert any(e.name == "new.txt" and e.type is not None for e in events)


async def test_pty(sbx: AsyncSandbox) -> None:
    data: list[bytes] = []
    term = await sbx.pty.create(PtySize(rows=24, cols=80), on_data=data.append)
    await sbx.pty.resize(term.pid, PtySize(rows=33, cols=101))
    await sbx.pty.send_stdin(term.pid, b"stty size; exit\n")
    await term.wait()
    assert b"33 101" in b"".join(data)
    term = await sbx.pty.create(PtySize(rows=24, cols=80))
    assert await sbx.pty.kill(term.pid) is True
    with pytest.raises(exceptions.CommandExitError):
        await term.wait()


async def test_concurrent_use_of_one_sandbox(sbx: AsyncSandbox, tmp_path: Path) -> None:
    async def one(i: int) -> None:
        r = await sbx.commands.run(f"echo {i}")
        assert r.stdout == f"{i}\n"
        await sbx.files.write(str(tmp_path / f"f{i}"), str(i))
        assert await sbx.files.read(str(tmp_path / f"f{i}")) == str(i)

    await asyncio.gather(*(one(i) for i in range(20)))


def test_sync_surface(agent_url: str, tmp_path: Path) -> None:
    sbx = Sandbox.connect_direct(agent_url, user=USER, access_token=TOKEN)
    main = threading.get_ident()
    got: list[tuple[str, int]] = []
    r = sbx.commands.run("echo a; sleep 0.2; echo b", on_stdout=lambda s: got.append((s, threading.get_ident())))
    assert r.stdout == "a\nb\n" and got == [("a\n", main), ("b\n", main)]

    bg: list[str] = []
    done = threading.Event()
    h = sbx.commands.run("echo x; sleep 0.3; echo y", background=True, on_stdout=lambda s: bg.append(s))
    assert h.wait().stdout == "x\ny\n" and bg == ["x\n", "y\n"]

    h = sbx.commands.run("cat", background=True, stdin=True)
    h.send_stdin("in\n")
    h.close_stdin()
    assert h.wait().stdout == "in\n"

    sbx.files.write(str(tmp_path / "s.txt"), "sync")
    assert sbx.files.read(str(tmp_path / "s.txt")) == "sync"
    assert b"".join(sbx.files.read(str(tmp_path / "s.txt"), format="stream")) == b"sync"
    assert [e.name for e in sbx.files.list(str(tmp_path))] == ["s.txt"]

    w = sbx.files.watch_dir(str(tmp_path))
    sbx.files.write(str(tmp_path / "w.txt"), "1")
    deadline = time.monotonic() + 5
    evs = []
    while time.monotonic() < deadline and not any(e.name == "w.txt" for e in evs):
        evs += w.get_new_events()
        time.sleep(0.05)
    w.stop()
    assert any(e.name == "w.txt" for e in evs)

    got_cb: list[str] = []
    w = sbx.files.watch_dir(str(tmp_path), on_event=lambda e: (got_cb.append(e.name), done.set()))
    sbx.files.write(str(tmp_path / "cb.txt"), "1")
    assert done.wait(5)
    w.stop()
    assert "cb.txt" in got_cb

    term = sbx.pty.create(PtySize(rows=20, cols=70))
    sbx.pty.send_stdin(term.pid, b"stty size; exit\n")
    out: list[bytes] = []
    term.wait(on_pty=out.append)
    assert b"20 70" in b"".join(out)
    sbx.close()


async def test_trenvx_surface(agent_url: str, tmp_path: Path) -> None:
    async with await TrenvxSandbox.connect_direct(
        agent_url, user=USER, env_vars={"G": "global"}, access_token=TOKEN
    ) as ci:
        p = await ci.process.start("python3 -c \"print('Hello World')\"")
        await p.wait()
        assert p.stdout == "Hello World" and p.exit_code == 0

        lines = []
        exits = []
        t0 = time.monotonic()
        p = await ci.process.start(
            "echo $G; echo $L; sleep 0.5; printf 'no newline'; echo oops >&2; exit 3",
            env_vars={"L": "local"},
            on_stdout=lambda m: lines.append((m.line, m.error, time.monotonic() - t0)),
            on_exit=exits.append,
        )
        out = await p.wait()
        assert [line for line, _, _ in lines] == ["global", "local", "no newline"]
        assert lines[1][2] < 0.45  # delivered before the sleep ended
        assert out.exit_code == 3 and exits == [3] and p.stderr == "oops" and p.error is True
        assert all(isinstance(m.timestamp, int) for m in out.messages)

        p = await ci.process.start("cat", process_id="catter")
        await p.send_stdin("ping\n")
        for _ in range(50):
            if p.stdout == "ping":
                break
            await asyncio.sleep(0.05)
        assert p.stdout == "ping" and p.process_id == "catter"
        await p.kill()
        await p.wait(timeout=10)

        p = await ci.process.start("sleep 5")
        with pytest.raises(TimeoutError):
            await p.wait(timeout=0.2)
        await p.kill()

        out = await ci.process.start_and_wait("pwd", cwd=str(tmp_path))
        assert out.stdout == str(tmp_path)
        missing = str(tmp_path / "no" / "such" / "dir")
        with pytest.raises(exceptions.CurrentWorkingDirectoryDoesntExistException, match="does not exist") as info:
            await ci.process.start("pwd", cwd=missing)
        assert missing in str(info.value)
        assert isinstance(info.value, exceptions.InvalidArgumentError)  # what it raised before
        with pytest.raises(exceptions.ProcessException):
            await ci.process.start_and_wait("pwd", cwd=str(tmp_path / "a.txt.missing"))

        fs = ci.filesystem
        await fs.write(str(tmp_path / "a.txt"), "text")
        await fs.write_bytes(str(tmp_path / "b.bin"), b"\x00\xff")
        assert await fs.read(str(tmp_path / "a.txt")) == "text"
        assert await fs.read_bytes(str(tmp_path / "b.bin")) == b"\x00\xff"
        listing = {f.name: f.is_dir for f in await fs.list(str(tmp_path))}
        assert listing == {"a.txt": False, "b.bin": False}
        await fs.make_dir(str(tmp_path / "d"))
        watcher = fs.watch_dir(str(tmp_path / "d"))
        evs = []
        remove = watcher.add_event_listener(evs.append)
        await watcher.start()
        await fs.write(str(tmp_path / "d" / "n"), "1")
        for _ in range(50):
            if evs:
                break
            await asyncio.sleep(0.1)
        await watcher.stop()
        remove()
        assert evs and evs[0].path == str(tmp_path / "d" / "n") and evs[0].operation is not None
        await fs.remove(str(tmp_path / "d"))
        assert not (tmp_path / "d").exists()

        local = tmp_path / "local.bin"
        local.write_bytes(b"L" * 1000)
        remote = await ci.upload_file(str(local), remote_path=str(tmp_path / "remote.bin"))
        assert await ci.download_file(remote) == b"L" * 1000
        target = await ci.download_file(remote, local_path=tmp_path / "again.bin")
        assert Path(target).read_bytes() == b"L" * 1000


async def test_wrong_access_token(agent_url: str) -> None:
    s = await AsyncSandbox.connect_direct(agent_url, user=USER, access_token="wrong")
    with pytest.raises(exceptions.AuthenticationError, match="access token"):
        await s.commands.run("true")
    with pytest.raises(exceptions.AuthenticationError):
        await s.files.read("/etc/hostname")
    await s.close()
