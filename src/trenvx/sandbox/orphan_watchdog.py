"""The orphan watchdog: sandboxes of a server that died without a successor still end at their timeouts.

A sandbox's VMM outlives a server that crashes, is SIGKILLed or OOM-killed (the next server
adopts it, see :mod:`.manager`). If no server comes back, nothing would ever end it. So ``trenvx
serve`` starts this small process (``python -m trenvx.sandbox.orphan_watchdog``) once it holds
``data_root/run/server.lock``: detached (a session of its own, no death signal, the lock's file
descriptor not inherited), one per server run.

- While the server lives, it sleeps on a pidfd of the server's process: no CPU, no polling.
- Once the server is gone, every :data:`PASS_INTERVAL_S` it takes the lock without waiting, makes
  one pass over the server's state store and releases it; a pass does a few kills and removals
  (bounded by :data:`PASS_BUDGET_S`), and a server starting meanwhile waits for the lock (see
  :func:`trenvx.server.runner.acquire_lock`) instead of failing.
- A pass ends, as the server would have: the VMs the dead server was still making (creates,
  resumes, pool refills: :mod:`.inflight`) and its pooled VMs, at once (they belong to nobody);
  every running sandbox whose recorded ``end_at`` has passed (its VMM is killed, its record says
  ``timeout: ...while no server was running``, its directory and network slot are removed). A
  sandbox whose lifecycle says auto-pause is left running past its timeout: killing it would lose
  the state its owner asked to keep, and the next server pauses it at its first reaper pass.
- It exits when no sandbox VM is left to watch (the dead VMs' records are then marked
  ``died_while_down`` and their files removed), or when a live server holds the lock (that server
  adopts the sandboxes and runs its own watchdog).

It never ends a sandbox a live server owns: it acts only while it holds the lock, which a server
holds for its whole life, and it first waits for its own server to be gone.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import logging
import os
import select
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from ..layout import DataRoot
from . import inflight
from .state import PAUSED, StateStore

log = logging.getLogger("trenvx.orphan_watchdog")

PASS_INTERVAL_S = 1.0
"""How often a watchdog whose server is gone looks at the sandboxes (and whether a server is back)."""
PASS_BUDGET_S = 3.0
"""A pass stops ending sandboxes after this long and releases the lock (the rest wait for the next pass)."""
LOCK_NAME = "server.lock"
STATE_NAME = "state.sqlite"
SLOT_FILE = "net-slot"
TIMEOUT_REASON = "timeout: ended by the orphan watchdog while no server was running"


@dataclass
class Watch:
    """What one watchdog watches: a server's process and data_root."""

    data_root: DataRoot
    server_pid: int
    server_started_at: float
    slot_cidr: str = ""
    """The server's ``[network] slot_cidr`` when its sandboxes run in network slots (empty: user networking)."""


# -- waiting for the server to be gone --------------------------------------------------------------


def wait_for_exit(pid: int, started_at: float) -> None:
    """Return once process ``pid`` (started at ``started_at``) is gone."""
    try:
        p = psutil.Process(pid)
        if abs(p.create_time() - started_at) > 1.0:
            return  # its pid is another process's already
        fd = os.pidfd_open(pid)
    except (psutil.Error, ProcessLookupError):
        return
    try:
        select.select([fd], [], [])  # readable when the process ends
    finally:
        os.close(fd)


# -- the lock ---------------------------------------------------------------------------------------


def _pid_in(lock_file: Path) -> int:
    try:
        text = lock_file.read_text().strip()
        return int(text) if text.isdigit() else 0
    except OSError:
        return 0


def try_lock(lock_file: Path) -> int | None:
    """The lock's file descriptor, held; None if someone holds it."""
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return None
        raise
    return fd


