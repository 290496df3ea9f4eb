"""Fork and snapshots of running sandboxes on real VMs (issue 14 items 4 and 5).

Through E2B's unmodified ``e2b`` package against a real ``trenvx serve``: a fork's children see
the source's files and the memory of a process that was running in it (a Python variable that
never reached the disk) and diverge independently, each with its own id, tokens, hostname,
machine id and random numbers, while the source runs on with its id and timeout; a snapshot
outlives its source and starts new sandboxes; refused requests (fork of a paused sandbox, count
0 or 101, unknown sandbox) change nothing; a deleted snapshot stops new creates but not the
sandboxes started from it, and its files go with the last of them. Through the manager: a
snapshot of a snapshot's child, the source's disk after a snapshot surviving a pause to disk,
what children share (read-only files only), the files' modes, a second snapshot of one source
starting copies after the source is gone. And ``sandbox_sdk`` and
``sandbox-cli``.
"""

from __future__ import annotations

import re
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from trenvx.vmm.qemu_img import backing_chain
from trenvx.sandbox.snapshots import AGENT_TOKEN
from trenvx.template.build_users import USERS
from trenvx.template.store import MANIFEST, MEMORY, VMSTATE

from .server_helpers import e2b_pointed_at, running_server, wait_until

pytestmark = pytest.mark.e2e

e2b = pytest.importorskip("e2b")

API_KEY = "fork-key"
HOME = "/home/user"
BOUND_S = 120.0
"""Generous bound on what a guest does in the background (TCG is slow)."""

# A process that keeps a random number only in its memory: it writes it out when asked (the file
# /tmp/ask appears), so a copy that answers has the process's memory, not a file of the source.
HOLDER = (
    "import os, random, time\n"
    "secret = random.getrandbits(64)\n"
    "open('/tmp/holder.pid', 'w').write(str(os.getpid()))\n"
    "while True:\n"
    "    if os.path.exists('/tmp/ask'):\n"
    "        open('/tmp/answer.tmp', 'w').write(str(secret)); os.rename('/tmp/answer.tmp', '/tmp/answer')\n"
    "        os.remove('/tmp/ask')\n"
    "    time.sleep(0.1)\n"
)


@pytest.fixture(scope="module")
def server(tmp_path_factory, e2e_config, test_template):
    with running_server(tmp_path_factory.mktemp("fork"), e2e_config, template=test_template, api_key=API_KEY,
                        pools=False) as srv:
        yield srv


@pytest.fixture
def e2b_env(server):
    with e2b_pointed_at(server.url, API_KEY):
        yield server


def templates_dir(e2e_config) -> Path:
    return e2e_config.data_root / "templates"


def snapshot_dirs(e2e_config) -> set[str]:
    """Snapshot builds on disk (published or not)."""
    import json

    out = set()
    for template in list(templates_dir(e2e_config).iterdir()):
        try:  # the server may remove a snapshot while this reads (a fork's, with its last child)
            builds = [b for b in template.iterdir() if not b.is_symlink()]
        except OSError:
            continue
        for build in builds:
            try:
                if json.loads((build / MANIFEST).read_text()).get("snapshot"):
                    out.add(str(build))
            except (OSError, ValueError):
                continue
    return out


def ask(sbx) -> str:
    """The holder process's secret, from its memory."""
    sbx.files.write("/tmp/ask", "")
    deadline = time.monotonic() + BOUND_S
    while time.monotonic() < deadline:
        if sbx.files.exists("/tmp/answer"):
            answer = sbx.files.read("/tmp/answer").strip()
            sbx.files.remove("/tmp/answer")
            return answer
        time.sleep(0.2)
    raise AssertionError(f"the holder process of {sbx.sandbox_id} did not answer")


def identity(sbx) -> dict[str, str]:
    r = sbx.commands.run("hostname; cat /etc/machine-id; od -An -N16 -tx1 /dev/urandom | tr -d ' \\n'; echo; "
                         "python3 -c 'import os; print(os.urandom(8).hex())'", user="root")
    host, machine_id, urandom, py = r.stdout.split()
    return {"hostname": host, "machine_id": machine_id, "urandom": urandom, "python": py}


