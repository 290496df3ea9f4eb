"""E2B's documented SDK surface, driven through the unmodified ``e2b`` package on real sandboxes.

Every public method of ``Sandbox`` / ``AsyncSandbox``, ``sandbox.commands`` (and its command
handles), ``sandbox.files`` (and its watch handles), ``sandbox.pty`` and ``sandbox.git`` that
trenvx serves and that no other e2e test drives through ``e2b`` is called here, sync and async,
with what it returned checked against what the sandbox did. One sandbox per surface for the
module (the tests use directories of their own), killed at the end; the lifecycle tests make
their own. The table of what works, what is refused and which issue brings the rest is in
docs/sdk.md ("E2B's SDK surface").

The ``git`` tests run on the shipped ``default-sandbox`` template (``shipped_template`` of
tests/e2e/conftest.py, built once per run), which has git; they are skipped only where its build
cannot reach Debian's mirror.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import pytest_asyncio

pytestmark = pytest.mark.e2e

e2b = pytest.importorskip("e2b")

from e2b import (  # noqa: E402 - after the importorskip
    AsyncSandbox,
    CommandExitException,
    FileNotFoundException,
    FilesystemEventType,
    FileType,
    InvalidArgumentException,
    NotFoundException,
    PtySize,
    Sandbox,
    SandboxQuery,
    SandboxState,
)
from e2b.sandbox.filesystem.filesystem import WriteEntry  # noqa: E402

from tests.e2e.server_helpers import e2b_pointed_at  # noqa: E402

BOUND_S = 60.0
"""Generous bound (TCG is slow) on waiting for something the sandbox does in the background."""

SUITE = "e2b-surface"


def wait_for(cond: Callable[[], Any], what: str, timeout: float = BOUND_S) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def await_for(cond: Callable[[], Any], what: str, timeout: float = BOUND_S) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def e2b_env(sdk_backend: str) -> Iterator[str]:
    """``e2b`` pointed at the session backend for the whole module (its sandboxes are module-wide)."""
    with e2b_pointed_at(sdk_backend) as url:
        yield url


@pytest.fixture(scope="module")
def sbx(e2b_env: str, test_template: str) -> Iterator[Sandbox]:
    s = Sandbox.create(test_template, timeout=900, metadata={"suite": SUITE, "api": "sync"})
    try:
        yield s
    finally:
        s.kill()


@pytest_asyncio.fixture(scope="module")
async def asbx(e2b_env: str, test_template: str) -> AsyncIterator[AsyncSandbox]:
    s = await AsyncSandbox.create(test_template, timeout=900, metadata={"suite": SUITE, "api": "async"})
    try:
        yield s
    finally:
        await s.kill()


# ============================================================================ Sandbox


def test_sync_sandbox_class_and_instance_methods(e2b_env: str, test_template: str) -> None:
    """create (as a context manager), connect, get_info, set_timeout, list, is_running and kill,
    each both as a class method (by id) and on the instance where E2B has both."""
    tag = {"suite": SUITE, "case": "sync-lifecycle"}
    with Sandbox.create(test_template, timeout=120, metadata=tag, envs={"FROM_CREATE": "1"}) as s:
        sid = s.sandbox_id
        info = Sandbox.get_info(sid)
        assert (info.sandbox_id, info.template_id, info.metadata) == (sid, test_template, tag)
        assert info.state == SandboxState.RUNNING
        assert s.get_info().end_at == info.end_at

        Sandbox.set_timeout(sid, 600)
        later = s.get_info().end_at
        assert later > info.end_at
        s.set_timeout(30)
        short = s.get_info().end_at
        assert short < later

        other = Sandbox.connect(sid)  # by id
        assert other.sandbox_id == sid
        assert other.commands.run("echo $FROM_CREATE").stdout == "1\n"
        assert s.connect(timeout=300).sandbox_id == sid  # on the instance: extends the timeout
        assert s.get_info().end_at > short

        pages = Sandbox.list(query=SandboxQuery(metadata=tag, state=[SandboxState.RUNNING]), limit=1)
        assert [x.sandbox_id for x in pages.next_items()] == [sid]
        assert not pages.has_next
        assert s.is_running()

        # update_network replaces the egress rules (what they let through: tests/e2e/test_network.py).
        Sandbox.update_network(sid, {"allow_out": ["10.1.2.3"], "deny_out": ["10.0.0.0/8"]})
        assert s.get_info().network == {"allow_out": ["10.1.2.3"], "deny_out": ["10.0.0.0/8"],
                                        "allow_public_traffic": True}
        s.update_network({})
        assert s.get_info().network["deny_out"] == []
    # Leaving the block killed it.
    assert not s.is_running()
    assert Sandbox.list(query=SandboxQuery(metadata=tag)).next_items() == []
    assert Sandbox.kill(sid) is False
    with pytest.raises(NotFoundException):
        Sandbox.get_info(sid)
    with pytest.raises(NotFoundException):
        Sandbox.connect(sid)

    s2 = Sandbox.create(test_template, timeout=120, metadata=tag)
    assert Sandbox.kill(s2.sandbox_id) is True  # by id
    assert s2.kill() is False  # on the instance: already gone
    assert not s2.is_running()


async def test_async_sandbox_class_and_instance_methods(e2b_env: str, test_template: str) -> None:
    tag = {"suite": SUITE, "case": "async-lifecycle"}
    async with await AsyncSandbox.create(test_template, timeout=120, metadata=tag) as s:
        sid = s.sandbox_id
        info = await AsyncSandbox.get_info(sid)
        assert (info.sandbox_id, info.metadata, info.state) == (sid, tag, SandboxState.RUNNING)
        await AsyncSandbox.set_timeout(sid, 600)
        later = (await s.get_info()).end_at
        assert later > info.end_at
        await s.set_timeout(30)
        assert (await s.get_info()).end_at < later

        other = await AsyncSandbox.connect(sid)
        assert (await other.commands.run("echo via-connect")).stdout == "via-connect\n"
        assert (await s.connect(timeout=300)).sandbox_id == sid

        pages = AsyncSandbox.list(query=SandboxQuery(metadata=tag, state=[SandboxState.RUNNING]), limit=1)
        assert [x.sandbox_id for x in await pages.next_items()] == [sid]
        assert not pages.has_next
        assert await s.is_running()

        await s.update_network({"allow_out": ["10.1.2.3"], "deny_out": ["10.0.0.0/8"]})
        assert (await s.get_info()).network == {"allow_out": ["10.1.2.3"], "deny_out": ["10.0.0.0/8"],
                                                "allow_public_traffic": True}
        await AsyncSandbox.update_network(sid, {})
        assert (await AsyncSandbox.get_info(sid)).network["deny_out"] == []
    assert not await s.is_running()
    assert await AsyncSandbox.kill(sid) is False
    with pytest.raises(NotFoundException):
        await AsyncSandbox.get_info(sid)

    s2 = await AsyncSandbox.create(test_template, timeout=120, metadata=tag)
    assert await AsyncSandbox.kill(s2.sandbox_id) is True
    assert await s2.kill() is False


# ============================================================================ files


def test_sync_files(sbx: Sandbox) -> None:
    fs = sbx.files
    assert fs.make_dir("fs-sync/a/b") is True  # parents too
    assert fs.make_dir("fs-sync/a/b") is False  # already there
    fs.write("fs-sync/plain.txt", "plain")
    with pytest.raises(InvalidArgumentException):
        fs.make_dir("fs-sync/plain.txt")  # a file is not a directory

    # write: str, bytes, a binary file object and an iterable of chunks (the last two streamed).
    payload = os.urandom(2 << 20)
    infos = [
        fs.write("fs-sync/str.txt", "héllo"),
        fs.write("fs-sync/bytes.bin", b"\x00\x01\x02"),
        fs.write("fs-sync/io.bin", io.BytesIO(payload)),
        fs.write("fs-sync/new-dir/iter.txt", iter([b"ab", b"cd", b"ef"])),  # missing parents are made
    ]
    assert [(i.name, i.type, i.path) for i in infos] == [
        ("str.txt", FileType.FILE, "/home/user/fs-sync/str.txt"),
        ("bytes.bin", FileType.FILE, "/home/user/fs-sync/bytes.bin"),
        ("io.bin", FileType.FILE, "/home/user/fs-sync/io.bin"),
        ("iter.txt", FileType.FILE, "/home/user/fs-sync/new-dir/iter.txt"),
    ]
    written = fs.write_files([
        WriteEntry(path="fs-sync/many/one.txt", data="1"),
        WriteEntry(path="fs-sync/many/two.bin", data=b"2"),
        WriteEntry(path="/home/user/fs-sync/a/b/deep.txt", data="deep"),
    ])
    assert [w.path for w in written] == [
        "/home/user/fs-sync/many/one.txt", "/home/user/fs-sync/many/two.bin", "/home/user/fs-sync/a/b/deep.txt"
    ]
    assert fs.write_files([]) == []

    # read: text, bytes, stream.
    assert fs.read("fs-sync/str.txt") == "héllo"
    assert fs.read("fs-sync/bytes.bin", format="bytes") == bytearray(b"\x00\x01\x02")
    assert fs.read("fs-sync/new-dir/iter.txt", format="text") == "abcdef"
    with fs.read("fs-sync/io.bin", format="stream") as stream:
        digest = hashlib.sha256()
        chunks = 0
        for chunk in stream:
            digest.update(chunk)
            chunks += 1
    assert digest.digest() == hashlib.sha256(payload).digest() and chunks > 1
    with pytest.raises(FileNotFoundException):
        fs.read("fs-sync/missing.txt")

    # list, by depth.
    top = {(e.name, e.type) for e in fs.list("fs-sync")}
    assert top == {("a", FileType.DIR), ("many", FileType.DIR), ("new-dir", FileType.DIR),
                   ("plain.txt", FileType.FILE), ("str.txt", FileType.FILE), ("bytes.bin", FileType.FILE),
                   ("io.bin", FileType.FILE)}
    deep = {e.path.removeprefix("/home/user/fs-sync/") for e in fs.list("fs-sync", depth=3)}
    assert {"a", "a/b", "a/b/deep.txt", "many/one.txt", "new-dir/iter.txt"} <= deep
    assert "a/b/deep.txt" not in {e.path.removeprefix("/home/user/fs-sync/") for e in fs.list("fs-sync", depth=2)}
    with pytest.raises(InvalidArgumentException):
        fs.list("fs-sync/plain.txt")
    with pytest.raises(FileNotFoundException):
        fs.list("fs-sync/missing")

    # exists, get_info.
    assert fs.exists("fs-sync/a/b/deep.txt") and fs.exists("fs-sync/a")
    assert not fs.exists("fs-sync/missing")
    info = fs.get_info("fs-sync/io.bin")
    assert (info.name, info.type, info.size, info.owner) == ("io.bin", FileType.FILE, len(payload), "user")
    assert info.path == "/home/user/fs-sync/io.bin" and info.permissions.startswith("-rw")
    assert fs.get_info("fs-sync/a").type == FileType.DIR
    with pytest.raises(FileNotFoundException):
        fs.get_info("fs-sync/missing")

    # rename: a file, then a whole directory.
    moved = fs.rename("fs-sync/str.txt", "fs-sync/renamed.txt")
    assert (moved.name, moved.path, moved.type) == ("renamed.txt", "/home/user/fs-sync/renamed.txt", FileType.FILE)
    assert not fs.exists("fs-sync/str.txt") and fs.read("fs-sync/renamed.txt") == "héllo"
    fs.rename("fs-sync/a", "fs-sync/z")
    assert fs.read("fs-sync/z/b/deep.txt") == "deep" and not fs.exists("fs-sync/a")
    with pytest.raises(FileNotFoundException):
        fs.rename("fs-sync/missing", "fs-sync/other")

    # remove: a file, a directory with contents, and a missing path (a no-op, as in E2B).
    fs.remove("fs-sync/renamed.txt")
    fs.remove("fs-sync/z")
    fs.remove("fs-sync/missing")
    assert not fs.exists("fs-sync/renamed.txt") and not fs.exists("fs-sync/z")
    assert sbx.commands.run("ls -A fs-sync | sort").stdout.split() == [
        "bytes.bin", "io.bin", "many", "new-dir", "plain.txt"
    ]


def test_sync_files_as_root(sbx: Sandbox) -> None:
    """``user="root"`` on file calls: paths relative to root's home, files owned by root."""
    info = sbx.files.write("fs-root.txt", "r", user="root")
    assert info.path == "/root/fs-root.txt"
    got = sbx.files.get_info("/root/fs-root.txt", user="root")
    assert (got.owner, got.group) == ("root", "root")
    assert sbx.files.make_dir("/root/fs-root-dir", user="root") is True
    assert {e.name for e in sbx.files.list("/root", user="root")} >= {"fs-root.txt", "fs-root-dir"}
    sbx.files.remove("/root/fs-root.txt", user="root")
    assert not sbx.files.exists("/root/fs-root.txt", user="root")


