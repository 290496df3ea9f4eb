"""The jailed VMM: what a sandbox's QEMU process runs with, so that a guest that breaks out of
QEMU finds itself in a box.

Each VMM process of a sandbox gets, in the child between fork and exec (:meth:`VmmJail.preexec`,
all in one place so the order is right):

1. its cgroup (:mod:`.cgroups`: memory = the template's RAM + ``[jail] memory_overhead_mb``,
   ``pids_max``, a CPU weight; a pool's VM runs at idle weight until a create takes it);
2. the sandbox's network namespace (``setns``; the server no longer needs ``nsenter``), in which
   the slot's tap is opened as root and handed to QEMU as a file descriptor (``-netdev tap,fd=N``):
   QEMU needs no access to ``/dev/net/tun`` and no ownership of the tap;
3. a mount namespace in which ``data_root`` is an empty tmpfs with only the VM's own files bound
   back at their own paths: its sandbox directory (read-write) and the directories of the files it
   maps or reads (template or snapshot memory file, the disk's backing chain, the virtio-pmem
   image, the preload library), read-only. Other sandboxes' directories, the server's state
   (``data_root/run``), other templates and snapshots are not there. Paths given later over QMP
   (the disk switch of a checkpoint: ``top-N.qcow2`` in the VM's own directory) are inside the
   bound directory, so they resolve as outside;
4. its own uid and gid (``[jail] uid_base`` + a free index, claimed host-wide under
   ``/run/trenvx/jail/uids``; no passwd entry), the jail group (``uid_base``, read access to
   shared template files) as its only supplementary group (plus ``/dev/kvm``'s group under KVM):
   switching to a non-root uid clears every capability;
5. ``PR_SET_NO_NEW_PRIVS``, and ``PR_SET_PDEATHSIG`` AFTER the uid switch (which clears it);
6. QEMU's own seccomp policy: ``-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny``;
7. an environment of its own (PATH, LD_PRELOAD): nothing of the server's environment (API keys).

Outside the namespace, plain permissions say the same: the sandbox directory is owned by the
VM's uid, mode 0700; ``data_root/run`` is root's, 0700; shared files the VM maps are made
readable by the jail group (never writable); a released uid's directory goes back to root.

Template builds are NOT jailed (their VMM writes the template's memory file and image, made by
the server as root); only the VMMs of sandboxes (and pools) are.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import random
import signal
import stat
import struct
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import cgroups
from ..config import Config
from .cgroups import CgroupHost, CgroupLimits, VmmCgroup
from .qemu_img import backing_chain

log = logging.getLogger(__name__)

SANDBOX_FLAGS = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
"""QEMU's ``-sandbox``: its seccomp filter, denying obsolete calls, setuid & co., fork/exec, and
scheduler/affinity changes."""
CLAIMS_DIR = Path("/run/trenvx/jail/uids")
CLAIM_GRACE_S = 120.0
"""A claim without a process of its uid is stale only after this long (its VMM may be starting)."""
ENV_KEEP = ("PATH", "LANG", "LC_ALL", "TZ")

_CLONE_NEWNS = 0x00020000
_CLONE_NEWNET = 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 32, 4096, 16384, 1 << 18
_PR_SET_PDEATHSIG, _PR_SET_NO_NEW_PRIVS = 1, 38
_TUNSETIFF = 0x400454CA
_IFF_TAP, _IFF_NO_PI, _IFF_VNET_HDR = 0x0002, 0x1000, 0x4000

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]


class JailError(OSError):
    """A step of the jail failed; the message names the step and the reason."""


# -- what the host allows -------------------------------------------------------------------------


@dataclass(frozen=True)
class JailHost:
    """Which pieces of the jail this host allows (for ``trenvx doctor`` and ``enabled = "auto"``)."""

    uid_switch: tuple[bool, str]
    mount_ns: tuple[bool, str]
    cgroups: tuple[CgroupHost | None, str]
    seccomp: tuple[bool, str]

    def rows(self) -> list[tuple[str, bool, str]]:
        cg, why = self.cgroups
        return [
            ("jail: own uid", *self.uid_switch),
            ("jail: mount namespace", *self.mount_ns),
            ("jail: cgroup", cg is not None, cg.describe() if cg is not None else why),
            ("jail: seccomp (-sandbox)", *self.seccomp),
        ]


def probe_uid_switch() -> tuple[bool, str]:
    if os.geteuid() != 0:
        return False, "the server does not run as root: VMMs run as its own user (no per-VM uid)"
    return True, "root: each VMM gets its own uid and gid, and no capabilities"


def probe_mount_ns() -> tuple[bool, str]:
    """Whether a child can make a mount namespace (a container may forbid ``unshare``)."""
    try:
        r = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True,
                           text=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as e:
        return False, f"cannot run unshare(1): {e}"
    if r.returncode != 0:
        return False, f"unshare --mount failed: {r.stderr.strip() or r.returncode}: other sandboxes' files are hidden by permissions only"
    return True, "a VMM sees only its own sandbox's files under data_root"


@functools.lru_cache(maxsize=8)
def probe_seccomp(qemu_binary: str) -> tuple[bool, str]:
    """Whether ``qemu_binary`` takes ``-sandbox`` (QEMU built with libseccomp)."""
    try:
        r = subprocess.run([qemu_binary, "-sandbox", SANDBOX_FLAGS, "-version"], capture_output=True, text=True,
                           timeout=20)
    except (OSError, subprocess.SubprocessError) as e:
        return False, f"cannot run {qemu_binary}: {e}"
    if r.returncode != 0:
        return False, f"{qemu_binary} refuses -sandbox (built without seccomp?): {(r.stderr or r.stdout).strip()[:200]}"
    return True, f"-sandbox {SANDBOX_FLAGS}"


def probe_host(owner: str, qemu_binary: str, *, prepare: bool = False) -> JailHost:
    return JailHost(probe_uid_switch(), probe_mount_ns(), cgroups.detect(owner, prepare=prepare),
                    probe_seccomp(qemu_binary))


def owner_of(data_root: Path) -> str:
    """A short stable id of a server's data_root (the name of its cgroup parent)."""
    return hashlib.sha256(str(Path(data_root).resolve()).encode()).hexdigest()[:10]