def test_fork_children_have_files_and_memory_diverge_and_own_identity(e2b_env, test_template, e2e_config) -> None:
    from e2b import Sandbox

    src = Sandbox.create(test_template, timeout=600, envs={"FORK_ENV": "inherited"}, metadata={"test": "fork"})
    children: list = []
    try:
        src.files.write(f"{HOME}/notes.txt", "written before the fork")
        src.commands.run(f"python3 -c \"{HOLDER}\"", background=True)
        assert wait_until(lambda: src.files.exists("/tmp/holder.pid"), BOUND_S)
        secret = ask(src)
        end_before = src.get_info().end_at
        dirs_before = snapshot_dirs(e2e_config)

        children = src.fork(count=2, timeout=300)
        assert len(children) == 2 and all(isinstance(c, Sandbox) for c in children), children
        a, b = children

        # the source runs on: same id, same timeout, its process and files
        assert src.is_running() and src.get_info().end_at == end_before
        assert ask(src) == secret
        # the children: the source's files, its environment, its running process with its memory
        for c in children:
            assert c.files.read(f"{HOME}/notes.txt") == "written before the fork"
            assert c.commands.run("echo $FORK_ENV").stdout.strip() == "inherited"
            assert ask(c) == secret
            info = c.get_info()
            assert info.template_id == test_template and info.metadata == {"test": "fork"}
        # each its own identity
        ids = {s.sandbox_id for s in (src, a, b)}
        tokens = {s._envd_access_token for s in (src, a, b)}
        assert len(ids) == 3 and len(tokens) == 3
        who = {s.sandbox_id: identity(s) for s in (src, a, b)}
        for field in ("hostname", "machine_id", "urandom", "python"):
            assert len({w[field] for w in who.values()}) == 3, (field, who)
        for sid, w in who.items():
            assert w["hostname"] == sid
        # they diverge: a write in one is seen by none of the others
        a.files.write(f"{HOME}/side.txt", "a")
        b.files.write(f"{HOME}/side.txt", "b")
        assert a.files.read(f"{HOME}/side.txt") == "a" and b.files.read(f"{HOME}/side.txt") == "b"
        assert not src.files.exists(f"{HOME}/side.txt")
        src.files.write(f"{HOME}/after.txt", "source only")
        assert not a.files.exists(f"{HOME}/after.txt") and not b.files.exists(f"{HOME}/after.txt")
        # one token does not open another sandbox
        with httpx.Client(base_url=e2b_env.url, timeout=30) as h:
            r = h.post("/filesystem.Filesystem/Stat", json={"path": "/"},
                       headers={"E2b-Sandbox-Id": b.sandbox_id, "E2b-Sandbox-Port": "49983",
                                "X-Access-Token": a._envd_access_token, "Content-Type": "application/json"})
            assert r.status_code == 401, r.text
        # the fork's snapshot is on disk while its children run, and listed nowhere
        fork_dirs = snapshot_dirs(e2e_config) - dirs_before
        assert len(fork_dirs) == 1
        fork_name = Path(next(iter(fork_dirs))).parent.name  # templates/<name>/<build>
        assert fork_name.startswith(".fork-")
        assert all(s.snapshot_id.split(":")[0] != fork_name for s in Sandbox.list_snapshots().next_items())
        with httpx.Client(base_url=e2b_env.url, headers={"X-API-Key": API_KEY}) as h:
            metrics = h.get("/metrics").text
        assert re.search(rf'trenvx_forks_total{{outcome="ok",template="{test_template}"}} [1-9]', metrics), metrics
        assert re.search(rf'trenvx_fork_children_total{{outcome="ok",template="{test_template}"}} [2-9]', metrics)

        for c in children:
            c.kill()
        assert wait_until(lambda: not (snapshot_dirs(e2e_config) & fork_dirs), 30), "the fork's snapshot stayed"
    finally:
        for c in children:
            if isinstance(c, Sandbox):
                c.kill()
        src.kill()