def test_sync_watch_dir(sbx: Sandbox) -> None:
    fs = sbx.files
    fs.make_dir("watch-sync/sub")
    fs.write("watch-sync/old.txt", "old")
    flat = fs.watch_dir("watch-sync")
    deep = fs.watch_dir("watch-sync", recursive=True, include_entry=True)
    try:
        fs.write("watch-sync/top.txt", "t")
        fs.write("watch-sync/sub/inner.txt", "i")
        fs.rename("watch-sync/old.txt", "watch-sync/moved.txt")
        fs.remove("watch-sync/top.txt")

        seen: list[Any] = []

        def deep_has_all() -> bool:
            seen.extend(deep.get_new_events())
            got = {(e.name, e.type) for e in seen}
            return {("top.txt", FilesystemEventType.CREATE), ("top.txt", FilesystemEventType.REMOVE),
                    ("sub/inner.txt", FilesystemEventType.CREATE), ("sub/inner.txt", FilesystemEventType.WRITE),
                    ("old.txt", FilesystemEventType.RENAME), ("moved.txt", FilesystemEventType.CREATE)} <= got

        wait_for(deep_has_all, "the recursive watch's events")
        entries = {e.name: e.entry for e in seen if e.type == FilesystemEventType.CREATE}
        assert entries["sub/inner.txt"] is not None and entries["sub/inner.txt"].type == FileType.FILE

        # What a new directory holds before its watch is added is reported too (as envd's fsnotify
        # does), once: a file written into a directory the write makes, and `mkdir -p` of a tree.
        fs.write("watch-sync/new/x.txt", "x")
        sbx.commands.run("mkdir -p watch-sync/p/q/r && echo f > watch-sync/p/q/r/f")
        fs.write("watch-sync/marker.txt", "m")  # after all of it: events arrive in order
        news = ["new", "new/x.txt", "p", "p/q", "p/q/r", "p/q/r/f"]

        def deep_has_new() -> bool:
            seen.extend(deep.get_new_events())
            return ("marker.txt", FilesystemEventType.CREATE) in {(e.name, e.type) for e in seen}

        wait_for(deep_has_new, "the recursive watch's events for new directories")
        created = [e.name for e in seen if e.type == FilesystemEventType.CREATE]
        assert {n: created.count(n) for n in news} == {n: 1 for n in news}, created
        new_entry = next(e.entry for e in seen if e.name == "new/x.txt" and e.type == FilesystemEventType.CREATE)
        assert new_entry is not None and new_entry.path == "/home/user/watch-sync/new/x.txt"

        flat_seen: list[Any] = []

        def flat_has_top() -> bool:
            flat_seen.extend(flat.get_new_events())
            return ("top.txt", FilesystemEventType.REMOVE) in {(e.name, e.type) for e in flat_seen}

        wait_for(flat_has_top, "the flat watch's events")
        assert not [e for e in flat_seen if e.name.startswith("sub/")], "a non-recursive watch reported a subdirectory"
    finally:
        flat.stop()
        deep.stop()
    with pytest.raises(FileNotFoundException):
        fs.watch_dir("watch-sync/missing")
    with pytest.raises(InvalidArgumentException):
        fs.watch_dir("watch-sync/moved.txt")