_policies: dict[tuple[object, ...], "JailPolicy | None"] = {}


def policy_for(config: Config) -> "JailPolicy | None":
    """This server's jail policy from ``[jail]`` and what the host allows (probed once per
    data_root); None: VMMs run unjailed (``enabled = false``, or ``auto`` on a host that cannot
    switch uids). Each piece the host refuses is logged once."""
    cfg = config.jail
    key = (str(config.data_root), config.vmm.qemu_binary, cfg)
    if key in _policies:
        return _policies[key]
    policy: JailPolicy | None = None
    if cfg.enabled is not False:
        ok, why = probe_uid_switch()
        if not ok:
            if cfg.enabled is True:
                raise JailError(0, f"[jail] enabled = true, but {why}; run the server as root or set enabled = \"auto\"")
            log.info("jail: VMMs are not jailed: %s", why)
        else:
            cg, cg_why = cgroups.detect(owner_of(config.data_root))
            if cg is None:
                log.warning("jail: VMMs run without cgroups (no memory, pids or CPU limits per VM): %s", cg_why)
            elif cg.note:
                log.info("jail: %s", cg.describe())
            mnt, mnt_why = probe_mount_ns() if cfg.mount_namespace else (False, "[jail] mount_namespace = false")
            if not mnt:
                log.warning("jail: no mount namespace per VMM (%s): other sandboxes' files are hidden by "
                            "permissions only", mnt_why)
            sec, sec_why = probe_seccomp(config.vmm.qemu_binary)
            if not sec:
                log.warning("jail: QEMU runs without its seccomp policy: %s", sec_why)
            policy = JailPolicy(
                data_root=config.data_root, uid_base=cfg.uid_base, uid_count=cfg.uid_count,
                memory_overhead_mb=cfg.memory_overhead_mb, pids_max=cfg.pids_max, cpu_weight=cfg.cpu_weight,
                mount_ns=mnt, seccomp=sec, cgroups=cg,
            )
            policy.ensure_layout()
    _policies[key] = policy
    return policy


