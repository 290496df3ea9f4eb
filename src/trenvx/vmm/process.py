"""Starting and reaping VMM processes: the one place that forks them.

Every VMM process has an owner (a :class:`VmmProcess`) that kills and reaps it. When
``kill_with_owner`` is set, the kernel also kills it if the owning process dies
(``PR_SET_PDEATHSIG``), so that a crashed test run or build leaves no VM behind.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class VmmProcess:
    """One child process of a VMM binary, with its output going to a log file."""

    def __init__(self, proc: asyncio.subprocess.Process, argv: Sequence[str], log_path: Path) -> None:
        self._proc = proc
        self.argv = list(argv)
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self._proc.pid

    @classmethod
    async def spawn(
        cls,
        argv: Sequence[str],
        log_path: Path,
        *,
        pass_fds: Sequence[int] = (),
        kill_with_owner: bool = True,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        preexec: Callable[[], None] | None = None,
        clean_env: bool = False,
    ) -> "VmmProcess":
        """Start ``argv`` with its output appended to ``log_path``.

        ``cwd`` is the process's working directory (Firecracker resolves the relative device
        paths recorded in a snapshot against it); default: ours. ``env`` is added to our environment
        (``clean_env``: it is the whole environment). ``preexec`` runs in the child before exec
        instead of the default (a jail's: it sets ``PR_SET_PDEATHSIG`` itself, after its uid switch).
        """
        if preexec is None:
            preexec = _die_with_parent if kill_with_owner else None
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as out:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=out,
                    stderr=asyncio.subprocess.STDOUT,
                    pass_fds=tuple(pass_fds),
                    start_new_session=True,
                    cwd=cwd,
                    env=dict(env or {}) if clean_env else {**os.environ, **env} if env else None,
                    preexec_fn=preexec,
                )
            except FileNotFoundError:
                raise FileNotFoundError(
                    f"{argv[0]} not found; run `scripts/start.sh setup` to install it"
                ) from None
            except subprocess.SubprocessError as e:  # the preexec failed: it wrote why into the log
                from .base import VmmError

                tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] if log_path.exists() else []
                raise VmmError(f"cannot start {argv[0]}: {tail[0] if tail else e} (log: {log_path})") from None
        (log_path.parent / "vmm.pid").write_text(str(proc.pid))
        return cls(proc, argv, log_path)

    def is_alive(self) -> bool:
        return self._proc.returncode is None

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    async def wait(self) -> int:
        return await self._proc.wait()

    async def kill(self, grace_s: float = 0.0) -> None:
        """End the process (SIGTERM with ``grace_s``, then SIGKILL) and reap it. Idempotent."""
        if self._proc.returncode is not None:
            return
        try:
            if grace_s > 0:
                self._proc.terminate()
                try:
                    await asyncio.wait_for(self._proc.wait(), grace_s)
                    return
                except asyncio.TimeoutError:
                    pass
            self._proc.kill()
        except ProcessLookupError:
            pass
        await self._proc.wait()

    def detach(self) -> None:
        """Give up ownership: the process keeps running after we exit (a restarted server adopts it).

        asyncio's subprocess transport kills a child that is still running when the transport is
        closed or garbage-collected (at loop or interpreter shutdown); marking it closed turns
        that into a no-op.
        """
        transport = getattr(self._proc, "_transport", None)
        if transport is not None and hasattr(transport, "_closed"):
            transport._closed = True

    def output_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def memory_of(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of a process in bytes; PSS counts shared pages divided among their users."""
    try:
        full = psutil.Process(pid).memory_full_info()
        return int(full.rss), int(getattr(full, "pss", full.rss))
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0, 0


TCG_CODE = "TCG code"
"""QEMU's TCG translation buffer (anonymous ``rwx``): private to each VM, absent under KVM."""
GUEST_RAM = "guest RAM"
VMM_FILES = "VMM binaries"
VMM_HEAP = "VMM heap"
VMM_OTHER = "VMM anon"


def memory_parts_of(pid: int, named_files: Mapping[Path, str] | None = None, ram_bytes: int = 0) -> dict[str, int]:
    """PSS of a VMM process in bytes, by part (``/proc/PID/smaps`` grouped by mapping).

    ``named_files`` names the mappings of given files (e.g. the template's memory file as
    :data:`GUEST_RAM`, its root image as "root image"); an anonymous mapping of at least
    ``ram_bytes`` is guest RAM held privately (a VM restored from a full snapshot); anonymous
    ``rwx`` mappings are TCG's translation buffer; other file mappings are the VMM's binary and
    libraries. Empty if the process is gone.
    """
    names = {str(k): v for k, v in (named_files or {}).items()}
    parts: dict[str, int] = {}
    part = VMM_OTHER
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                if fields and "-" in fields[0] and len(fields) >= 5 and not fields[0].endswith(":"):
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    path = fields[5].strip() if len(fields) == 6 else ""
                    if path in names:
                        part = names[path]
                    elif path == "[heap]":
                        part = VMM_HEAP
                    elif not path and fields[1] == "rwxp":
                        part = TCG_CODE
                    elif not path and ram_bytes and end - start >= ram_bytes:
                        part = GUEST_RAM
                    elif path.startswith("/"):
                        part = VMM_FILES
                    else:
                        part = VMM_OTHER
                elif fields and fields[0] == "Pss:":
                    parts[part] = parts.get(part, 0) + int(fields[1]) * 1024
    except OSError:
        return {}
    return parts


def cpu_seconds_of(pid: int) -> float:
    try:
        t = psutil.Process(pid).cpu_times()
        return float(t.user + t.system)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0.0


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _threads_of(pid: int) -> list[int]:
    """The thread ids of ``pid`` (none if it is gone)."""
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


def set_priority(pid: int, nice: int) -> None:
    """Set the scheduling priority of every thread of ``pid`` (Linux applies ``nice`` per thread).

    Pools make VMs at a low priority (a refill must not slow the creates it serves) and give a VM
    the normal priority back when a create takes it. Best effort: a thread that is gone is skipped.
    """
    for tid in _threads_of(pid):
        try:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
        except OSError:
            pass


def set_sched_idle(pid: int, idle: bool) -> None:
    """SCHED_IDLE (``idle``) or SCHED_OTHER for every thread of ``pid``: the fallback of a VMM
    without a cgroup of its own for running only when nothing else wants the CPU. Best effort."""
    policy = os.SCHED_IDLE if idle else os.SCHED_OTHER
    for tid in _threads_of(pid):
        try:
            os.sched_setscheduler(tid, policy, os.sched_param(0))
        except OSError:
            pass