async def test_async_files(asbx: AsyncSandbox) -> None:
    fs = asbx.files
    assert await fs.make_dir("fs-async/x/y") is True
    assert await fs.make_dir("fs-async/x/y") is False
    payload = os.urandom(1 << 20)

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(payload), 256 << 10):
            yield payload[i:i + (256 << 10)]

    infos = [
        await fs.write("fs-async/str.txt", "text"),
        await fs.write("fs-async/stream.bin", chunks()),
        await fs.write("fs-async/io.bin", io.BytesIO(b"from-io")),
    ]
    assert [i.path for i in infos] == [f"/home/user/fs-async/{n}" for n in ("str.txt", "stream.bin", "io.bin")]
    written = await fs.write_files([WriteEntry(path="fs-async/x/one.txt", data="1"),
                                    WriteEntry(path="fs-async/x/y/two.txt", data=b"2")])
    assert [w.name for w in written] == ["one.txt", "two.txt"]

    assert await fs.read("fs-async/str.txt") == "text"
    assert await fs.read("fs-async/io.bin", format="bytes") == bytearray(b"from-io")
    got = b""
    async for chunk in await fs.read("fs-async/stream.bin", format="stream"):
        got += chunk
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()

    assert {e.name for e in await fs.list("fs-async")} == {"x", "str.txt", "stream.bin", "io.bin"}
    deep = {e.path.removeprefix("/home/user/fs-async/") for e in await fs.list("fs-async", depth=3)}
    assert {"x", "x/y", "x/one.txt", "x/y/two.txt"} <= deep
    assert await fs.exists("fs-async/x/y/two.txt") and not await fs.exists("fs-async/nope")
    info = await fs.get_info("fs-async/stream.bin")
    assert (info.size, info.type, info.owner) == (len(payload), FileType.FILE, "user")

    moved = await fs.rename("fs-async/x", "fs-async/w")
    assert (moved.name, moved.type) == ("w", FileType.DIR)
    assert await fs.read("fs-async/w/y/two.txt") == "2"
    with pytest.raises(FileNotFoundException):
        await fs.rename("fs-async/x", "fs-async/v")
    await fs.remove("fs-async/w")
    await fs.remove("fs-async/w")  # missing: a no-op
    assert not await fs.exists("fs-async/w")
    with pytest.raises(FileNotFoundException):
        await fs.read("fs-async/w/one.txt")