# -- the policy of one server -------------------------------------------------------------------


@dataclass(frozen=True)
class JailPolicy:
    """How this server jails its sandboxes' VMMs (the ``[jail]`` config resolved against the host)."""

    data_root: Path
    uid_base: int
    uid_count: int
    memory_overhead_mb: int
    pids_max: int
    cpu_weight: int
    mount_ns: bool
    seccomp: bool
    cgroups: CgroupHost | None = field(default=None, compare=False)
    claims_dir: Path = CLAIMS_DIR

    @property
    def group(self) -> int:
        """The jail group: every jailed VMM's supplementary group, readers of shared template files."""
        return self.uid_base

    def limits(self, mem_mb: int) -> CgroupLimits:
        return CgroupLimits(memory_bytes=(mem_mb + self.memory_overhead_mb) << 20, pids_max=self.pids_max,
                            cpu_weight=self.cpu_weight)

    def ensure_layout(self) -> None:
        """The server's state unreadable by jailed uids; the sandboxes directory traversable only;
        data_root and the directories above it traversable by the jail group (a data_root under a
        0700 directory, e.g. a test's mkdtemp, would hide a VM's own files from it)."""
        d = self.data_root.resolve()
        while True:
            try:
                st = d.stat()
                if not st.st_mode & stat.S_IXOTH and not (st.st_gid == self.group and st.st_mode & stat.S_IXGRP):
                    os.chown(d, -1, self.group)
                    os.chmod(d, (stat.S_IMODE(st.st_mode) | stat.S_IXGRP) & ~stat.S_IWGRP)
                    log.info("jail: %s made traversable (not readable) by the jail group %d", d, self.group)
            except OSError as e:
                log.warning("jail: cannot make %s traversable for jailed VMMs: %s", d, e.strerror)
            if d == d.parent:
                break
            d = d.parent
        for d, mode in ((self.data_root / "run", 0o700), (self.data_root / "sandboxes", 0o711)):
            try:
                d.mkdir(parents=True, exist_ok=True)
                os.chmod(d, mode)
            except OSError as e:
                log.warning("jail: cannot set %s to mode %o: %s", d, mode, e.strerror)

    def release(self) -> None:
        """What this server made for its VMMs and no longer needs once it stops: the groups of
        VMMs that are gone, and its parent cgroups when nothing is left in them (they are made
        again on demand). VMMs left running (``--keep``) keep theirs."""
        if self.cgroups is not None:
            cgroups.release(self.cgroups)

    # -- uids

    def _claim_path(self, uid: int) -> Path:
        return self.claims_dir / str(uid)

    def claim_uid(self, name: str) -> int:
        """A uid of the range no other VMM holds (claimed with O_EXCL; stale claims are taken over)."""
        self.claims_dir.mkdir(parents=True, exist_ok=True)
        start = random.randrange(1, self.uid_count)
        live: set[int] | None = None
        for i in range(self.uid_count - 1):
            uid = self.uid_base + 1 + (start + i) % (self.uid_count - 1)
            path = self._claim_path(uid)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                if live is None:
                    live = uids_in_use()
                if self._stale(path, uid, live):
                    path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({"name": name, "data_root": str(self.data_root), "at": time.time()}, f)
            return uid
        raise JailError(0, f"every uid of the jail range {self.uid_base + 1}..{self.uid_base + self.uid_count - 1} "
                           "is taken; raise [jail] uid_count")

    def release_uid(self, uid: int, name: str) -> None:
        path = self._claim_path(uid)
        try:
            if json.loads(path.read_text()).get("name") == name:
                path.unlink(missing_ok=True)
        except (OSError, ValueError):
            pass

    @staticmethod
    def _stale(path: Path, uid: int, live: set[int]) -> bool:
        try:
            age = time.time() - path.stat().st_mtime
        except OSError:
            return False
        return uid not in live and age > CLAIM_GRACE_S

    def sweep(self, keep_names: set[str] | frozenset[str] = frozenset()) -> tuple[list[str], list[int]]:
        """Remove what dead VMMs of this server left: their cgroups, and uid claims of this data_root
        whose uid no process runs as. Returns (cgroup names, uids)."""
        groups = cgroups.sweep(self.cgroups, keep_names) if self.cgroups is not None else []
        uids: list[int] = []
        live = uids_in_use()
        try:
            entries = list(self.claims_dir.iterdir())
        except OSError:
            entries = []
        for p in entries:
            if not p.name.isdigit():
                continue
            try:
                info = json.loads(p.read_text())
            except (OSError, ValueError):
                info = {}
            uid = int(p.name)
            mine = info.get("data_root") == str(self.data_root)
            if uid in live or info.get("name") in keep_names:
                continue
            if (mine and time.time() - p.stat().st_mtime > 5) or self._stale(p, uid, live):
                p.unlink(missing_ok=True)
                uids.append(uid)
        return groups, uids


