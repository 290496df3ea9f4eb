"""A cgroup per VMM process, on cgroup v2 or v1, with the limits of its template.

Where the groups go: under the server's OWN cgroup of each controller (``/proc/self/cgroup``),
in a parent ``trenvx-<owner>`` (``owner``: a short id of the server's data_root, so servers on one
host never touch each other's groups), one group ``vm-<name>`` per VMM::

    <server's cgroup>/trenvx-<owner>/vm-<sandbox id>/

- **v2** (one unified hierarchy, the norm on current distributions): ``memory.max``, ``pids.max``,
  ``cpu.weight``, ``cpu.idle``. The no-internal-processes rule forbids enabling controllers for
  children of a cgroup that holds processes (other than the root). When the server's cgroup
  holds only the server (e.g. a systemd unit with ``Delegate=yes``), the server moves itself
  into a leaf ``trenvx-server`` beside ``trenvx-<owner>`` and enables the controllers in its
  cgroup: that is the chosen layout. When other processes share the server's cgroup, no
  controller can be enabled below it: VMM groups are not made (logged once, best effort).
- **v1** (separate hierarchies per controller; "hybrid" hosts mount v2 without controllers
  beside them): ``memory.limit_in_bytes``, ``pids.max``, ``cpu.shares``, ``cpu.idle``, each in
  its controller's hierarchy. A controller whose hierarchy is missing is left out.

Everything is best effort: a host that does not allow a step gets a clear log line and VMMs run
without that limit. A group is removed when its VMM is reaped (:meth:`VmmCgroup.remove`); groups of
dead VMMs (a crash, a kill by a restarted server) are removed by :func:`sweep` at server start.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

CONTROLLERS = ("cpu", "memory", "pids")
PARENT_PREFIX = "trenvx-"
SERVER_LEAF = "trenvx-server"
VM_PREFIX = "vm-"
DEFAULT_WEIGHT = 100
"""cgroup v2's default ``cpu.weight`` (1..10000); v1's ``cpu.shares`` is 1024 for it."""
IDLE_WEIGHT = 1
REMOVE_RETRIES = 50


class CgroupError(OSError):
    """A cgroup could not be made, joined or limited; the message names the file and the reason."""


def weight_to_shares(weight: int) -> int:
    """cgroup v2's ``cpu.weight`` (1..10000, default 100) as v1's ``cpu.shares`` (2..262144, default 1024)."""
    return max(2, min(262144, weight * 1024 // DEFAULT_WEIGHT))


@dataclass(frozen=True)
class CgroupLimits:
    """What one VMM may use. 0: no limit."""

    memory_bytes: int = 0
    pids_max: int = 0
    cpu_weight: int = DEFAULT_WEIGHT


@dataclass(frozen=True)
class CgroupHost:
    """Where this server's VMM groups live: the cgroup version and, per controller, the parent
    directory ``trenvx-<owner>`` (v2: one directory for all controllers, keyed ``""``)."""

    version: int
    parents: dict[str, Path]
    controllers: frozenset[str]
    note: str = ""
    """What was left out and why (a controller missing, a v2 subtree that could not be delegated)."""

    def describe(self) -> str:
        ctl = ", ".join(sorted(self.controllers)) or "none"
        where = ", ".join(sorted({str(p) for p in self.parents.values()}))
        return f"cgroup v{self.version} ({ctl}) under {where}" + (f"; {self.note}" if self.note else "")

    def dirs_of(self, name: str) -> dict[str, Path]:
        """The directories of the VMM group ``name`` (per controller; v2: one, keyed ``""``)."""
        return {ctl: parent / f"{VM_PREFIX}{name}" for ctl, parent in self.parents.items()}

    def group(self, name: str) -> "VmmCgroup":
        return VmmCgroup(self, name, self.dirs_of(name))


# -- finding the hierarchies ------------------------------------------------------------------


@dataclass(frozen=True)
class _Mount:
    point: Path
    root: str
    fstype: str
    options: frozenset[str]


def _mounts(mountinfo: str) -> list[_Mount]:
    out = []
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, rfields = left.split(), right.split()
        if len(fields) < 5 or len(rfields) < 3 or rfields[0] not in ("cgroup", "cgroup2"):
            continue
        point = fields[4].replace("\\040", " ")
        out.append(_Mount(Path(point), fields[3], rfields[0], frozenset(rfields[2].split(","))))
    return out


def _own_paths(proc_cgroup: str) -> dict[str, str]:
    """``/proc/self/cgroup`` as controller -> path; the v2 line (``0::/path``) as key ``""``."""
    out: dict[str, str] = {}
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, ctls, path = parts
        if ctls == "":
            out[""] = path
        for c in ctls.split(","):
            if c:
                out[c] = path
    return out


def _under(mount: _Mount, path: str) -> Path:
    rel = path
    if mount.root != "/" and (path == mount.root or path.startswith(mount.root.rstrip("/") + "/")):
        rel = path[len(mount.root):]
    return mount.point / rel.lstrip("/")


def detect(owner: str, *, proc_cgroup: str | None = None, mountinfo: str | None = None,
           prepare: bool = True) -> tuple[CgroupHost | None, str]:
    """Where this server's VMM groups go, or (None, why not). ``proc_cgroup`` and ``mountinfo``
    default to this process's (tests pass texts naming a fake tree). ``prepare`` makes the parent
    directories (and on v2 the server's leaf and the delegated controllers)."""
    if proc_cgroup is None:
        proc_cgroup = Path("/proc/self/cgroup").read_text()
    if mountinfo is None:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    mounts, own = _mounts(mountinfo), _own_paths(proc_cgroup)
    v1 = {c: m for m in mounts if m.fstype == "cgroup" for c in CONTROLLERS if c in m.options}
    v2 = next((m for m in mounts if m.fstype == "cgroup2"), None)
    v2_controllers: set[str] = set()
    if v2 is not None and "" in own:
        try:
            v2_controllers = set((_under(v2, own[""]) / "cgroup.controllers").read_text().split())
        except OSError:
            v2_controllers = set()
    parent_name = f"{PARENT_PREFIX}{owner}"
    if v2 is not None and v2_controllers & set(CONTROLLERS) and not v1:
        return _prepare_v2(_under(v2, own[""]), parent_name, v2_controllers & set(CONTROLLERS), prepare)
    if v1:
        parents, missing = {}, []
        for ctl in CONTROLLERS:
            m = v1.get(ctl)
            if m is None or ctl not in own:
                missing.append(ctl)
                continue
            parents[ctl] = _under(m, own[ctl]) / parent_name
        if not parents:
            return None, "no cgroup v1 hierarchy of cpu, memory or pids is mounted"
        note = f"no v1 hierarchy of {', '.join(missing)}" if missing else ""
        host = CgroupHost(1, parents, frozenset(parents), note)
        if prepare:
            for ctl, p in list(parents.items()):
                try:
                    p.mkdir(exist_ok=True)
                except OSError as e:
                    return None, f"cannot make {p}: {e.strerror}"
        return host, ""
    if v2 is not None:
        return None, "cgroup v2 is mounted but enables none of cpu, memory, pids for this process's cgroup"
    return None, "no cgroup hierarchy is mounted (/sys/fs/cgroup)"


def _prepare_v2(base: Path, parent_name: str, controllers: set[str], prepare: bool) -> tuple[CgroupHost | None, str]:
    parent = base / parent_name
    host = CgroupHost(2, {"": parent}, frozenset(controllers))
    if not prepare:
        return host, ""
    want = " ".join(f"+{c}" for c in sorted(controllers))
    try:
        _enable(base, want)
    except OSError as e:
        if e.errno != errno.EBUSY:
            return None, f"cannot enable {want} in {base}/cgroup.subtree_control: {e.strerror}"
        # No internal processes: move this server into a leaf of its own, then enable.
        others = _procs(base) - {os.getpid()}
        if others:
            return None, (f"{base} holds other processes ({len(others)}) besides this server, so cgroup v2 cannot "
                          f"enable controllers for VMM groups below it; run the server in a cgroup of its own "
                          f"(e.g. a systemd unit with Delegate=yes)")
        leaf = base / SERVER_LEAF
        try:
            leaf.mkdir(exist_ok=True)
            (leaf / "cgroup.procs").write_text(str(os.getpid()))
            _enable(base, want)
        except OSError as e2:
            return None, f"cannot move the server into {leaf} and enable {want} in {base}: {e2.strerror}"
        log.info("cgroup v2: moved the server into %s so that VMM groups can have controllers", leaf)
    try:
        parent.mkdir(exist_ok=True)
        _enable(parent, want)
    except OSError as e:
        return None, f"cannot make {parent} with {want}: {e.strerror}"
    return host, ""


def _enable(cgroup: Path, want: str) -> None:
    (cgroup / "cgroup.subtree_control").write_text(want)


def _procs(cgroup: Path) -> set[int]:
    try:
        return {int(x) for x in (cgroup / "cgroup.procs").read_text().split()}
    except (OSError, ValueError):
        return set()


# -- one VMM's group --------------------------------------------------------------------------


@dataclass
class VmmCgroup:
    """The cgroup(s) of one VMM process: one directory on v2, one per controller on v1."""

    host: CgroupHost
    name: str
    dirs: dict[str, Path] = field(default_factory=dict)
    limits: CgroupLimits = CgroupLimits()

    @classmethod
    def create(cls, host: CgroupHost, name: str, limits: CgroupLimits, *, idle: bool = False) -> "VmmCgroup":
        """Make the group ``name`` with ``limits`` (an existing one of that name, a leftover, is reused)."""
        group = cls(host, name, host.dirs_of(name), limits)
        for d in group.dirs.values():
            try:
                if not d.parent.is_dir():  # released when a server of this data_root stopped
                    d.parent.mkdir()
                    if host.version == 2:
                        _enable(d.parent, " ".join(f"+{c}" for c in sorted(host.controllers)))
                d.mkdir(exist_ok=True)
            except OSError as e:
                raise CgroupError(e.errno, f"cannot make cgroup {d}: {e.strerror}") from None
        group._limit()
        if idle:
            group.set_idle(True)
        return group

    def _file(self, ctl: str, v1_name: str, v2_name: str) -> Path | None:
        if self.host.version == 2:
            return self.dirs[""] / v2_name if ctl in self.host.controllers else None
        d = self.dirs.get(ctl)
        return d / v1_name if d is not None else None

    def _write(self, path: Path | None, value: str, *, required: bool = True) -> bool:
        if path is None:
            return False
        try:
            path.write_text(value)
            return True
        except OSError as e:
            if not required:
                return False
            raise CgroupError(e.errno, f"cannot write {value!r} to {path}: {e.strerror}") from None

    def _limit(self) -> None:
        lim = self.limits
        if lim.memory_bytes:
            self._write(self._file("memory", "memory.limit_in_bytes", "memory.max"), str(lim.memory_bytes))
            # v2: no swap beyond the limit either (a VM's RAM swapped out stalls it, not the host)
            if self.host.version == 2:
                self._write(self._file("memory", "", "memory.swap.max"), "0", required=False)
        if lim.pids_max:
            self._write(self._file("pids", "pids.max", "pids.max"), str(lim.pids_max))
        self.set_weight(lim.cpu_weight)

    def procs_files(self) -> list[Path]:
        """The ``cgroup.procs`` file of each directory: writing a pid there moves the process in."""
        return [d / "cgroup.procs" for d in self.dirs.values()]

    def add(self, pid: int) -> None:
        for f in self.procs_files():
            self._write(f, str(pid))

    def set_weight(self, weight: int) -> None:
        if self.host.version == 2:
            self._write(self._file("cpu", "", "cpu.weight"), str(max(1, min(10000, weight))))
        else:
            self._write(self._file("cpu", "cpu.shares", ""), str(weight_to_shares(weight)))

    def set_idle(self, idle: bool) -> str:
        """Make the group run only when nothing else wants the CPU (``cpu.idle``: SCHED_IDLE for a
        group), or the lowest weight where the kernel has no ``cpu.idle``; ``False`` gives the
        template's weight back. Returns how (``"cpu.idle"``, ``"weight"``, ``""``: no cpu controller)."""
        f = self._file("cpu", "cpu.idle", "cpu.idle")
        if f is None:
            return ""
        if f.exists() and self._write(f, "1" if idle else "0", required=False):
            # An idle group has no weight: the kernel refuses cpu.shares/cpu.weight while cpu.idle
            # is 1 (EINVAL), and gives the group's weight back when it is 0.
            if not idle:
                self.set_weight(self.limits.cpu_weight)
            return "cpu.idle"
        self.set_weight(IDLE_WEIGHT if idle else self.limits.cpu_weight)
        return "weight"

    def pids(self) -> set[int]:
        out: set[int] = set()
        for d in self.dirs.values():
            out |= _procs(d)
        return out

    def exists(self) -> bool:
        return any(d.is_dir() for d in self.dirs.values())

    def remove(self, *, wait_s: float = 2.0) -> bool:
        """Remove the group (its processes must be gone: a reaped VMM can take a moment to leave
        it). True when nothing of it is left."""
        deadline = time.monotonic() + wait_s
        left = False
        for d in self.dirs.values():
            while True:
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno == errno.EBUSY and time.monotonic() < deadline:
                        time.sleep(0.02)
                        continue
                    log.warning("cannot remove cgroup %s: %s", d, e.strerror)
                    left = True
                    break
        return not left


def groups(host: CgroupHost) -> list[VmmCgroup]:
    """Every VMM group under this server's parent(s)."""
    names: set[str] = set()
    for parent in host.parents.values():
        try:
            names |= {p.name[len(VM_PREFIX):] for p in parent.iterdir() if p.is_dir() and p.name.startswith(VM_PREFIX)}
        except OSError:
            continue
    return [host.group(n) for n in sorted(names)]


def leftovers(host: CgroupHost) -> list[VmmCgroup]:
    """VMM groups with no process in them: their VMM is gone."""
    return [g for g in groups(host) if not g.pids()]


def sweep(host: CgroupHost, keep: set[str] | frozenset[str] = frozenset(), *, min_age_s: float = 30.0) -> list[str]:
    """Remove the groups of VMMs that are gone (except the names in ``keep``, and groups younger
    than ``min_age_s``: a VMM being started joins its group a moment after it is made); their names."""
    removed = []
    now = time.time()
    for g in leftovers(host):
        if g.name in keep:
            continue
        try:
            if now - min(d.stat().st_mtime for d in g.dirs.values() if d.exists()) < min_age_s:
                continue
        except (OSError, ValueError):
            continue
        if g.remove(wait_s=0):
            removed.append(g.name)
    return removed


def release_parents(host: CgroupHost) -> list[Path]:
    """Remove this server's parent group(s) ``trenvx-<owner>`` if no VMM group is left in them (a
    stopping server: every test server, with a data_root of its own, left one per controller);
    those removed. One that still holds groups (VMMs left running with ``--keep``) stays."""
    removed = []
    for parent in set(host.parents.values()):
        try:
            parent.rmdir()
            removed.append(parent)
        except FileNotFoundError:
            continue
        except OSError as e:
            if e.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                log.warning("cannot remove cgroup %s: %s", parent, e.strerror)
    return removed


def release(host: CgroupHost) -> list[Path]:
    """What a stopping server does: remove the groups of its VMMs that are gone, whatever their age
    (none is being started any more; a server killed mid-run, or a VMM killed with it, left them),
    then its parents if nothing is left in them. The parents removed."""
    sweep(host, min_age_s=0)
    return release_parents(host)


def group_of_pid(host: CgroupHost, pid: int, *, proc: Path = Path("/proc")) -> VmmCgroup | None:
    """The VMM group process ``pid`` is in, if it is one of ours (by the name in its cgroup path)."""
    try:
        text = (proc / str(pid) / "cgroup").read_text()
    except OSError:
        return None
    for path in _own_paths(text).values():
        leaf = path.rstrip("/").rsplit("/", 1)[-1]
        parent = path.rstrip("/").rsplit("/", 2)[-2] if path.count("/") >= 2 else ""
        if leaf.startswith(VM_PREFIX) and parent.startswith(PARENT_PREFIX):
            g = host.group(leaf[len(VM_PREFIX):])
            if g.exists():
                return g
    return None


__all__ = [
    "CgroupError", "CgroupHost", "CgroupLimits", "VmmCgroup", "detect", "group_of_pid", "groups", "leftovers",
    "sweep", "weight_to_shares",
]