def unlock(fd: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def another_server_runs(watch: Watch) -> bool:
    """The lock is held and the file names a live process other than our server: a new server."""
    pid = _pid_in(watch.data_root.run / LOCK_NAME)
    return pid not in (0, watch.server_pid) and psutil.pid_exists(pid)


# -- one pass ---------------------------------------------------------------------------------------


def _our_vmm(pid: int, started_at: float, sandbox_id: str) -> psutil.Process | None:
    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE or abs(p.create_time() - started_at) > 1.0:
            return None
        return p if any(sandbox_id in arg for arg in p.cmdline()) else None
    except psutil.Error:
        return None


class Pass:
    """One look at the sandboxes of a dead server, the lock held."""

    def __init__(self, watch: Watch) -> None:
        self.watch = watch
        self.store = StateStore(watch.data_root.run / STATE_NAME)
        self.deadline = time.monotonic() + PASS_BUDGET_S
        self.ended: list[str] = []

    def close(self) -> None:
        self.store.close()

    def run(self, *, final: bool = False) -> int:
        """End what is due; the number of sandbox VMs still to watch. ``final``: also record the
        ones whose VMM died (the next server would; none is coming back while we hold the lock)."""
        root = self.watch.data_root
        for sid in inflight.reap_stale(root, self._state_of, self._release_slot):
            log.warning("sandbox %s was being made when its server died: its VM and files were removed", sid)
        self._reap_pooled()
        left = 0
        now = time.time()
        for rec in self.store.running():
            if time.monotonic() > self.deadline:
                left += 1
                continue
            proc = _our_vmm(rec.pid, rec.pid_started_at, rec.id)
            if proc is None:
                if final:
                    self._remove(rec.id, Path(rec.workdir), "died_while_down")
                    log.info("sandbox %s: its VM exited while no server was running; its files were removed", rec.id)
                continue
            auto_pause = bool((rec.lifecycle or {}).get("auto_pause"))
            if rec.end_at > now or auto_pause or rec.state == PAUSED:
                left += 1
                continue
            inflight.end_process(proc)
            self._remove(rec.id, Path(rec.workdir), TIMEOUT_REASON)
            self.ended.append(rec.id)
            log.warning("sandbox %s: its timeout passed %.1f s ago while no server was running; its VM was ended "
                        "and its files removed", rec.id, now - rec.end_at)
        return left

    def _state_of(self, sandbox_id: str) -> str | None:
        rec = self.store.get(sandbox_id)
        return None if rec is None else (PAUSED if rec.pause else rec.state)

    def _remove(self, sandbox_id: str, workdir: Path, reason: str) -> None:
        self.store.mark_ended(sandbox_id, reason, time.time())
        self._release_slot(workdir)
        shutil.rmtree(workdir, ignore_errors=True)

    def _reap_pooled(self) -> None:
        for d, pid, started in inflight.pooled_vms(self.watch.data_root.sandboxes):
            proc = _our_vmm(pid, started, d.name) if pid else None
            if proc is not None:
                inflight.end_process(proc)
            self._release_slot(d)
            shutil.rmtree(d, ignore_errors=True)
            log.info("pooled VM %s of the dead server was ended", d.name)

    def _release_slot(self, workdir: Path) -> None:
        """Remove the network slot whose number the sandbox's directory holds (namespace, veth, claim)."""
        if not self.watch.slot_cidr:
            return
        try:
            index = int((workdir / SLOT_FILE).read_text().strip())
        except (OSError, ValueError):
            return
        import asyncio

        from ..config import NetworkConfig
        from ..network.slot import HostNetwork, NetworkSlot, SlotAddress

        cfg = NetworkConfig(slot_cidr=self.watch.slot_cidr)
        net = HostNetwork(cfg, self.watch.data_root.root, outlive_process=True)
        try:
            asyncio.run(net.release(NetworkSlot(SlotAddress.of(index, cfg.slot_cidr))))
        except Exception as e:  # noqa: BLE001 - the next server's sweep removes it
            log.warning("could not remove network slot %d: %s", index, e)


def drop_network_leftovers(watch: Watch) -> None:
    """Once no sandbox of the dead server is left: the slots it had made ahead (its slot pool) and
    any other slot its owner's dead processes claimed, then its host nftables table."""
    if not watch.slot_cidr:
        return
    import asyncio

    from ..config import NetworkConfig
    from ..network import nft
    from ..network.slot import CLAIMS_DIR, HostNetwork, NetworkSlot, SlotAddress, owner_id

    owner = owner_id(watch.data_root.root)
    cfg = NetworkConfig(slot_cidr=watch.slot_cidr)
    net = HostNetwork(cfg, watch.data_root.root, outlive_process=True)
    with contextlib.suppress(OSError):
        for p in list(CLAIMS_DIR.iterdir()):
            with contextlib.suppress(OSError, ValueError, AttributeError):
                info = json.loads(p.read_text())
                if info.get("owner") != owner or psutil.pid_exists(int(info.get("pid", 0))):
                    continue
                try:
                    asyncio.run(net.release(NetworkSlot(SlotAddress.of(int(p.name), cfg.slot_cidr))))
                except Exception as e:  # noqa: BLE001 - the next server's sweep removes it
                    log.warning("could not remove network slot %s: %s", p.name, e)
    with contextlib.suppress(Exception):
        nft.run(f"delete table inet trenvx_{owner}_{watch.server_pid}\n")


# -- the process ------------------------------------------------------------------------------------


def run(watch: Watch) -> int:
    """Watch until nothing is left or a server takes over; the sandboxes this watchdog ended."""
    wait_for_exit(watch.server_pid, watch.server_started_at)
    log.info("orphan watchdog: server pid %d is gone; watching its sandboxes until their timeouts or a new "
             "server", watch.server_pid)
    lock_file = watch.data_root.run / LOCK_NAME
    ended = 0
    while True:
        fd = try_lock(lock_file)
        if fd is None:
            if another_server_runs(watch):
                log.info("orphan watchdog: a new server (pid %d) holds the lock and adopts the sandboxes; "
                         "exiting", _pid_in(lock_file))
                return ended
        else:
            try:
                p = Pass(watch)
                try:
                    left = p.run()
                    ended += len(p.ended)
                    if left == 0:
                        p.run(final=True)
                finally:
                    p.close()
            finally:
                unlock(fd)
            if left == 0:
                drop_network_leftovers(watch)
                log.info("orphan watchdog: no sandbox of server pid %d is left running (%d ended at their "
                         "timeouts); exiting", watch.server_pid, ended)
                return ended
        time.sleep(PASS_INTERVAL_S)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trenvx.sandbox.orphan_watchdog", description=__doc__.split("\n")[0])
    ap.add_argument("--data-root", required=True, type=Path)
    ap.add_argument("--server-pid", required=True, type=int)
    ap.add_argument("--server-started-at", required=True, type=float)
    ap.add_argument("--slot-cidr", default="")
    ap.add_argument("--log-file", type=Path)
    args = ap.parse_args(argv)
    handler: logging.Handler = logging.FileHandler(args.log_file) if args.log_file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s[%(process)d]: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    watch = Watch(DataRoot(args.data_root), args.server_pid, args.server_started_at, args.slot_cidr)
    try:
        run(watch)
    except Exception:  # noqa: BLE001 - said in the server's log
        log.exception("orphan watchdog of server pid %d failed", args.server_pid)
        return 1
    return 0


def start(data_root: DataRoot, *, slot_cidr: str = "", log_file: Path | None = None) -> int:
    """Start the watchdog of this process (the server) in the background; its pid."""
    import subprocess

    me = os.getpid()
    argv = [sys.executable, "-m", "trenvx.sandbox.orphan_watchdog", "--data-root", str(data_root.root),
            "--server-pid", str(me), "--server-started-at", repr(psutil.Process(me).create_time())]
    if slot_cidr:
        argv += ["--slot-cidr", slot_cidr]
    if log_file is not None:
        argv += ["--log-file", str(log_file)]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, close_fds=True)
    return proc.pid


if __name__ == "__main__":
    sys.exit(main())