def uids_in_use(proc: Path = Path("/proc")) -> set[int]:
    """The uids processes run as now (the owner of ``/proc/PID`` is the process's effective uid)."""
    out = set()
    for p in proc.iterdir():
        if p.name.isdigit():
            try:
                out.add(p.stat().st_uid)
            except OSError:
                continue
    return out


# -- one VMM's jail -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bind:
    """A directory bound into the mount namespace: ``source`` (a real path) at ``path``."""

    path: Path
    writable: bool
    source: Path | None = None

    @property
    def src(self) -> Path:
        return self.source or self.path


def _covered(path: Path, by: Sequence[Path]) -> bool:
    return any(path == b or b in path.parents for b in by)


def plan_binds(data_root: Path, own_dirs: Sequence[Path], read_files: Sequence[Path]) -> list[Bind]:
    """What the VMM's mount namespace shows of ``data_root`` (a tmpfs at its real path):
    ``own_dirs`` read-write, the directories of ``read_files`` read-only, each at the path QEMU
    is given (data_root's entries may be symlinks, e.g. a test server's ``cache`` to a shared one)
    and at its real path; directories outside ``data_root`` are visible anyway. A directory inside
    another bound one is not bound again. Shortest first."""
    literal_root = Path(os.path.abspath(data_root))
    root = data_root.resolve()

    def targets(d: Path) -> set[Path]:
        out = set()
        lit = Path(os.path.abspath(d))
        if lit == literal_root or literal_root in lit.parents:
            out.add(root / lit.relative_to(literal_root))
        real = d.resolve()
        if real == root or root in real.parents:
            out.add(real)
        return out

    binds: list[Bind] = []
    rw: list[Path] = []
    for d in sorted(set(own_dirs), key=lambda p: len(p.parts)):
        for t in sorted(targets(d), key=lambda p: len(p.parts)):
            if not _covered(t, rw):
                rw.append(t)
                binds.append(Bind(t, True, d.resolve()))
    ro: list[Path] = []
    for f in sorted(set(read_files), key=lambda p: len(p.parts)):
        src = f.resolve().parent
        for t in sorted(targets(Path(os.path.abspath(f)).parent) | targets(src), key=lambda p: len(p.parts)):
            if not _covered(t, rw) and not _covered(t, ro):
                ro.append(t)
                binds.append(Bind(t, False, src))
    return sorted(binds, key=lambda b: len(b.path.parts))


def shared_roots(data_root: Path) -> list[Path]:
    """The real directories whose files a jailed VMM may be granted: data_root's, and those its
    symlinked entries point to (a test server's ``templates``, ``cache`` and ``kernels`` link to a
    shared data_root; a fork's build is made there, under 0700 directories)."""
    root = data_root.resolve()
    out = [root]
    try:
        entries = list(Path(os.path.abspath(data_root)).iterdir())
    except OSError:
        return out
    for e in entries:
        try:
            if e.is_symlink() and e.resolve().is_dir():
                out.append(e.resolve())
        except OSError:
            continue
    return out