def test_snapshot_outlives_its_source(e2b_env, test_template, e2e_config) -> None:
    from e2b import Sandbox

    src = Sandbox.create(test_template, timeout=300)
    copies: list = []
    snap = None
    try:
        src.files.write(f"{HOME}/kept.txt", "in the snapshot")
        src.commands.run(f"python3 -c \"{HOLDER}\"", background=True)
        assert wait_until(lambda: src.files.exists("/tmp/holder.pid"), BOUND_S)
        secret = ask(src)
        snap = src.create_snapshot()
        assert re.fullmatch(r"[a-z0-9]{20}:default", snap.snapshot_id) and snap.names == []
        assert src.is_running()
        src.files.write(f"{HOME}/later.txt", "after the snapshot")
        listed = [s.snapshot_id for s in src.list_snapshots().next_items()]
        assert listed == [snap.snapshot_id]
        assert snap.snapshot_id in [s.snapshot_id for s in Sandbox.list_snapshots().next_items()]
        assert not [s for s in Sandbox.list_snapshots(sandbox_id="nosuchsandbox").next_items()]
        build_dir = (templates_dir(e2e_config) / snap.snapshot_id.split(":")[0] / "current").resolve()
        # root's alone: the memory holds the source's guest memory, agent.token its token
        assert stat.S_IMODE(build_dir.stat().st_mode) == 0o700
        assert stat.S_IMODE((build_dir / MEMORY).stat().st_mode) == 0o400
        for f in (VMSTATE, AGENT_TOKEN):
            assert stat.S_IMODE((build_dir / f).stat().st_mode) == 0o600
        src.kill()

        for _ in range(2):
            c = Sandbox.create(snap.snapshot_id, timeout=300)
            copies.append(c)
            assert c.files.read(f"{HOME}/kept.txt") == "in the snapshot"
            assert not c.files.exists(f"{HOME}/later.txt")
            assert ask(c) == secret
            assert identity(c)["hostname"] == c.sandbox_id
        assert copies[0].get_info().template_id == snap.snapshot_id.split(":")[0]

        assert Sandbox.delete_snapshot(snap.snapshot_id) is True
        assert Sandbox.delete_snapshot(snap.snapshot_id) is False
        with pytest.raises(e2b.exceptions.SandboxException):
            Sandbox.create(snap.snapshot_id, timeout=60)
        # in use: deleted, not listed, its files kept while its copies run; they go with the last
        assert snap.snapshot_id not in [s.snapshot_id for s in Sandbox.list_snapshots().next_items()]
        assert build_dir.is_dir() and any((build_dir / USERS).iterdir())
        assert copies[0].commands.run("cat /home/user/kept.txt").stdout == "in the snapshot"
        copies[0].kill()
        assert copies[1].commands.run("echo still here").stdout.strip() == "still here"
        assert build_dir.is_dir()
        copies[1].kill()
        assert wait_until(lambda: not build_dir.exists(), 30), f"{build_dir} stayed after its last sandbox ended"
        snap = None
    finally:
        for c in copies:
            c.kill()
        src.kill()
        if snap is not None:
            Sandbox.delete_snapshot(snap.snapshot_id)


def test_named_snapshots_and_refused_names(e2b_env, test_template, e2e_config) -> None:
    from e2b import Sandbox

    name = f"e2e-snap-{uuid.uuid4().hex[:8]}"
    src = Sandbox.create(test_template, timeout=300)
    try:
        src.files.write(f"{HOME}/v.txt", "1")
        first = src.create_snapshot(name)
        assert first.snapshot_id == f"{name}:default" and first.names == [name]
        src.files.write(f"{HOME}/v.txt", "2")
        second = src.create_snapshot(f"{name}:default")
        assert second.snapshot_id == first.snapshot_id
        builds = [m for m in templates_dir(e2e_config).glob(f"{name}/*/{MANIFEST}") if not m.parent.is_symlink()]
        assert len(builds) == 1, "the first build is used by nothing and goes"
        assert [s.snapshot_id for s in Sandbox.list_snapshots(name=name).next_items()] == [first.snapshot_id]
        with Sandbox.create(name, timeout=120) as c:
            assert c.files.read(f"{HOME}/v.txt") == "2"
        for bad, why in ((test_template, "template"), ("Bad Name", "lowercase"), ("team/x", "namespace"),
                         (f"{name}:v2", "tag")):
            with pytest.raises(e2b.exceptions.SandboxException, match=why):
                src.create_snapshot(bad)
        with pytest.raises(e2b.exceptions.SandboxException, match="filesystem-only"):
            src.create_snapshot(mode="filesystem")
        with httpx.Client(base_url=e2b_env.url, headers={"X-API-Key": API_KEY}) as h:
            r = h.delete(f"/templates/{test_template}")
            assert r.status_code == 409 and "not a snapshot" in r.json()["message"]
            assert h.get(f"/templates/{test_template}").status_code == 200
            assert name not in [t["templateID"] for t in h.get("/templates").json()]
    finally:
        src.kill()
        Sandbox.delete_snapshot(name)
    assert wait_until(lambda: not (templates_dir(e2e_config) / name).exists(), 30)


