"""File operations run with the user's filesystem identity (issue 18: hostile input).

:func:`trenvx.guest.agent.users.acting_as` gives one thread the user's fsuid, fsgid and
supplementary groups, so the kernel's own permission checks decide; the /files and
filesystem handlers use it for every call of a non-root user. Checked here: the switch is per
thread and undone; the handlers, called as ``nobody`` (uid 65534), are refused what nobody may
not touch (root's files, through symlinks too), create what nobody owns, and answer errors that
E2B's unmodified SDK raises with "permission denied" in the message.
"""
# ruff: noqa: F811 - pytest fixtures imported from the harness

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.unit.test_agent_harness import AgentProcess, fresh_agent  # noqa: F401 - fixtures
from trenvx.guest.agent import ENVD_COMPAT_VERSION
from trenvx.guest.agent.connect import ConnectError, RpcContext
from trenvx.guest.agent.filesystem import FilesystemService
from trenvx.guest.agent.state import AgentState
from trenvx.guest.agent.users import User, acting_as, fs_identity, lookup_user
from trenvx.guest.client import AgentClient

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the fs identity switch needs root (like the guest)")

NOBODY = 65534
#: A user the host need not have: acting_as takes the ids as given.
U1000 = User("u1000", 1000, 1000, "/", "/bin/sh", (1000,))


@pytest.fixture
def area() -> Iterator[Path]:
    """``/tmp/trenvx-fsid-*`` (root, 0755) holding ``nobody/`` (nobody's, 0755), ``root/`` (root,
    0700) with ``secret.txt`` (0600) and ``public/`` (root, 0755) with ``system.txt`` (0644).
    pytest's tmp_path is under a root-only 0700 directory nobody could not even reach."""
    base = Path(tempfile.mkdtemp(prefix="trenvx-fsid-", dir="/tmp"))
    try:
        base.chmod(0o755)
        (base / "nobody").mkdir(mode=0o755)
        os.chown(base / "nobody", NOBODY, NOBODY)
        (base / "root").mkdir(mode=0o700)
        (base / "root" / "secret.txt").write_text("root only\n")
        (base / "root" / "secret.txt").chmod(0o600)
        (base / "public").mkdir(mode=0o755)
        (base / "public" / "system.txt").write_text("system\n")
        (base / "public" / "system.txt").chmod(0o644)
        yield base
    finally:
        shutil.rmtree(base)


# ----------------------------------------------------------------------------- the switch


def test_acting_as_is_per_thread_and_restored(area: Path) -> None:
    secret = area / "root" / "secret.txt"
    before = fs_identity()
    inside: dict[str, Any] = {}
    switched, release = threading.Event(), threading.Event()

    def as_u1000() -> None:
        with acting_as(U1000):
            inside["identity"] = fs_identity()
            try:
                secret.read_text()
                inside["read"] = "allowed"
            except PermissionError:
                inside["read"] = "denied"
            switched.set()
            release.wait(10)
        inside["after"] = fs_identity()
        inside["read_after"] = secret.read_text()

    worker = threading.Thread(target=as_u1000)
    worker.start()
    try:
        assert switched.wait(10)
        # While the worker acts as uid 1000, this thread is still root, groups and all.
        assert fs_identity() == before
        assert secret.read_text() == "root only\n"
    finally:
        release.set()
        worker.join(10)
    assert inside["identity"] == (1000, 1000, [1000])
    assert inside["read"] == "denied"
    assert inside["after"] == before and inside["read_after"] == "root only\n"


def test_supplementary_groups_count_and_an_error_restores(area: Path) -> None:
    shared = area / "public" / "group.txt"
    shared.write_text("group 4242\n")
    os.chown(shared, 0, 4242)
    shared.chmod(0o640)
    with acting_as(User("u1000", 1000, 1000, "/", "/bin/sh", (1000, 4242))):
        assert shared.read_text() == "group 4242\n"
    with acting_as(U1000):
        with pytest.raises(PermissionError):
            shared.read_text()
    before = fs_identity()
    with pytest.raises(RuntimeError, match="inside"):
        with acting_as(U1000):
            raise RuntimeError("inside")
    assert fs_identity() == before
    with acting_as(lookup_user("root")):  # root: unchanged
        assert fs_identity() == before