def grant_read(path: Path, group: int, stop_at: Path | Sequence[Path]) -> None:
    """Make ``path`` readable (and its directories up to the root it lies under) by the jail
    group, without making anything writable or readable by others. ``stop_at``: data_root, or
    the real roots of :func:`shared_roots`; a path under none of them is not ours to change."""
    stops = [p.resolve() for p in ([stop_at] if isinstance(stop_at, Path) else stop_at)]
    try:
        real = path.resolve()
        st = real.stat()
    except OSError:
        return
    under = [s for s in stops if real == s or s in real.parents]
    if not under:
        return  # outside data_root: not ours to change
    stop = max(under, key=lambda s: len(s.parts))
    if not st.st_mode & stat.S_IROTH and not (st.st_gid == group and st.st_mode & stat.S_IRGRP):
        os.chown(real, -1, group)
        os.chmod(real, (stat.S_IMODE(st.st_mode) | stat.S_IRGRP) & ~stat.S_IWGRP)
    d = real.parent
    while d != d.parent:
        try:
            dst = d.stat()
        except OSError:
            return
        if not dst.st_mode & stat.S_IXOTH and not (dst.st_gid == group and dst.st_mode & stat.S_IXGRP):
            os.chown(d, -1, group)
            os.chmod(d, (stat.S_IMODE(dst.st_mode) | stat.S_IXGRP) & ~stat.S_IWGRP)
        if d == stop or d in stops:
            return
        d = d.parent


def unreadable_by(path: Path, groups: Sequence[int]) -> str:
    """Why a process of a fresh jail uid (owner of nothing, in ``groups``) cannot read ``path``
    by its mode bits, or "" when it can: the first directory it cannot pass, or the file."""
    try:
        real = Path(os.path.abspath(path))
        parts = [*reversed(real.parents), real]
    except OSError:
        return ""
    for i, p in enumerate(parts):
        try:
            st = p.stat()
        except OSError:
            return ""  # QEMU says what is missing
        last = i == len(parts) - 1
        other, grp = (stat.S_IROTH, stat.S_IRGRP) if last else (stat.S_IXOTH, stat.S_IXGRP)
        if not st.st_mode & other and not (st.st_gid in groups and st.st_mode & grp):
            what = "read" if last else "pass through"
            return f"{p} (mode {stat.S_IMODE(st.st_mode):o}, {st.st_uid}:{st.st_gid}) cannot be {what} by jailed VMMs"
    return ""


def _own_tree(top: Path, uid: int, gid: int, skip: set[tuple[int, int]]) -> None:
    """``top`` and what it holds owned by ``uid:gid`` (``top`` mode 0700), except the inodes in
    ``skip`` (shared read-only layers)."""
    os.chown(top, uid, gid)
    os.chmod(top, 0o700)
    for dirpath, dirnames, filenames in os.walk(top):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            try:
                st = os.lstat(p)
                if (st.st_dev, st.st_ino) in skip or stat.S_ISLNK(st.st_mode):
                    continue
                os.chown(p, uid, gid)
            except OSError:
                continue


def _seal_shared(path: Path, group: int) -> None:
    """A read-only layer of the chain owned by root and readable by the jail group (a layer was
    the writable disk of a VM, owned by its uid, before a checkpoint made it immutable)."""
    try:
        st = path.stat()
    except OSError:
        return
    if st.st_uid != 0 or (st.st_gid != group and not st.st_mode & stat.S_IROTH) or st.st_mode & 0o022:
        os.chown(path, 0, group if not st.st_mode & stat.S_IROTH else -1)
        os.chmod(path, (stat.S_IMODE(st.st_mode) | stat.S_IRGRP) & ~0o022)