def test_refused_forks_change_nothing(e2b_env, test_template, e2e_config) -> None:
    from e2b import Sandbox

    src = Sandbox.create(test_template, timeout=300)
    try:
        h = httpx.Client(base_url=e2b_env.url, headers={"X-API-Key": API_KEY}, timeout=120)
        before = (len(Sandbox.list().next_items()), snapshot_dirs(e2e_config))
        for count in (0, 101, -1):
            r = h.post(f"/sandboxes/{src.sandbox_id}/fork", json={"count": count})
            assert r.status_code == 400 and "count" in r.json()["message"], r.text
        r = h.post(f"/sandboxes/{src.sandbox_id}/fork", json={"count": "2"})
        assert r.status_code == 400 and "count" in r.json()["message"]
        r = h.post(f"/sandboxes/{src.sandbox_id}/fork", json={"timeout": 0})
        assert r.status_code == 400 and "timeout" in r.json()["message"]
        r = h.post("/sandboxes/nosuchsandbox0000000/fork", json={"count": 1})
        assert r.status_code == 404
        assert h.post("/sandboxes/nosuchsandbox0000000/snapshots", json={}).status_code == 404
        with pytest.raises(e2b.exceptions.InvalidArgumentException):
            src.fork(count=0)  # the SDK's own check
        assert (len(Sandbox.list().next_items()), snapshot_dirs(e2e_config)) == before

        src.pause()
        r = h.post(f"/sandboxes/{src.sandbox_id}/fork", json={"count": 1})
        assert r.status_code == 409 and "paused" in r.json()["message"], r.text
        r = h.post(f"/sandboxes/{src.sandbox_id}/snapshots", json={})
        assert r.status_code == 409 and "paused" in r.json()["message"], r.text
        assert h.get(f"/sandboxes/{src.sandbox_id}").json()["state"] == "paused"
        assert (len(Sandbox.list().next_items()), snapshot_dirs(e2e_config)) == before
        h.close()
    finally:
        src.kill()