def test_what_the_user_creates_is_theirs(area: Path) -> None:
    with acting_as(lookup_user("nobody")):
        (area / "nobody" / "made.txt").write_text("x")
        with pytest.raises(PermissionError):
            (area / "public" / "planted.txt").write_text("x")
    assert (area / "nobody" / "made.txt").stat().st_uid == NOBODY
    assert (area / "nobody" / "made.txt").stat().st_gid == NOBODY
    assert not (area / "public" / "planted.txt").exists()


# ----------------------------------------------------------------------------- the filesystem service


def _ctx(user: str) -> RpcContext:
    return RpcContext(exchange=None, basic_user=user, deadline=None, keepalive_interval=30.0)  # type: ignore[arg-type]


def _refused(call: Any) -> str:
    with pytest.raises(ConnectError) as info:
        call()
    assert info.value.code == "permission_denied", info.value
    assert "permission denied" in info.value.message
    return info.value.message


def test_filesystem_rpcs_as_nobody_meet_the_kernels_permissions(area: Path) -> None:
    fs = FilesystemService(AgentState())
    nobody, root = _ctx("nobody"), _ctx("root")
    secret, system = area / "root" / "secret.txt", area / "public" / "system.txt"
    try:
        _refused(lambda: fs.stat(nobody, {"path": str(secret)}))
        _refused(lambda: fs.list_dir(nobody, {"path": str(area / "root")}))
        _refused(lambda: fs.make_dir(nobody, {"path": str(area / "root" / "d")}))
        _refused(lambda: fs.make_dir(nobody, {"path": str(area / "public" / "d" / "e")}))
        _refused(lambda: fs.remove(nobody, {"path": str(system)}))
        _refused(lambda: fs.move(nobody, {"source": str(system), "destination": str(area / "nobody" / "s")}))
        _refused(lambda: fs.move(nobody, {"source": str(area / "nobody"), "destination": str(area / "root" / "n")}))
        _refused(lambda: fs.create_watcher(nobody, {"path": str(area / "root")}))
        assert system.read_text() == "system\n" and secret.read_text() == "root only\n"
        assert sorted(os.listdir(area)) == ["nobody", "public", "root"] and os.listdir(area / "root") == ["secret.txt"]

        # In its own directory nobody does everything, and what it makes is nobody's.
        made = fs.make_dir(nobody, {"path": str(area / "nobody" / "a" / "b")})["entry"]
        assert made["owner"] == "nobody" and (area / "nobody" / "a").stat().st_uid == NOBODY
        moved = fs.move(nobody, {"source": str(area / "nobody" / "a"), "destination": str(area / "nobody" / "c")})
        assert moved["entry"]["path"] == str(area / "nobody" / "c")
        assert [e["name"] for e in fs.list_dir(nobody, {"path": str(area / "nobody"), "depth": 2})["entries"]] \
            == ["c", "b"]
        assert fs.remove(nobody, {"path": str(area / "nobody" / "c")})["entry"]["name"] == "c"
        # Root's calls are unchanged.
        assert fs.stat(root, {"path": str(secret)})["entry"]["owner"] == "root"
        assert [e["name"] for e in fs.list_dir(root, {"path": str(area / "root")})["entries"]] == ["secret.txt"]
    finally:
        fs.shutdown()


def test_a_created_watcher_collects_as_its_user(area: Path) -> None:
    """The collecting thread keeps the identity: a root-only directory moved in is reported, not
    walked (a root watcher, the control, reports the file inside it)."""
    fs = FilesystemService(AgentState())
    try:
        for user, expect_inner in (("nobody", False), ("root", True)):
            watched = area / "nobody" / f"watched-{user}"
            watched.mkdir()
            os.chown(watched, NOBODY, NOBODY)
            staged = area / "public" / f"secret-{user}"
            staged.mkdir(mode=0o700)
            (staged / "inner.txt").write_text("x")
            watcher_id = fs.create_watcher(_ctx(user), {"path": str(watched), "recursive": True})["watcherId"]
            os.rename(staged, watched / "secret")
            names: set[str] = set()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and ("secret" not in names or (expect_inner and len(names) < 2)):
                names |= {e["name"] for e in fs.get_watcher_events(_ctx(user), {"watcherId": watcher_id}).get("events", [])}
                time.sleep(0.05)
            time.sleep(0.3)  # anything late still shows
            names |= {e["name"] for e in fs.get_watcher_events(_ctx(user), {"watcherId": watcher_id}).get("events", [])}
            fs.remove_watcher(_ctx(user), {"watcherId": watcher_id})
            assert "secret" in names, (user, names)
            assert ("secret/inner.txt" in names) is expect_inner, (user, names)
    finally:
        fs.shutdown()