async def test_async_watch_dir(asbx: AsyncSandbox) -> None:
    fs = asbx.files
    await fs.make_dir("watch-async/sub")
    events: list[Any] = []
    exits: list[Any] = []
    handle = await fs.watch_dir("watch-async", on_event=events.append, on_exit=exits.append,
                                recursive=True, include_entry=True, timeout=0)
    try:
        await fs.write("watch-async/sub/f.txt", "f")
        await fs.remove("watch-async/sub/f.txt")

        def has_all() -> bool:
            got = {(e.name, e.type) for e in events}
            return {("sub/f.txt", FilesystemEventType.CREATE), ("sub/f.txt", FilesystemEventType.REMOVE)} <= got

        await await_for(has_all, "the async watch's events")
        created = next(e for e in events if e.type == FilesystemEventType.CREATE)
        assert created.entry is not None and created.entry.name == "f.txt"

        await fs.write("watch-async/new/x.txt", "x")  # into a directory the write makes
        await await_for(lambda: ("new/x.txt", FilesystemEventType.CREATE) in {(e.name, e.type) for e in events},
                        "the async watch's event for a file in a new directory")
    finally:
        await handle.stop()
    count = len(events)
    await fs.write("watch-async/after-stop.txt", "x")
    await asyncio.sleep(1)  # what a stopped watch would have reported by now
    assert len(events) == count, "events arrived after stop()"
    assert exits in ([], [None]), exits