@dataclass
class VmmJail:
    """The jail of one VMM process: its uid, its cgroup, what its mount namespace shows."""

    policy: JailPolicy
    name: str
    uid: int
    cgroup: VmmCgroup | None = None
    binds: list[Bind] = field(default_factory=list)
    netns: str = ""
    tap: str = ""
    extra_groups: tuple[int, ...] = ()
    released: bool = False

    @property
    def gid(self) -> int:
        return self.uid

    @classmethod
    def prepare(
        cls, policy: JailPolicy, name: str, *, own_dirs: Sequence[Path], own_files: Sequence[Path],
        read_files: Sequence[Path], mem_mb: int, netns: str = "", tap: str = "",
    ) -> "VmmJail":
        """Claim a uid, give it ``own_dirs`` (0700) and ``own_files``, make ``read_files`` (and the
        backing chains of ``own_files``) readable by the jail group, make the cgroup. Runs in
        the server (as root) before the spawn; undo with :meth:`release`."""
        uid = policy.claim_uid(name)
        jail = cls(policy, name, uid, netns=netns, tap=tap)
        try:
            roots = shared_roots(policy.data_root)
            shared = list(read_files)
            for f in own_files:
                shared += backing_chain(f)
            skip = set()
            for f in shared:
                try:
                    st = f.stat()
                except OSError:
                    continue
                if f not in read_files:
                    _seal_shared(f, policy.group)
                skip.add((st.st_dev, st.st_ino))
                grant_read(f, policy.group, roots)
            for d in own_dirs:
                _own_tree(d, uid, uid, skip)
                grant_read(d, policy.group, roots)  # its parents traversable (0711 sandboxes/)
            for f in own_files:
                if f.exists() and f.parent not in own_dirs:
                    os.chown(f, uid, uid)
            kvm = Path("/dev/kvm")
            if kvm.exists():
                jail.extra_groups = (kvm.stat().st_gid,)
            for f in shared:
                why = unreadable_by(f, (policy.group, *jail.extra_groups))
                if why:
                    raise JailError(errno.EACCES, f"the VMM of {name} must read {f}, but {why}; files a VM maps "
                                    f"must lie under data_root ({policy.data_root}), where the jail makes them readable")
            if policy.mount_ns:
                jail.binds = plan_binds(policy.data_root, own_dirs, [*shared, *own_files])
            if policy.cgroups is not None:
                try:
                    jail.cgroup = VmmCgroup.create(policy.cgroups, name, policy.limits(mem_mb))
                except OSError as e:
                    log.warning("jail: VMM %s runs without its own cgroup: %s", name, e)
        except BaseException:
            jail.release()
            raise
        return jail

    @classmethod
    def of_running(cls, policy: JailPolicy, name: str, pid: int) -> "VmmJail | None":
        """The jail of a running VMM a previous server started (adopted): its uid and cgroup."""
        try:
            uid = Path(f"/proc/{pid}").stat().st_uid
        except OSError:
            return None
        if not policy.uid_base < uid < policy.uid_base + policy.uid_count:
            return None
        group = None
        if policy.cgroups is not None:
            group = cgroups.group_of_pid(policy.cgroups, pid) or policy.cgroups.group(name)
        return cls(policy, name, uid, cgroup=group)

    def qemu_args(self) -> list[str]:
        return ["-sandbox", SANDBOX_FLAGS] if self.policy.seccomp else []

    @staticmethod
    def environment(extra: dict[str, str]) -> dict[str, str]:
        """The VMM's whole environment: a few neutral variables and ``extra`` (the server's own,
        which may hold API keys, is not passed on)."""
        return {**{k: os.environ[k] for k in ENV_KEEP if k in os.environ}, **extra}

    def preexec(self, *, kill_with_owner: bool, tap_fd: int = -1) -> Callable[[], None]:
        """The function the child runs between fork and exec (see the module's text for the order).
        ``tap_fd``: a descriptor number kept open across exec (in ``pass_fds``) that the slot's tap,
        opened inside the namespace, replaces."""
        procs = [str(p) for p in self.cgroup.procs_files()] if self.cgroup is not None else []
        netns_path = f"/run/netns/{self.netns}" if self.netns else ""
        tap = self.tap.encode()
        root = str(self.policy.data_root.resolve()).encode()
        binds = [(str(b.src), str(b.path).encode(), b.writable) for b in self.binds]
        groups = [self.policy.group, *self.extra_groups]
        uid = self.uid
        mount_ns = self.policy.mount_ns
        libc = _libc

        def step(what: str, rc: int) -> None:
            if rc != 0:
                e = ctypes.get_errno()
                raise JailError(e, f"{what}: {os.strerror(e)}")

        def run() -> None:
            pid = str(os.getpid())
            for f in procs:
                with open(f, "w") as out:
                    out.write(pid)
            if netns_path:
                fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
                step(f"setns {netns_path}", libc.setns(fd, _CLONE_NEWNET))
                os.close(fd)
            if tap and tap_fd >= 0:
                t = os.open("/dev/net/tun", os.O_RDWR)
                fcntl.ioctl(t, _TUNSETIFF, struct.pack("16sH22x", tap, _IFF_TAP | _IFF_NO_PI | _IFF_VNET_HDR))
                os.dup2(t, tap_fd)
                os.close(t)
            if mount_ns:
                step("unshare(CLONE_NEWNS)", libc.unshare(_CLONE_NEWNS))
                step("making / private", libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None))
                # Opened in the new namespace (a bind's source must be a mount of the caller's
                # namespace), before the tmpfs covers them.
                fds = [(target, os.open(src, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC), rw) for src, target, rw in binds]
                step(f"tmpfs over {root.decode()}", libc.mount(b"tmpfs", root, b"tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, b"mode=0711,size=1m"))
                for target, fd, rw in fds:
                    os.makedirs(target, mode=0o711, exist_ok=True)
                    step(f"binding {target.decode()}", libc.mount(f"/proc/self/fd/{fd}".encode(), target, None, _MS_BIND | _MS_REC, None))
                    if not rw:
                        step(f"read-only {target.decode()}", libc.mount(None, target, None, _MS_BIND | _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV, None))
                    os.close(fd)
            os.setgroups(groups)
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            os.umask(0o077)
            step("PR_SET_NO_NEW_PRIVS", libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
            if kill_with_owner:  # after the uid switch, which clears it
                step("PR_SET_PDEATHSIG", libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0))

        def preexec() -> None:
            try:
                run()
            except BaseException as e:
                os.write(2, f"trenvx jail: {e}\n".encode(errors="replace"))
                raise

        return preexec

    def release(self) -> None:
        """After the VMM is reaped: its cgroup removed, its own directories given back to root
        (a later VM with the same uid reads nothing of them), its uid's claim dropped. Idempotent."""
        if self.released:
            return
        self.released = True
        if self.cgroup is not None:
            self.cgroup.remove()
        for b in self.binds:
            if b.writable:
                try:
                    if b.path.stat().st_uid == self.uid:
                        os.chown(b.path, 0, 0)
                except OSError:
                    pass
        self.policy.release_uid(self.uid, self.name)


def set_background(vm: object, background: bool) -> str:
    """Run the VMM process of ``vm`` (a :class:`~trenvx.vmm.base.Vm`) at the lowest CPU priority (``background``) or its normal one: its cgroup's
    ``cpu.idle`` (or lowest weight) where it has one, else nice 10 + SCHED_IDLE on every thread,
    as before. Returns the mechanism used."""
    jail: VmmJail | None = getattr(vm, "jail", None)
    pid = int(getattr(vm, "pid"))
    if jail is not None and jail.cgroup is not None:
        try:
            how = jail.cgroup.set_idle(background)
            if how:
                return f"cgroup {how}"
        except OSError as e:
            log.info("jail: cannot set the CPU weight of %s (%s); using nice", jail.name, e)
    from .process import set_priority, set_sched_idle

    set_priority(pid, 10 if background else 0)
    set_sched_idle(pid, background)
    return "nice"
