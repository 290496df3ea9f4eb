"""Issue 18, item 1 end to end: a sandbox's QEMU runs jailed (trenvx.vmm.jail).

On real sandboxes of the session's manager: the VMM's uid is not root, it has no capabilities,
QEMU's seccomp filter and NO_NEW_PRIVS are on; it sits in a cgroup of its own with the template's
limits; its uid can read neither another sandbox's files nor the server's state (nor, inside its
mount namespace, even see them); after the kill its cgroup and its uid's claim are gone.
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from trenvx.vmm.jail import CLAIMS_DIR

pytestmark = pytest.mark.e2e


def status_of(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


def cgroup_dirs(pid: int) -> dict[str, Path]:
    """controller -> the VMM's cgroup directory (v1 hierarchies; v2 as key "")."""
    out = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, ctls, path = line.split(":", 2)
        for c in (ctls.split(",") if ctls else [""]):
            if c in ("memory", "pids", "cpu", ""):
                base = Path("/sys/fs/cgroup") / (c or "unified") if Path("/sys/fs/cgroup/memory").is_dir() else Path("/sys/fs/cgroup")
                out[c] = base / path.lstrip("/")
    return out


def read_as(uid: int, path: Path) -> str:
    """What uid ``uid`` gets opening ``path`` (from the host's mount namespace): "ok" or the error."""
    r = subprocess.run(["/usr/bin/head", "-c", "1", str(path)], user=uid, group=uid, extra_groups=[],
                       capture_output=True, timeout=30)
    if r.returncode == 0:
        return "ok"
    return "PermissionError" if b"Permission denied" in r.stderr else r.stderr.decode(errors="replace")


def visible_in_ns(pid: int, path: Path) -> bool:
    """Whether ``path`` exists in the mount namespace of process ``pid``."""
    r = subprocess.run(["nsenter", f"--mount=/proc/{pid}/ns/mnt", "--", "test", "-e", str(path)], timeout=30)
    return r.returncode == 0


async def test_the_vmm_is_jailed_and_its_jail_goes_with_it(manager, e2e_config) -> None:
    if manager.restorer.jail is None:
        pytest.skip("this host cannot jail VMMs (trenvx doctor says why)")
    policy = manager.restorer.jail
    a, b = await asyncio.gather(manager.create(), manager.create())
    try:
        st = status_of(a.pid)
        uid = int(st["Uid"].split()[0])
        assert all(int(x) == uid for x in st["Uid"].split()) and uid > policy.uid_base, st["Uid"]
        assert int(status_of(b.pid)["Uid"].split()[0]) not in (0, uid), "each VMM has its own uid"
        assert int(st["CapEff"], 16) == 0 and int(st["CapPrm"], 16) == 0, st
        assert st["NoNewPrivs"] == "1" and st["Seccomp"] == "2", st
        # its cgroup, with the template's limits
        mem_mb = a.build.machine.mem_mb
        dirs = cgroup_dirs(a.pid)
        if policy.cgroups is not None:
            if policy.cgroups.version == 1:
                assert dirs["memory"].name == f"vm-{a.id}", dirs
                limit = int((dirs["memory"] / "memory.limit_in_bytes").read_text())
                assert limit == (mem_mb + policy.memory_overhead_mb) << 20
                assert int((dirs["pids"] / "pids.max").read_text()) == policy.pids_max
            else:
                assert int((dirs[""] / "memory.max").read_text()) == (mem_mb + policy.memory_overhead_mb) << 20
        # its uid reads neither the other sandbox's files nor the server's state ...
        other = b.restored.workdir
        assert read_as(uid, other / "disk.qcow2") == "PermissionError"
        assert read_as(uid, other / "vm" / "console.log") == "PermissionError"
        state = sorted(p for p in Path(e2e_config.data_root, "run").rglob("*") if p.is_file())[:3]
        assert state, "the server's state directory is empty?"
        for p in state:
            assert read_as(uid, p) == "PermissionError", p
        # ... and its own files are its own
        assert read_as(uid, a.restored.workdir / "disk.qcow2") == "ok"
        # in its mount namespace, the rest of data_root is not even there
        if policy.mount_ns:
            assert visible_in_ns(a.pid, a.restored.workdir / "disk.qcow2")
            assert visible_in_ns(a.pid, a.build.snapshot.memory_file)
            assert not visible_in_ns(a.pid, other)
            assert not visible_in_ns(a.pid, Path(e2e_config.data_root, "run"))
        # the jailed VM works
        assert (await a.run("echo jailed")).stdout == b"jailed\n"
    finally:
        await asyncio.gather(manager.kill(a.id), manager.kill(b.id), return_exceptions=True)
    # the jail goes with the VMM: no cgroup, no claim of its uid, no file of its uid left
    for d in dirs.values():
        if f"vm-{a.id}" in str(d):
            assert not d.exists(), d
    assert not (CLAIMS_DIR / str(uid)).exists()
    assert not a.restored.workdir.exists()