# ============================================================================ commands


def test_sync_command_run_options(sbx: Sandbox) -> None:
    r = sbx.commands.run("echo $A-$B; pwd; whoami", envs={"A": "a", "B": "b"}, cwd="/tmp")
    assert (r.stdout, r.stderr, r.exit_code, r.error) == ("a-b\n/tmp\nuser\n", "", 0, None)
    # root by name; with no cwd a command starts in the template's workdir (as envd does), any user.
    assert sbx.commands.run("whoami; echo $HOME; pwd", user="root").stdout == "root\n/root\n/home/user\n"
    out: list[str] = []
    err: list[str] = []
    sbx.commands.run("echo o; echo e >&2", on_stdout=out.append, on_stderr=err.append)
    assert (out, err) == (["o\n"], ["e\n"])
    with pytest.raises(CommandExitException) as ei:
        sbx.commands.run("echo bad >&2; exit 5")
    assert (ei.value.exit_code, ei.value.stderr, ei.value.error) == (5, "bad\n", "exit status 5")
    with pytest.raises(InvalidArgumentException):
        sbx.commands.run("true", cwd="/no/such/dir")
    with pytest.raises(InvalidArgumentException):
        sbx.commands.run("true", user="no-such-user")


def test_sync_background_stdin_and_handles(sbx: Sandbox) -> None:
    cmds = sbx.commands
    h = cmds.run("cat", background=True, stdin=True, envs={"MARK": "stdin-test"}, cwd="/tmp")
    listed = {p.pid: p for p in cmds.list()}
    assert h.pid in listed
    info = listed[h.pid]
    assert (info.cmd, info.args, info.cwd, info.envs) == ("/bin/bash", ["-l", "-c", "cat"], "/tmp",
                                                          {"MARK": "stdin-test"})

    h.send_stdin("handle\n")  # the handle's method
    cmds.send_stdin(h.pid, b"commands\n")  # by pid
    cmds.stream_input(h.pid, iter(["stream-1\n", b"stream-2\n"]))
    second = cmds.connect(h.pid)  # another stream on the same process
    cmds.close_stdin(h.pid)
    result = h.wait()
    assert result.stdout == "handle\ncommands\nstream-1\nstream-2\n" and result.exit_code == 0
    # The second handle saw the process from where it attached to its end.
    assert second.wait().exit_code == 0

    h2 = cmds.run("cat; echo closed", background=True, stdin=True)
    h2.send_stdin("x\n")
    h2.close_stdin()  # the handle's close_stdin: cat sees EOF
    assert h2.wait().stdout == "x\nclosed\n"
    with pytest.raises(NotFoundException):
        cmds.send_stdin(h2.pid, "too late")


def test_sync_disconnect_connect_and_kill(sbx: Sandbox) -> None:
    cmds = sbx.commands
    h = cmds.run("for i in 1 2 3 4 5 6 7 8; do echo tick-$i; sleep 0.5; done", background=True)
    first: list[str] = []
    for out, _, _ in h:  # the handle is an iterator of (stdout, stderr, pty)
        if out:
            first.append(out)
            break
    h.disconnect()  # the command goes on without us
    again = cmds.connect(h.pid)
    later: list[str] = []
    result = again.wait(on_stdout=later.append)
    assert first[0].startswith("tick-1\n") and result.exit_code == 0
    assert "tick-8\n" in later and "tick-1\n" not in later, later

    victim = cmds.run("sleep 120", background=True)
    assert cmds.kill(victim.pid) is True
    with pytest.raises(CommandExitException) as ei:
        victim.wait()
    assert (ei.value.exit_code, ei.value.error) == (-1, "signal: killed")
    assert cmds.kill(victim.pid) is False  # gone
    assert victim.pid not in {p.pid for p in cmds.list()}

    other = cmds.run("sleep 120", background=True)
    assert other.kill() is True  # the handle's kill
    with pytest.raises(CommandExitException):
        other.wait()
    with pytest.raises(NotFoundException):
        cmds.connect(other.pid)