async def test_snapshot_chain_and_the_source_disk_after_a_pause(manager, test_template, e2e_config) -> None:
    """A snapshot of a snapshot's child; the source, whose disk is now a layer deeper, paused to
    disk and resumed (its QEMU opens the chain again by its paths); children share only
    read-only files (their own overlay, the memory file mapped privately)."""
    src = await manager.create(test_template, timeout_s=600)
    made: list = []
    builds: list = []
    try:
        await src.run("echo one > /tmp/one && sync", user="root")
        rss_before = src.memory()[0]
        s1 = await manager.snapshots.take(src.id)
        builds.append(s1)
        # the migration read all of its RAM; the pages it faulted in only for that are given back
        grown = src.memory()[0] - rss_before
        assert grown < (src.build.machine.mem_mb << 20) // 2, f"the source's RSS grew by {grown >> 20} MiB"
        await src.run("echo two > /tmp/two && sync", user="root")
        child = await manager.create(s1.name, timeout_s=300)
        made.append(child)
        await child.run("echo three > /tmp/three", user="root")
        s2 = await manager.snapshots.take(child.id)
        builds.append(s2)
        assert str(s1.path.resolve()) in s2.manifest.snapshot.requires
        grandchild = await manager.create(s2.name, timeout_s=300)
        made.append(grandchild)
        r = await grandchild.run("cat /tmp/one /tmp/three; test -e /tmp/two && echo two", user="root")
        assert r.stdout.decode().split() == ["one", "three"]

        # deleting the first snapshot keeps it for the second, which needs its layer
        await manager.snapshots.delete(s1.name)
        await manager.kill(child.id)
        made.remove(child)
        await manager.snapshots.collect()
        assert s1.path.is_dir()

        # what a child has of its own, what it shares
        own = grandchild.restored.workdir / "disk.qcow2"
        cmdline = open(f"/proc/{grandchild.pid}/cmdline", "rb").read().split(b"\0")
        assert any(f"mem-path={s2.snapshot.memory_file},share=off".encode() in a for a in cmdline), cmdline
        assert any(str(own).encode() in a for a in cmdline)
        writable_maps = [line for line in open(f"/proc/{grandchild.pid}/maps").read().splitlines()
                         if str(s2.path) in line and line.split()[1][1] == "w" and line.split()[1][3] == "s"]
        assert writable_maps == [], "a snapshot file is mapped shared and writable"

        # the source's disk chain after a snapshot, reopened by a new QEMU
        await manager.pause(src.id)
        await manager.resume(src.id)
        r = await src.run("cat /tmp/one /tmp/two", user="root")
        assert r.stdout.decode().split() == ["one", "two"]

        # a second snapshot of the same source is whole without it: its layer stands on the
        # source's first layer, which the build holds under the name the header gives
        await src.run("echo four > /tmp/four && sync", user="root")
        s3 = await manager.snapshots.take(src.id)
        builds.append(s3)
        chain = backing_chain(s3.path / "layer.qcow2")
        assert chain[0] == s3.path / "layer-1.qcow2", chain
        assert not any(str(src.restored.workdir) in str(p) for p in chain), chain
        await manager.kill(src.id)
        copy = await manager.create(s3.name, timeout_s=300)
        made.append(copy)
        r = await copy.run("cat /tmp/one /tmp/two /tmp/four", user="root")
        assert r.stdout.decode().split() == ["one", "two", "four"]
    finally:
        for sb in made:
            await manager.kill(sb.id)
        if src.id in {sb.id for sb in manager.list()}:
            await manager.kill(src.id)
        for b in builds:
            try:
                await manager.snapshots.delete(b.name)
            except KeyError:
                pass
        await manager.snapshots.collect()
    assert not any(b.path.exists() for b in builds)


def test_sandbox_sdk_and_cli(server, test_template) -> None:
    from sandbox_sdk.e2b import Sandbox as SdkSandbox

    conn = {"api_url": server.url, "api_key": API_KEY}
    src = SdkSandbox.create(test_template, timeout=300, **conn)
    kids: list = []
    snap_id = None
    try:
        src.files.write("/tmp/sdk.txt", "sdk")
        kids = src.fork(count=2, timeout=120)
        assert len(kids) == 2 and {k.files.read("/tmp/sdk.txt") for k in kids} == {"sdk"}
        info = src.create_snapshot()
        snap_id = info.snapshot_id
        assert snap_id in [s.snapshot_id for s in SdkSandbox.list_snapshots(**conn).next_items()]
        assert [s.snapshot_id for s in src.list_snapshots().next_items()] == [snap_id]

        cli = [sys.executable, "-m", "trenvx.cli.sandbox_cli", "--ip", "127.0.0.1", "--port", str(server.port),
               "--api-key", API_KEY]
        r = subprocess.run([*cli, "sandbox", "fork", src.sandbox_id, "--count", "1", "--timeout", "60"],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        child = r.stdout.split()[0]
        assert "1 of 1 children" in r.stderr
        assert SdkSandbox.kill(child, **conn) is True
        r = subprocess.run([*cli, "snapshot", "create", src.sandbox_id], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        cli_snap = r.stdout.strip()
        r = subprocess.run([*cli, "snapshot", "ls", "--sandbox", src.sandbox_id], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0 and cli_snap in r.stdout and snap_id in r.stdout
        r = subprocess.run([*cli, "snapshot", "rm", cli_snap], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and f"{cli_snap} deleted" in r.stdout
        r = subprocess.run([*cli, "sandbox", "fork", src.sandbox_id, "--count", "0"], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 1 and "count" in r.stderr
        assert SdkSandbox.delete_snapshot(snap_id, **conn) is True
        snap_id = None
        assert SdkSandbox.delete_snapshot("nosuchsnapshot:default", **conn) is False
    finally:
        for k in kids:
            if not isinstance(k, Exception):
                k.kill()
        src.kill()
        if snap_id:
            SdkSandbox.delete_snapshot(snap_id, **conn)