# ----------------------------------------------------------------------------- E2B's SDK over /files and RPCs


@pytest.fixture
async def sbx(fresh_agent: AgentProcess) -> Any:
    """E2B's unmodified SDK over an agent whose default user is nobody."""
    e2b = pytest.importorskip("e2b")
    from packaging.version import Version

    token = "fsid-token"
    async with AgentClient(fresh_agent.url) as c:
        await c.init(sandbox_id="sbx-fsid", env_vars={}, access_token=token, hostname="sbx-fsid",
                     default_user="nobody")
    config = e2b.ConnectionConfig(sandbox_url=fresh_agent.url, api_key="e2b_unused", http_version="1.1",
                                  extra_sandbox_headers={"X-Access-Token": token})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return e2b.AsyncSandbox(sandbox_id="sbx-fsid", sandbox_domain=None, envd_version=Version(ENVD_COMPAT_VERSION),
                                envd_access_token=token, traffic_access_token=None, connection_config=config)


async def test_e2b_sdk_as_nobody_is_refused_with_permission_denied(sbx: Any, area: Path) -> None:
    secret, system = area / "root" / "secret.txt", area / "public" / "system.txt"
    mine = area / "nobody"
    os.symlink(secret, mine / "link-to-secret")
    os.symlink(system, mine / "link-to-system")
    refused = (
        lambda: sbx.files.read(str(secret)),
        lambda: sbx.files.read(str(mine / "link-to-secret")),  # symlinks are followed as the user
        lambda: sbx.files.write(str(system), "intruder\n"),
        lambda: sbx.files.write(str(mine / "link-to-system"), "intruder\n"),
        lambda: sbx.files.write(str(area / "root" / "planted.txt"), "x"),
        lambda: sbx.files.write(str(area / "public" / "new" / "planted.txt"), "x"),
        lambda: sbx.files.list(str(area / "root")),
        lambda: sbx.files.get_info(str(secret)),
        lambda: sbx.files.remove(str(system)),
        lambda: sbx.files.make_dir(str(area / "root" / "d")),
    )
    for call in refused:
        with pytest.raises(Exception) as info:
            await call()
        assert "permission denied" in str(info.value).lower(), info.value
    assert system.read_text() == "system\n"
    assert sorted(os.listdir(area / "public")) == ["system.txt"] and os.listdir(area / "root") == ["secret.txt"]

    # What nobody may do works, and is nobody's.
    info = await sbx.files.write(str(mine / "sub" / "own.txt"), "mine")
    assert info.path == str(mine / "sub" / "own.txt")
    assert (mine / "sub").stat().st_uid == NOBODY and (mine / "sub" / "own.txt").stat().st_uid == NOBODY
    assert await sbx.files.read(str(mine / "sub" / "own.txt")) == "mine"
    assert await sbx.files.read(str(system)) == "system\n"  # world-readable
    # The same sandbox's root still reads root's file.
    assert await sbx.files.read(str(secret), user="root") == "root only\n"


async def test_a_command_cannot_start_in_a_directory_its_user_cannot_enter(sbx: Any, area: Path) -> None:
    # The child process changes into cwd before it drops to the user: the agent checks first.
    with pytest.raises(Exception) as info:
        await sbx.commands.run("cat secret.txt", cwd=str(area / "root"))
    assert "permission denied" in str(info.value).lower(), info.value
    r = await sbx.commands.run("id -u; pwd", cwd=str(area / "nobody"))
    assert r.stdout == f"{NOBODY}\n{area / 'nobody'}\n"
    r = await sbx.commands.run("cat secret.txt", cwd=str(area / "root"), user="root")
    assert r.stdout == "root only\n"