async def test_async_commands(asbx: AsyncSandbox) -> None:
    cmds = asbx.commands
    out: list[str] = []

    async def on_err(s: str) -> None:  # async callbacks are awaited
        out.append("err:" + s)

    h = await cmds.run("cat; echo done >&2", background=True, stdin=True, on_stdout=out.append, on_stderr=on_err)
    assert h.pid in {p.pid for p in await cmds.list()}
    await h.send_stdin("a\n")
    await cmds.send_stdin(h.pid, b"b\n")
    async with cmds.stream_input(h.pid) as stream:
        await stream.send("c\n")
        await stream.send(b"d\n")
    await cmds.close_stdin(h.pid)
    result = await h.wait()
    assert result.stdout == "a\nb\nc\nd\n" and result.stderr == "done\n"
    assert "".join(x for x in out if not x.startswith("err:")) == "a\nb\nc\nd\n" and "err:done\n" in out
    assert (h.stdout, h.stderr, h.exit_code, h.error) == ("a\nb\nc\nd\n", "done\n", 0, None)

    h2 = await cmds.run("cat", background=True, stdin=True)
    await h2.send_stdin("z\n")
    await h2.close_stdin()
    assert (await h2.wait()).stdout == "z\n"

    ticker = await cmds.run("for i in 1 2 3 4 5 6; do echo t$i; sleep 0.5; done", background=True)
    await ticker.disconnect()
    seen: list[str] = []
    again = await cmds.connect(ticker.pid, on_stdout=seen.append)
    assert (await again.wait()).exit_code == 0 and "t6\n" in seen

    victim = await cmds.run("sleep 120", background=True)
    assert await cmds.kill(victim.pid) is True
    with pytest.raises(CommandExitException) as ei:
        await victim.wait()
    assert ei.value.exit_code == -1
    assert await cmds.kill(victim.pid) is False
    other = await cmds.run("sleep 120", background=True)
    assert await other.kill() is True
    with pytest.raises(NotFoundException):
        await cmds.connect(999999)


# ============================================================================ pty


class PtyReader:
    """Collects a sync pty handle's output on a thread (``wait`` blocks until the shell exits)."""

    def __init__(self, handle: Any) -> None:
        self.data = b""
        self.result: Any = None
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, args=(handle,), daemon=True)
        self._thread.start()

    def _run(self, handle: Any) -> None:
        try:
            self.result = handle.wait(on_pty=self._add)
        except BaseException as e:  # noqa: BLE001 - reported to the test
            self.error = e

    def _add(self, chunk: bytes) -> None:
        with self._lock:
            self.data += chunk

    def wait_for(self, marker: bytes) -> None:
        wait_for(lambda: marker in self.data, f"{marker!r} on the terminal; got {self.data[-300:]!r}")

    def join(self) -> None:
        self._thread.join(BOUND_S)
        assert not self._thread.is_alive(), "the terminal did not end"


def test_sync_pty(sbx: Sandbox) -> None:
    pty = sbx.pty
    h = pty.create(PtySize(rows=24, cols=80), envs={"PTY_VAR": "pv"}, cwd="/tmp")
    reader = PtyReader(h)
    pty.send_stdin(h.pid, b"echo $PTY_VAR-$(pwd)-$(stty size | tr ' ' x)\n")
    reader.wait_for(b"pv-/tmp-24x80")
    pty.resize(h.pid, PtySize(rows=40, cols=120))
    pty.send_stdin(h.pid, b"stty size | tr ' ' x\n")
    reader.wait_for(b"40x120")

    second = PtyReader(pty.connect(h.pid))  # a second stream on the same terminal
    pty.stream_input(h.pid, iter([b"echo from-", "stream\n"]))
    reader.wait_for(b"from-stream")
    second.wait_for(b"from-stream")
    pty.send_stdin(h.pid, b"exit 3\n")
    reader.join()
    second.join()
    assert isinstance(reader.error, CommandExitException) and reader.error.exit_code == 3

    killed = pty.create(PtySize(rows=10, cols=40), user="root")
    kreader = PtyReader(killed)
    pty.send_stdin(killed.pid, b"whoami\n")
    kreader.wait_for(b"root")
    assert pty.kill(killed.pid) is True
    kreader.join()
    assert isinstance(kreader.error, CommandExitException) and kreader.error.exit_code == -1
    assert pty.kill(killed.pid) is False
    with pytest.raises(NotFoundException):
        pty.resize(killed.pid, PtySize(rows=1, cols=1))


