"""sandbox_sdk end to end, E2B-style surface (sync ``Sandbox`` and ``AsyncSandbox``) on real VMs."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
import tracemalloc
from pathlib import Path

import httpx
import pytest

from sandbox_sdk import exceptions
from sandbox_sdk.e2b import AsyncSandbox, FileType, PtySize, Sandbox

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
async def asbx(sdk_backend: str, test_template: str) -> AsyncSandbox:
    s = await AsyncSandbox.create(
        test_template, timeout=600, metadata={"suite": "sdk-e2b"}, envs={"SBX_ENV": "from-create"}, api_url=sdk_backend
    )
    yield s
    await s.kill()


# ----------------------------------------------------------------------------- sandbox-level


async def test_lifecycle(sdk_backend: str, test_template: str) -> None:
    s = await AsyncSandbox.create(test_template, timeout=120, metadata={"suite": "lifecycle"}, api_url=sdk_backend)
    try:
        info = await s.get_info()
        assert info.sandbox_id == s.sandbox_id and info.template_id == test_template
        assert info.metadata == {"suite": "lifecycle"} and info.state == "running"
        assert info.end_at is not None and info.started_at is not None
        assert 100 <= (info.end_at - info.started_at).total_seconds() <= 140
        await s.set_timeout(900)
        later = await AsyncSandbox.get_info(s.sandbox_id, api_url=sdk_backend)
        assert later.end_at is not None and later.end_at > info.end_at
        listed = await AsyncSandbox.list(metadata={"suite": "lifecycle"}, api_url=sdk_backend)
        assert [x.sandbox_id for x in listed] == [s.sandbox_id]
        assert s.sandbox_id in {x.sandbox_id for x in await AsyncSandbox.list(state=["running"], api_url=sdk_backend)}
        assert test_template in {t.template_id for t in await AsyncSandbox.list_templates(api_url=sdk_backend)}
        other = await AsyncSandbox.connect(s.sandbox_id, api_url=sdk_backend)
        assert (await other.commands.run("cat /etc/trenvx-e2e || echo none")).exit_code == 0
        await other.close()
        assert await s.is_running()
    finally:
        assert await s.kill() is True
    # A killed sandbox: every kind of call says so.
    assert await AsyncSandbox.kill(s.sandbox_id, api_url=sdk_backend) is False
    with pytest.raises(exceptions.SandboxNotFoundError):
        await AsyncSandbox.connect(s.sandbox_id, api_url=sdk_backend)
    with pytest.raises(exceptions.SandboxNotFoundError):
        await AsyncSandbox.get_info(s.sandbox_id, api_url=sdk_backend)
    dead = await AsyncSandbox.create(test_template, api_url=sdk_backend)
    await AsyncSandbox.kill(dead.sandbox_id, api_url=sdk_backend)
    with pytest.raises(exceptions.SandboxNotFoundError):
        await dead.commands.run("true")
    with pytest.raises(exceptions.SandboxNotFoundError):
        await dead.files.read("/etc/hostname")
    with pytest.raises(exceptions.SandboxNotFoundError):
        await dead.set_timeout(10)
    assert not await dead.is_running()
    await dead.close()


async def test_get_host_reaches_a_port_of_the_sandbox(asbx: AsyncSandbox, sdk_backend: str) -> None:
    host = asbx.get_host(8081)
    assert host == f"8081-{asbx.sandbox_id}.{asbx.sandbox_domain}"
    server = await asbx.commands.run(
        "python3 -m http.server 8081 --bind 0.0.0.0 --directory /srv/www", background=True, timeout=0
    )
    try:
        async with httpx.AsyncClient() as c:
            for _ in range(100):  # until the server listens
                r = await c.get(sdk_backend + "/", headers={"Host": host}, timeout=30)
                if r.status_code == 200:
                    break
                await asyncio.sleep(0.1)
        assert r.status_code == 200 and "hello from the template" in r.text
    finally:
        await server.kill()


# ----------------------------------------------------------------------------- commands


async def test_commands_run(asbx: AsyncSandbox) -> None:
    r = await asbx.commands.run("echo $SBX_ENV $X; whoami; pwd", envs={"X": "y"})
    assert r.stdout == "from-create y\nuser\n/home/user\n" and r.exit_code == 0
    assert (await asbx.commands.run("whoami", user="root", cwd="/srv")).stdout == "root\n"
    with pytest.raises(exceptions.CommandExitError) as ei:
        await asbx.commands.run("echo nope >&2; exit 3")
    assert ei.value.exit_code == 3 and ei.value.stderr == "nope\n" and "nope" in str(ei.value)

    t0 = time.monotonic()
    arrivals: list[tuple[str, float]] = []
    errs: list[str] = []

    async def on_out(s: str) -> None:  # async callbacks are awaited
        arrivals.append((s, time.monotonic() - t0))

    r = await asbx.commands.run("echo one; sleep 2; echo two; echo e >&2", on_stdout=on_out, on_stderr=errs.append)
    assert [a for a, _ in arrivals] == ["one\n", "two\n"] and errs == ["e\n"]
    assert arrivals[1][1] - arrivals[0][1] > 1.5  # callbacks fire as output arrives

    with pytest.raises(TimeoutError):
        await asbx.commands.run("sleep 60", timeout=2)
    assert not any(p.args[-1:] == ["sleep 60"] for p in await asbx.commands.list())


async def test_background_stdin_list_kill_connect(asbx: AsyncSandbox) -> None:
    h = await asbx.commands.run("cat", background=True, stdin=True)
    await h.send_stdin("abc\n")
    await asbx.commands.send_stdin(h.pid, "def\n")
    await h.close_stdin()
    assert (await h.wait()).stdout == "abc\ndef\n"

    h = await asbx.commands.run("sleep 0.5; echo done", background=True, tag="bg-job")
    await h.disconnect()
    again = await asbx.commands.connect(h.pid)
    assert (await again.wait()).stdout == "done\n"

    h = await asbx.commands.run("sleep 120", background=True, timeout=0)
    procs = {p.pid: p for p in await asbx.commands.list()}
    assert procs[h.pid].cmd == "/bin/bash" and procs[h.pid].args == ["-l", "-c", "sleep 120"]
    assert await asbx.commands.kill(h.pid) is True
    with pytest.raises(exceptions.CommandExitError):
        await h.wait()
    assert await asbx.commands.kill(h.pid) is False


async def test_pty(asbx: AsyncSandbox) -> None:
    out: list[bytes] = []
    term = await asbx.pty.create(PtySize(rows=24, cols=80), on_data=out.append, timeout=60)
    await asbx.pty.resize(term.pid, PtySize(rows=40, cols=132))
    await asbx.pty.send_stdin(term.pid, b"stty size; echo $TERM; exit\n")
    await term.wait()
    text = b"".join(out).decode(errors="replace")
    assert "40 132" in text and "xterm-256color" in text
    term = await asbx.pty.create(PtySize(rows=24, cols=80))
    assert await asbx.pty.kill(term.pid) is True


# ----------------------------------------------------------------------------- files


async def test_files(asbx: AsyncSandbox) -> None:
    base = "/home/user/e2b-files"
    w = await asbx.files.write(f"{base}/a.txt", "hello")
    assert w.path == f"{base}/a.txt"
    await asbx.files.write_files(
        [{"path": f"{base}/b.bin", "data": b"\x00\x01"}, {"path": f"{base}/d/c.txt", "data": "c"}]
    )
    assert await asbx.files.read(f"{base}/a.txt") == "hello"
    assert await asbx.files.read(f"{base}/b.bin", format="bytes") == bytearray(b"\x00\x01")
    assert b"".join([c async for c in await asbx.files.read(f"{base}/a.txt", format="stream")]) == b"hello"
    top = {e.name: e.type for e in await asbx.files.list(base)}
    assert top == {"a.txt": FileType.FILE, "b.bin": FileType.FILE, "d": FileType.DIR}
    assert f"{base}/d/c.txt" in {e.path for e in await asbx.files.list(base, depth=2)}
    info = await asbx.files.get_info(f"{base}/a.txt")
    assert info.size == 5 and info.owner == "user"
    assert await asbx.files.exists(f"{base}/a.txt") and not await asbx.files.exists(f"{base}/zzz")
    assert await asbx.files.make_dir(f"{base}/new/deep") is True
    assert await asbx.files.make_dir(f"{base}/new/deep") is False
    assert (await asbx.files.rename(f"{base}/a.txt", f"{base}/new/a.txt")).path == f"{base}/new/a.txt"
    await asbx.files.remove(f"{base}/new")
    assert not await asbx.files.exists(f"{base}/new")
    with pytest.raises(FileNotFoundError):
        await asbx.files.read(f"{base}/new/a.txt")
    root_file = await asbx.files.write("/root/by-root.txt", "x", user="root")
    assert root_file.path == "/root/by-root.txt"
    assert (await asbx.files.get_info("/root/by-root.txt", user="root")).owner == "root"

    events = []
    wh = await asbx.files.watch_dir(base, on_event=events.append)
    await asbx.files.write(f"{base}/watched.txt", "1")
    for _ in range(100):
        if any(e.name == "watched.txt" for e in events):
            break
        await asyncio.sleep(0.05)
    await wh.stop()
    assert any(e.name == "watched.txt" for e in events)


async def test_100mb_download_streams_to_disk(asbx: AsyncSandbox, tmp_path: Path) -> None:
    await asbx.commands.run(
        "head -c 100000000 /dev/zero > /home/user/big.bin && sha256sum /home/user/big.bin", timeout=120
    )
    remote_sha = (await asbx.commands.run("sha256sum /home/user/big.bin", timeout=120)).stdout.split()[0]
    tracemalloc.start()
    try:
        n = await asbx.files.download_to("/home/user/big.bin", tmp_path / "big.bin", request_timeout=120)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == 100_000_000
    assert peak < 20 << 20, f"download held {peak >> 20} MiB in memory"
    h = hashlib.sha256()
    with open(tmp_path / "big.bin", "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    assert h.hexdigest() == remote_sha
    # And back up, streamed from the file object.
    with open(tmp_path / "big.bin", "rb") as f:
        await asbx.files.write("/home/user/big2.bin", f, request_timeout=120)
    assert (await asbx.commands.run("sha256sum /home/user/big2.bin", timeout=120)).stdout.split()[0] == remote_sha
    await asbx.commands.run("rm -f /home/user/big.bin /home/user/big2.bin")


async def test_concurrent_use_of_one_sandbox(asbx: AsyncSandbox) -> None:
    async def worker(i: int) -> None:
        r = await asbx.commands.run(f"echo task-{i}")
        assert r.stdout == f"task-{i}\n"
        await asbx.files.write(f"/home/user/conc/{i}.txt", str(i))
        assert await asbx.files.read(f"/home/user/conc/{i}.txt") == str(i)

    await asbx.files.make_dir("/home/user/conc")
    await asyncio.gather(*(worker(i) for i in range(16)))
    assert len(await asbx.files.list("/home/user/conc")) == 16


# ----------------------------------------------------------------------------- synchronous


def test_sync_surface(sdk_backend: str, test_template: str, tmp_path: Path) -> None:
    with Sandbox.create(
        test_template, timeout=300, metadata={"suite": "sdk-sync"}, envs={"E": "1"}, api_url=sdk_backend
    ) as s:
        main = threading.get_ident()
        seen: list[tuple[str, int]] = []
        r = s.commands.run("echo $E; sleep 1; echo end", on_stdout=lambda x: seen.append((x, threading.get_ident())))
        assert r.stdout == "1\nend\n" and [x for x, _ in seen] == ["1\n", "end\n"]
        assert {t for _, t in seen} == {main}

        bg: list[str] = []
        h = s.commands.run("echo a; sleep 0.5; echo b", background=True, on_stdout=bg.append)
        assert h.wait().stdout == "a\nb\n" and bg == ["a\n", "b\n"]
        h = s.commands.run("cat", background=True, stdin=True)
        h.send_stdin("x\n")
        h.close_stdin()
        assert h.wait().stdout == "x\n"
        with pytest.raises(exceptions.CommandExitError):
            s.commands.run("false")
        h = s.commands.run("sleep 100", background=True, timeout=0)
        assert h.pid in {p.pid for p in s.commands.list()}
        assert s.commands.kill(h.pid)
        h = s.commands.run("sleep 0.3; echo c", background=True)
        assert s.commands.connect(h.pid).wait().stdout == "c\n"

        s.files.write("/home/user/s/a.txt", "sync")
        assert s.files.read("/home/user/s/a.txt") == "sync"
        assert b"".join(s.files.read("/home/user/s/a.txt", format="stream")) == b"sync"
        assert [e.name for e in s.files.list("/home/user/s")] == ["a.txt"]
        assert s.files.exists("/home/user/s/a.txt") and s.files.get_info("/home/user/s/a.txt").size == 4
        assert s.files.make_dir("/home/user/s/d")
        s.files.rename("/home/user/s/a.txt", "/home/user/s/d/a.txt")
        w = s.files.watch_dir("/home/user/s/d")
        s.files.write("/home/user/s/d/n.txt", "1")
        evs = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(e.name == "n.txt" for e in evs):
            evs += w.get_new_events()
            time.sleep(0.05)
        w.stop()
        assert any(e.name == "n.txt" for e in evs)
        s.files.remove("/home/user/s")
        assert not s.files.exists("/home/user/s")

        term = s.pty.create(PtySize(rows=30, cols=90))
        s.pty.resize(term.pid, PtySize(rows=31, cols=91))
        s.pty.send_stdin(term.pid, b"stty size; exit\n")
        out: list[bytes] = []
        term.wait(on_pty=out.append)
        assert b"31 91" in b"".join(out)

        info = s.get_info()
        s.set_timeout(600)
        assert s.get_info().end_at > info.end_at
        assert s.sandbox_id in {x.sandbox_id for x in Sandbox.list(metadata={"suite": "sdk-sync"}, api_url=sdk_backend)}

        # Many threads on one sandbox.
        errors: list[BaseException] = []

        def worker(i: int) -> None:
            try:
                assert s.commands.run(f"echo {i}").stdout == f"{i}\n"
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        sid = s.sandbox_id
    assert sid not in {x.sandbox_id for x in Sandbox.list(api_url=sdk_backend)}  # killed on exit
    with pytest.raises(exceptions.SandboxNotFoundError):
        Sandbox.connect(sid, api_url=sdk_backend)


def test_sync_errors(sdk_backend: str, keyed_backend: str) -> None:
    with pytest.raises(exceptions.TemplateNotFoundError):
        Sandbox.create("no-such-template", api_url=sdk_backend)
    with pytest.raises(exceptions.AuthenticationError):
        Sandbox.list(api_url=keyed_backend, api_key="bad")
    with pytest.raises(exceptions.BackendUnreachableError):
        Sandbox.list(target_addr="127.0.0.1", port=1, retries=0)
