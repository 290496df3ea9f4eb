"""The orphan watchdog's pass, the inflight files and the server lock's wait, with stand-in
processes (``sleep`` with a sandbox id in its command line) in place of VMMs."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trenvx.layout import DataRoot
from trenvx.sandbox import inflight
from trenvx.sandbox.orphan_watchdog import TIMEOUT_REASON, Pass, Watch
from trenvx.sandbox.state import EXITED, RUNNING, SandboxRecord, StateStore
from trenvx.server.runner import ServerError, acquire_lock


def stand_in(sandbox_id: str) -> subprocess.Popen:
    """A process whose command line names ``sandbox_id``, as a VMM's does."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", f"trenvx-{sandbox_id}"])


def record(root: DataRoot, proc: subprocess.Popen, sid: str, end_at: float, **kw) -> SandboxRecord:
    import psutil

    workdir = root.sandbox_dir(sid)
    (workdir / "vm").mkdir(parents=True)
    (workdir / "vm" / "vmm.pid").write_text(str(proc.pid))
    return SandboxRecord(id=sid, template="t", build_id="b", build_path="/nowhere", pid=proc.pid,
                         pid_started_at=psutil.Process(proc.pid).create_time(), agent_port=0, access_token="x",
                         workdir=str(workdir), created_at=time.time(), end_at=end_at, vcpu=1, mem_mb=1, disk_mb=1, **kw)


def test_a_pass_ends_expired_sandboxes_only(tmp_path: Path) -> None:
    root = DataRoot(tmp_path).ensure()
    procs = {sid: stand_in(sid) for sid in ("expired", "running", "autopause")}
    try:
        store = StateStore(root.run / "state.sqlite")
        store.put(record(root, procs["expired"], "expired", time.time() - 1))
        store.put(record(root, procs["running"], "running", time.time() + 60))
        store.put(record(root, procs["autopause"], "autopause", time.time() - 1, lifecycle={"auto_pause": True}))
        store.close()
        p = Pass(Watch(root, server_pid=1, server_started_at=0.0))
        left = p.run()
        p.close()
        assert p.ended == ["expired"] and left == 2
        assert procs["expired"].wait(5) == -9
        assert procs["running"].poll() is None and procs["autopause"].poll() is None
        assert not root.sandbox_dir("expired").exists() and root.sandbox_dir("running").exists()
        store = StateStore(root.run / "state.sqlite")
        rec = store.get("expired")
        assert rec is not None and rec.state == EXITED and rec.end_reason == TIMEOUT_REASON
        assert store.get("running").state == RUNNING  # type: ignore[union-attr]
        store.close()
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()


def test_a_vm_a_dead_process_was_making_is_ended(tmp_path: Path) -> None:
    root = DataRoot(tmp_path).ensure()
    proc = stand_in("halfmade")
    try:
        (root.sandbox_dir("halfmade") / "vm").mkdir(parents=True)
        (root.sandbox_dir("halfmade") / "vm" / "vmm.pid").write_text(str(proc.pid))
        inflight.mark(root.run, "halfmade")
        assert inflight.stale(root.run) == []  # its maker (this process) lives
        # as if written by a process that is gone
        (root.run / "inflight" / "halfmade").write_text('{"pid": 999999999, "started_at": 0}')
        assert inflight.stale(root.run) == ["halfmade"]
        assert inflight.reap_stale(root, lambda sid: None) == ["halfmade"]
        assert proc.wait(5) == -9
        assert not root.sandbox_dir("halfmade").exists() and inflight.stale(root.run) == []
    finally:
        proc.kill()
        proc.wait()


def test_a_recorded_sandbox_is_not_reaped_as_half_made(tmp_path: Path) -> None:
    root = DataRoot(tmp_path).ensure()
    proc = stand_in("recorded")
    try:
        (root.sandbox_dir("recorded") / "vm").mkdir(parents=True)
        (root.sandbox_dir("recorded") / "vm" / "vmm.pid").write_text(str(proc.pid))
        (root.run / "inflight").mkdir()
        (root.run / "inflight" / "recorded").write_text('{"pid": 999999999, "started_at": 0}')
        assert inflight.reap_stale(root, lambda sid: "running") == []
        assert proc.poll() is None and root.sandbox_dir("recorded").exists()
        assert inflight.stale(root.run) == []
    finally:
        proc.kill()
        proc.wait()


def test_the_server_waits_for_a_lock_held_by_no_live_server(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "server.lock").write_text("999999999\n")  # a dead server's pid
    fd = os.open(run / "server.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # the watchdog's pass
    t0 = time.monotonic()
    with pytest.raises(ServerError, match="stayed locked"):
        acquire_lock(run, wait_s=0.3)
    assert time.monotonic() - t0 >= 0.3
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
    lock = acquire_lock(run, wait_s=0.3)
    lock.release()


def test_a_live_server_is_refused_at_once(tmp_path: Path) -> None:
    lock = acquire_lock(tmp_path / "run")
    t0 = time.monotonic()
    with pytest.raises(ServerError, match="already running"):
        acquire_lock(tmp_path / "run", wait_s=5)
    assert time.monotonic() - t0 < 1
    lock.release()