async def test_async_pty(asbx: AsyncSandbox) -> None:
    pty = asbx.pty
    data = bytearray()
    h = await pty.create(PtySize(rows=24, cols=80), on_data=data.extend, envs={"PTY_VAR": "apv"})
    await pty.send_stdin(h.pid, b"echo $PTY_VAR-$(stty size | tr ' ' x)\n")
    await await_for(lambda: b"apv-24x80" in data, "the async terminal's echo")
    await pty.resize(h.pid, PtySize(rows=50, cols=132))

    more = bytearray()

    async def on_more(chunk: bytes) -> None:  # async callbacks are awaited
        more.extend(chunk)

    second = await pty.connect(h.pid, on_data=on_more)
    async with pty.stream_input(h.pid) as stream:
        await stream.send(b"stty size | tr ' ' x\n")
    await await_for(lambda: b"50x132" in data and b"50x132" in more, "the resized size on both streams")
    await pty.send_stdin(h.pid, b"exit\n")
    assert (await h.wait()).exit_code == 0
    assert (await second.wait()).exit_code == 0

    doomed = await pty.create(PtySize(rows=10, cols=40), on_data=lambda _: None)
    assert await pty.kill(doomed.pid) is True
    with pytest.raises(CommandExitException):
        await doomed.wait()
    assert await pty.kill(doomed.pid) is False


# ============================================================================ git


@pytest.fixture
def git_sbx(e2b_env: str, shipped_template: str) -> Iterator[Sandbox]:
    """A sandbox of the shipped default-sandbox template, which has git (the e2e template has none:
    tests/e2e/template/e2e.Dockerfile downloads no packages)."""
    s = Sandbox.create(shipped_template, timeout=900, metadata={"suite": SUITE, "api": "sync-git"})
    try:
        yield s
    finally:
        s.kill()


@pytest_asyncio.fixture
async def git_asbx(e2b_env: str, shipped_template: str) -> AsyncIterator[AsyncSandbox]:
    s = await AsyncSandbox.create(shipped_template, timeout=900, metadata={"suite": SUITE, "api": "async-git"})
    try:
        yield s
    finally:
        await s.kill()


def check_sync_git(s: Sandbox, root: str) -> None:
    """E2B's ``sandbox.git`` on a local bare repository (no network): every method of it."""
    g = s.git
    g.configure_user("Surface Test", "surface@example.org")
    assert g.get_config("user.name") == "Surface Test"
    g.set_config("init.defaultBranch", "main")
    assert g.get_config("init.defaultBranch") == "main"
    assert g.get_config("no.such-key") is None

    g.init(f"{root}/origin.git", bare=True, initial_branch="main")
    g.init(f"{root}/repo", initial_branch="main")
    s.files.write(f"{root}/repo/a.txt", "one\n")
    st = g.status(f"{root}/repo")
    assert st.current_branch == "main" and st.has_untracked and not st.has_staged
    g.add(f"{root}/repo")
    assert g.status(f"{root}/repo").has_staged
    g.commit(f"{root}/repo", "first")
    assert g.status(f"{root}/repo").is_clean
    g.set_config("core.fileMode", "false", scope="local", path=f"{root}/repo")
    assert g.get_config("core.fileMode", scope="local", path=f"{root}/repo") == "false"

    g.remote_add(f"{root}/repo", "origin", f"/home/user/{root}/origin.git")
    assert g.remote_get(f"{root}/repo", "origin") == f"/home/user/{root}/origin.git"
    assert g.remote_get(f"{root}/repo", "nope") is None
    g.push(f"{root}/repo", remote="origin", branch="main")
    st = g.status(f"{root}/repo")
    assert (st.upstream, st.ahead, st.behind) == ("origin/main", 0, 0)

    g.clone(f"file:///home/user/{root}/origin.git", path=f"{root}/clone", depth=1)
    assert s.files.read(f"{root}/clone/a.txt") == "one\n"

    g.create_branch(f"{root}/repo", "feature")
    br = g.branches(f"{root}/repo")
    assert (sorted(br.branches), br.current_branch) == (["feature", "main"], "feature")
    g.checkout_branch(f"{root}/repo", "main")
    g.delete_branch(f"{root}/repo", "feature")
    assert g.branches(f"{root}/repo").branches == ["main"]

    s.files.write(f"{root}/repo/a.txt", "changed\n")
    g.restore(f"{root}/repo", ["a.txt"])
    assert s.files.read(f"{root}/repo/a.txt") == "one\n"

    s.files.write(f"{root}/repo/b.txt", "b\n")
    g.add(f"{root}/repo", files=["b.txt"], all=False)
    g.commit(f"{root}/repo", "second", author_name="Other", author_email="other@example.org")
    g.push(f"{root}/repo")
    g.pull(f"{root}/clone")
    assert s.files.read(f"{root}/clone/b.txt") == "b\n"
    g.reset(f"{root}/repo", mode="hard", target="HEAD~1")
    assert not s.files.exists(f"{root}/repo/b.txt")
    assert s.commands.run(f"git -C {root}/clone log -1 --format=%an").stdout == "Other\n"

    g.dangerously_authenticate("surface-user", "surface-token", host="git.example.invalid")
    creds = s.commands.run("cat ~/.git-credentials").stdout
    assert "https://surface-user:surface-token@git.example.invalid" in creds


