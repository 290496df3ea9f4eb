"""``POST /freeze`` and ``POST /thaw``: the guest's writable filesystems held still while the host
saves the sandbox (a pause to disk).

A freeze is ``sync()``, then ``FIFREEZE`` on every writable filesystem of a block device: its
dirty data and journal are written to the disk and every new write waits. The disk is then
consistent on its own, so a pause that keeps only the filesystem (``memory: false``) loses
nothing that was written before it, and a pause with memory saves a guest whose disk agrees with
its memory. The host thaws the guest when it resumes it (``/thaw``, or ``/init``, which thaws
first); if nobody does, the freeze ends by itself after ``thawAfterSeconds`` of the guest's time
(default :data:`DEFAULT_THAW_AFTER_S`): a host that died between the freeze and the pause never
leaves a running guest unable to write. (A paused guest's clock does not run, so the timer does not
fire while it is saved.)

In overlay mode the sandbox's writable disk is the upper layer of an overlayfs root, mounted by the
initramfs before ``switch_root`` and no longer reachable by a path (overlayfs itself cannot be
frozen). Every ext4 filesystem the kernel has mounted is listed in ``/sys/fs/ext4``: one not reachable
is mounted once more (the same superblock) under :data:`PRIVATE_MOUNTS`, frozen there, and unmounted
when thawed.

``POST /freeze {"thawAfterSeconds": N}`` answers ``{"frozen": [...], "errors": [...]}``;
``POST /thaw`` answers ``{"thawed": [...], "errors": [...]}``. Errors of single filesystems are
reported, not raised: the host decides.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import stat
import threading
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("trenvx_agent.freeze")

FIFREEZE = 0xC0045877  # _IOWR('X', 119, int)
FITHAW = 0xC0045878  # _IOWR('X', 120, int)
FREEZABLE = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs"})
PRIVATE_MOUNTS = "/run/trenvx-agent/freeze"
DEFAULT_THAW_AFTER_S = 120.0
MAX_THAW_AFTER_S = 3600.0
MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
MNT_DETACH = 2


@dataclass(frozen=True)
class Mount:
    """One line of ``/proc/self/mountinfo``."""

    device: str
    """``major:minor`` of the filesystem (one superblock)."""
    mountpoint: str
    fstype: str
    source: str
    writable: bool
    """The filesystem (not only this mount) is read-write."""


def _unescape(path: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    out, i = [], 0
    while i < len(path):
        code = path[i + 1:i + 4]
        if path[i] == "\\" and len(code) == 3 and all(c in "01234567" for c in code):
            out.append(chr(int(path[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(path[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[Mount]:
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        if sep < 6 or len(fields) < sep + 4:
            continue
        super_opts = fields[sep + 3].split(",")
        mounts.append(Mount(device=fields[2], mountpoint=_unescape(fields[4]), fstype=fields[sep + 1],
                            source=_unescape(fields[sep + 2]), writable="rw" in super_opts))
    return mounts


class SystemOps:
    """What a freeze does to the system; tests replace it (a freeze of the host's disks would hang it)."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL("libc.so.6", use_errno=True)

    def sync(self) -> None:
        os.sync()

    def mountinfo(self) -> str:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            return f.read()

    def mounted_ext4(self) -> list[str]:
        """Block device names of the ext4 filesystems mounted, reachable or not."""
        try:
            return sorted(os.listdir("/sys/fs/ext4"))
        except OSError:
            return []

    def device_number(self, name: str) -> str:
        """``major:minor`` of block device ``name`` ("" if it is not one)."""
        try:
            st = os.stat(f"/dev/{name}")
        except OSError:
            return ""
        if not stat.S_ISBLK(st.st_mode):
            return ""
        return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"

    def ioctl(self, path: str, request: int) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, request, 0)
        finally:
            os.close(fd)

    def mount(self, device: str, target: str, fstype: str) -> None:
        os.makedirs(target, mode=0o700, exist_ok=True)
        if self._libc.mount(device.encode(), target.encode(), fstype.encode(), MS_NOSUID | MS_NODEV | MS_NOEXEC,
                            None) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mount {device} on {target}: {os.strerror(err)}")

    def umount(self, target: str) -> None:
        if self._libc.umount2(target.encode(), MNT_DETACH) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"umount {target}: {os.strerror(err)}")
        try:
            os.rmdir(target)
        except OSError:
            pass


@dataclass
class _Frozen:
    path: str
    private: bool = False
    """Mounted by the freeze (unmounted by the thaw)."""


