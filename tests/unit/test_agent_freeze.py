"""The agent's /freeze and /thaw (trenvx.guest.agent.freeze).

The freeze logic runs against stand-in system operations (a freeze of this host's disks would
hang it); the ioctls themselves run for real on an ext4 image mounted through a loop device, when
this host can make one. Inside a VM the whole path is tested by tests/e2e/test_pause_resume.py.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from trenvx.guest.agent.freeze import FIFREEZE, FreezeUnavailable, Freezer, SystemOps, parse_mountinfo, thaw_after
from trenvx.guest.agent.identity import SYSTEM_STEPS, SystemIdentity
from trenvx.guest.agent.server import Agent, AgentHTTPServer
from trenvx.guest.client import AgentClient, AgentError

MOUNTINFO = """\
22 1 0:20 / / rw,relatime - overlay overlay rw,lowerdir=/lower,upperdir=/upper/root,workdir=/upper/work
23 22 0:5 / /dev rw,nosuid - devtmpfs devtmpfs rw,size=1k
24 22 0:21 / /tmp rw,nosuid,nodev - tmpfs tmpfs rw
25 22 254:16 / /data rw,noatime shared:1 - ext4 /dev/vdb rw
26 22 254:16 /sub /data\\040two rw,noatime - ext4 /dev/vdb rw
27 22 254:32 / /ro ro,noatime - ext4 /dev/vdc ro
28 22 7:0 / /x rw - xfs /dev/loop0 rw,attr2
"""


class FakeOps:
    """Records what a freeze does; /sys/fs/ext4 lists vda (the overlay's hidden upper layer),
    vdb (reachable at /data) and pmem0 (read-only: mounting it again is refused)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []
        self.fail: dict[tuple[str, int], int] = {}

    def sync(self) -> None:
        self.calls.append(("sync",))

    def mountinfo(self) -> str:
        return MOUNTINFO

    def mounted_ext4(self) -> list[str]:
        return ["pmem0", "vda", "vdb"]

    def device_number(self, name: str) -> str:
        return {"vda": "254:0", "vdb": "254:16", "pmem0": "259:0"}[name]

    def ioctl(self, path: str, request: int) -> None:
        self.calls.append(("freeze" if request == FIFREEZE else "thaw", path))
        code = self.fail.get((path, request))
        if code:
            raise OSError(code, os.strerror(code))

    def mount(self, device: str, target: str, fstype: str) -> None:
        if device == "/dev/pmem0":
            raise OSError(errno.EBUSY, "busy")
        self.calls.append(("mount", device, target))

    def umount(self, target: str) -> None:
        self.calls.append(("umount", target))


def test_mountinfo_is_read_with_its_escapes() -> None:
    mounts = parse_mountinfo(MOUNTINFO)
    assert [m.mountpoint for m in mounts] == ["/", "/dev", "/tmp", "/data", "/data two", "/ro", "/x"]
    assert [m.writable for m in mounts if m.fstype == "ext4"] == [True, True, False]


def test_freeze_syncs_then_freezes_each_writable_filesystem_once_and_the_hidden_upper_layer() -> None:
    ops = FakeOps()
    f = Freezer(ops)
    out = f.freeze(60)
    assert ops.calls[0] == ("sync",)
    assert out == {"frozen": ["/data", "/x", "/run/trenvx-agent/freeze/vda"], "errors": [], "thawAfterSeconds": 60}
    assert ("mount", "/dev/vda", "/run/trenvx-agent/freeze/vda") in ops.calls
    assert not any(c[0] == "mount" and c[1] == "/dev/vdb" for c in ops.calls)  # reachable: not mounted again
    ops.calls.clear()
    assert f.thaw() == {"thawed": ["/run/trenvx-agent/freeze/vda", "/x", "/data"], "errors": []}
    assert ops.calls == [("thaw", "/run/trenvx-agent/freeze/vda"), ("umount", "/run/trenvx-agent/freeze/vda"),
                         ("thaw", "/x"), ("thaw", "/data")]
    assert f.thaw() == {"thawed": [], "errors": []}  # nothing frozen: nothing to do


def test_a_failing_filesystem_is_reported_and_the_others_frozen() -> None:
    ops = FakeOps()
    ops.fail[("/x", FIFREEZE)] = errno.EOPNOTSUPP
    ops.fail[("/data", FIFREEZE)] = errno.EBUSY  # frozen already: counted as frozen, thawed with the rest
    f = Freezer(ops)
    out = f.freeze()
    assert out["frozen"] == ["/data", "/run/trenvx-agent/freeze/vda"]
    assert len(out["errors"]) == 1 and out["errors"][0].startswith("/x (xfs): ")
    f.thaw()


def test_a_second_freeze_only_restarts_the_timer() -> None:
    ops = FakeOps()
    f = Freezer(ops)
    f.freeze()
    before = list(ops.calls)
    assert f.freeze()["frozen"] == f.frozen
    assert ops.calls == before  # no second sync, mount or ioctl
    f.thaw()


def test_a_freeze_nobody_thaws_ends_by_itself() -> None:
    ops = FakeOps()
    f = Freezer(ops)
    f.freeze(0.2)
    deadline = time.monotonic() + 10
    while f.frozen and time.monotonic() < deadline:
        time.sleep(0.02)
    assert f.frozen == [] and ("thaw", "/data") in ops.calls


def test_thaw_after_is_checked() -> None:
    assert thaw_after({}) == 120.0 and thaw_after({"thawAfterSeconds": 5}) == 5.0
    for bad in (0, -1, 10**6, "5", True, None):
        with pytest.raises(ValueError, match="thawAfterSeconds"):
            thaw_after({"thawAfterSeconds": bad})


def test_an_agent_without_system_operations_never_freezes() -> None:
    with pytest.raises(FreezeUnavailable):
        Freezer().freeze()


@pytest.fixture
def serve():  # noqa: ANN201 - runs an in-process agent; yields a function making its URL
    servers: list[tuple[AgentHTTPServer, Agent]] = []

    def start(agent: Agent) -> str:
        server = AgentHTTPServer(("127.0.0.1", 0), agent)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append((server, agent))
        host, port = server.server_address[:2]
        return f"http://{host}:{port}"

    yield start
    for server, agent in servers:
        server.shutdown()
        server.server_close()
        agent.shutdown()


async def test_the_endpoints_freeze_thaw_and_init_thaws_first(tmp_path: Path, serve) -> None:  # noqa: ANN001
    ops = FakeOps()
    agent = Agent(system=SystemIdentity(skip=set(SYSTEM_STEPS), etc=str(tmp_path)), freezer=Freezer(ops))
    async with AgentClient(serve(agent)) as c:
        got = await c.freeze(thaw_after_s=30)
        assert got.paths == ["/data", "/x", "/run/trenvx-agent/freeze/vda"] and got.errors == []
        assert (await c.thaw()).paths == ["/run/trenvx-agent/freeze/vda", "/x", "/data"]
        await c.freeze()
        await c.resync()  # the resume's /init: thaws before it touches anything
        assert agent.freezer.frozen == [] and ops.calls[-1] == ("thaw", "/data")
        r = await c._http.post("/freeze", json={"thawAfterSeconds": "soon"})
        assert r.status_code == 400 and "thawAfterSeconds" in r.json()["message"]
        assert (await c._http.get("/freeze")).status_code == 405
        # with a token set, /freeze needs it like every other endpoint
        await c.init(sandbox_id="sbx-f", env_vars={}, access_token="tok", hostname="sbx-f")
        async with AgentClient(c.base_url) as stranger:
            with pytest.raises(AgentError) as e:
                await stranger.freeze()
            assert e.value.status == 401


async def test_an_agent_on_a_host_answers_501(tmp_path: Path, serve) -> None:  # noqa: ANN001
    agent = Agent(system=SystemIdentity(skip=set(SYSTEM_STEPS), etc=str(tmp_path)))
    async with AgentClient(serve(agent)) as c:
        with pytest.raises(AgentError) as e:
            await c.freeze()
        assert e.value.status == 501 and "does not freeze" in e.value.message


class LoopOps(SystemOps):
    """The real ioctls, confined to one filesystem: an ext4 image on a loop device."""

    def __init__(self, mountpoint: Path) -> None:
        super().__init__()
        self.mountpoint = mountpoint

    def mountinfo(self) -> str:
        return "".join(line + "\n" for line in super().mountinfo().splitlines()
                       if f" {self.mountpoint} " in line)

    def mounted_ext4(self) -> list[str]:
        return []


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mkfs.ext4") is None, reason="needs root and mkfs.ext4")
def test_a_frozen_filesystem_holds_writes_until_thawed(tmp_path: Path) -> None:
    image, mnt = tmp_path / "fs.img", tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image), "16M"], check=True)
    if subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], capture_output=True).returncode != 0:
        pytest.skip("this host cannot mount a loop device")
    f = Freezer(LoopOps(mnt))
    try:
        (mnt / "before").write_text("written before the freeze")
        assert f.freeze(30)["frozen"] == [str(mnt)]
        done = threading.Event()

        def write() -> None:
            (mnt / "during").write_text("x")
            done.set()

        threading.Thread(target=write, daemon=True).start()
        assert not done.wait(1.0), "a write went through a frozen filesystem"
        assert f.thaw()["thawed"] == [str(mnt)]
        assert done.wait(10), "the write did not complete after the thaw"
    finally:
        f.thaw()
        subprocess.run(["umount", str(mnt)], check=False)
    # what was written before the freeze was on the disk when it froze
    out = subprocess.run(["debugfs", "-R", "cat /before", str(image)], capture_output=True, text=True)
    if out.returncode == 0:
        assert "written before the freeze" in out.stdout