def test_sync_git(git_sbx: Sandbox) -> None:
    check_sync_git(git_sbx, "git-sync")


async def check_async_git(s: AsyncSandbox, root: str) -> None:
    """The same flow through ``AsyncSandbox.git``."""
    g = s.git
    await g.configure_user("Async Test", "async@example.org")
    assert await g.get_config("user.email") == "async@example.org"
    await g.set_config("init.defaultBranch", "main")
    await g.init(f"{root}/origin.git", bare=True, initial_branch="main")
    await g.init(f"{root}/repo", initial_branch="main")
    await s.files.write(f"{root}/repo/f.txt", "f\n")
    assert (await g.status(f"{root}/repo")).has_untracked
    await g.add(f"{root}/repo")
    await g.commit(f"{root}/repo", "only")
    assert (await g.status(f"{root}/repo")).is_clean
    await g.remote_add(f"{root}/repo", "origin", f"/home/user/{root}/origin.git")
    assert await g.remote_get(f"{root}/repo", "origin") == f"/home/user/{root}/origin.git"
    await g.push(f"{root}/repo", remote="origin", branch="main")
    await g.clone(f"/home/user/{root}/origin.git", path=f"{root}/clone")
    await s.files.write(f"{root}/repo/g.txt", "g\n")
    await g.add(f"{root}/repo")
    await g.commit(f"{root}/repo", "more")
    await g.push(f"{root}/repo")
    await g.pull(f"{root}/clone")
    assert await s.files.read(f"{root}/clone/g.txt") == "g\n"
    await g.create_branch(f"{root}/repo", "side")
    assert (await g.branches(f"{root}/repo")).current_branch == "side"
    await g.checkout_branch(f"{root}/repo", "main")
    await g.delete_branch(f"{root}/repo", "side")
    await s.files.write(f"{root}/repo/f.txt", "dirty\n")
    await g.restore(f"{root}/repo", ["f.txt"])
    assert await s.files.read(f"{root}/repo/f.txt") == "f\n"
    await g.reset(f"{root}/repo", mode="hard", target="HEAD~1")
    assert not await s.files.exists(f"{root}/repo/g.txt")
    await g.dangerously_authenticate("async-user", "async-token", host="git.example.invalid")
    assert "async-user:async-token@git.example.invalid" in (await s.commands.run("cat ~/.git-credentials")).stdout


async def test_async_git(git_asbx: AsyncSandbox) -> None:
    await check_async_git(git_asbx, "git-async")


# ============================================================================ pause


def test_sync_pause_and_connect(e2b_env: str, test_template: str) -> None:
    """pause (on the instance and by id), beta_pause, and connect resuming: files and processes
    are there after the resume; a second pause of a paused sandbox answers False."""
    s = Sandbox.create(test_template, timeout=300, metadata={"suite": SUITE, "api": "sync-pause"})
    try:
        s.files.write("kept.txt", "written before the pause")
        sleeper = s.commands.run("sleep 900", background=True)
        assert s.pause() is True
        assert s.is_running() is False
        assert Sandbox.get_info(s.sandbox_id).state.value == "paused"
        assert Sandbox.pause(s.sandbox_id) is False  # already paused
        back = Sandbox.connect(s.sandbox_id)
        assert back.is_running() is True
        assert back.files.read("kept.txt") == "written before the pause"
        assert sleeper.pid in {p.pid for p in back.commands.list()}
        assert back.beta_pause() is True  # the deprecated name, same request
        assert back.is_running() is False
        again = back.connect()  # on the instance
        assert again.commands.run("echo resumed").stdout == "resumed\n"
    finally:
        Sandbox.kill(s.sandbox_id)


async def test_async_pause_and_connect(e2b_env: str, test_template: str) -> None:
    s = await AsyncSandbox.create(test_template, timeout=300, metadata={"suite": SUITE, "api": "async-pause"})
    try:
        await s.files.write("kept.txt", "async, before the pause")
        assert await s.pause() is True
        assert await s.is_running() is False
        back = await AsyncSandbox.connect(s.sandbox_id)
        assert await back.is_running() is True
        assert await back.files.read("kept.txt") == "async, before the pause"
    finally:
        await AsyncSandbox.kill(s.sandbox_id)