class FreezeUnavailable(RuntimeError):
    """This agent does not freeze (``--skip freeze``: an agent on a host, whose disks are not its own)."""


@dataclass
class Freezer:
    ops: Any = None
    """:class:`SystemOps` in a VM; None: freezing is turned off (the default: only the agent's
    ``main`` in a VM turns it on, so that no test on a host can freeze the host's disks)."""
    _frozen: list[_Frozen] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _timer: threading.Timer | None = None

    @property
    def frozen(self) -> list[str]:
        return [f.path for f in self._frozen]

    def targets(self) -> tuple[list[tuple[str, str, bool]], list[str]]:
        """What to freeze: (path, fstype, mounted privately) per writable filesystem, and errors."""
        seen: set[str] = set()
        out: list[tuple[str, str, bool]] = []
        errors: list[str] = []
        for m in parse_mountinfo(self.ops.mountinfo()):
            if m.fstype in FREEZABLE and m.writable and m.device not in seen:
                seen.add(m.device)
                out.append((m.mountpoint, m.fstype, False))
        for name in self.ops.mounted_ext4():
            devno = self.ops.device_number(name)
            if not devno or devno in seen:
                continue
            seen.add(devno)
            target = f"{PRIVATE_MOUNTS}/{name}"
            try:
                self.ops.mount(f"/dev/{name}", target, "ext4")
            except OSError as e:
                if e.errno not in (errno.EBUSY, errno.EROFS, errno.EACCES):  # a read-only filesystem: nothing to do
                    errors.append(f"/dev/{name}: {e}")
                continue
            out.append((target, "ext4", True))
        return out, errors

    def freeze(self, thaw_after_s: float = DEFAULT_THAW_AFTER_S) -> dict[str, Any]:
        if self.ops is None:
            raise FreezeUnavailable("this agent does not freeze filesystems (started with --skip freeze, or not "
                                    "listening on all addresses: not in a VM)")
        with self._lock:
            self._cancel_timer()
            errors: list[str] = []
            if not self._frozen:  # else frozen already (a second /freeze): only its timer restarts
                self.ops.sync()
                targets, errors = self.targets()
                self._freeze_all(targets, errors)
            if self._frozen:
                self._timer = threading.Timer(thaw_after_s, self._expire)
                self._timer.daemon = True
                self._timer.start()
            log.info("froze %s%s", self.frozen or "nothing", f"; errors: {errors}" if errors else "")
            return {"frozen": self.frozen, "errors": errors, "thawAfterSeconds": thaw_after_s}

    def _freeze_all(self, targets: list[tuple[str, str, bool]], errors: list[str]) -> None:
        for path, fstype, private in targets:
            try:
                self.ops.ioctl(path, FIFREEZE)
            except OSError as e:
                if e.errno != errno.EBUSY:  # EBUSY: frozen already (by an earlier freeze): thawed with the rest
                    errors.append(f"{path} ({fstype}): {e.strerror or e}")
                    if private:
                        self._umount(path, errors)
                    continue
            self._frozen.append(_Frozen(path, private))

    def thaw(self) -> dict[str, Any]:
        with self._lock:
            self._cancel_timer()
            thawed, errors = [], []
            for f in reversed(self._frozen):
                try:
                    self.ops.ioctl(f.path, FITHAW)
                    thawed.append(f.path)
                except OSError as e:
                    if e.errno != errno.EINVAL:  # EINVAL: not frozen (someone thawed it)
                        errors.append(f"{f.path}: {e.strerror or e}")
                    else:
                        thawed.append(f.path)
                if f.private:
                    self._umount(f.path, errors)
            self._frozen.clear()
            if thawed or errors:
                log.info("thawed %s%s", thawed, f"; errors: {errors}" if errors else "")
            return {"thawed": thawed, "errors": errors}

    def _umount(self, path: str, errors: list[str]) -> None:
        try:
            self.ops.umount(path)
        except OSError as e:
            errors.append(f"{path}: {e}")

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        log.warning("nobody thawed the filesystems within the freeze's limit: thawing them now")
        self.thaw()


def thaw_after(body: dict[str, Any]) -> float:
    """``thawAfterSeconds`` of a /freeze body (ValueError naming it when it is not a number in range)."""
    value = body.get("thawAfterSeconds", DEFAULT_THAW_AFTER_S)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 1 <= value <= MAX_THAW_AFTER_S:
        raise ValueError(f"thawAfterSeconds must be a number of seconds between 1 and {MAX_THAW_AFTER_S:.0f}")
    return float(value)
