"""The initramfs that boots the guest kernel: busybox-static, the virtio/pmem/ext4 modules the
kernel has as modules (in dependency order), and ``initramfs-init.sh`` as ``/init``.

It is written directly as a newc cpio archive (uncompressed: the guest skips a decompression),
with ``/dev/console`` inside so the init has a console before it mounts devtmpfs. The file is
``kernels/<version>/initramfs-<hash>.cpio`` where the hash covers every input (init script,
module list and files, busybox binary, kernel version, this builder's version): a changed input
gives a new file, an unchanged one is reused.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from trenvx.kernel.debian import GuestKernel, module_name, read_module
from trenvx.build_errors import InitramfsError

BUILDER_VERSION = "1"
INIT_SCRIPT = Path(__file__).with_name("initramfs-init.sh")
BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")

# (module, required). Required ones must be modules or built in; optional ones are skipped with
# a note when the kernel has neither.
WANTED_MODULES: tuple[tuple[str, bool], ...] = (
    ("virtio_pci", True),
    ("virtio_blk", True),
    ("virtio_net", True),
    ("virtio_console", True),
    ("virtio_rng", False),
    ("nd_pmem", False),
    ("virtio_pmem", False),
    ("vmgenid", False),
    ("ext4", True),
    # The root of overlay-mode templates: a read-only image (virtio-pmem, DAX) under a writable disk.
    ("overlay", False),
    ("virtio_balloon", False),
    # The agent's vsock listener (Firecracker and Cloud Hypervisor reach the agent over vsock).
    ("vsock", False),
    ("vmw_vsock_virtio_transport", False),
    # Firecracker's devices are virtio-mmio, found through ACPI (Debian builds virtio_mmio as a module).
    ("virtio_mmio", False),
)


@dataclass(frozen=True)
class ModulePlan:
    """What goes into the initramfs: modules in load order, and what was left out."""

    load: tuple[tuple[str, str, bool], ...]
    """(name, path relative to modules_dir, required) in insmod order."""
    builtin: tuple[str, ...]
    missing_optional: tuple[str, ...]


def _norm(name: str) -> str:
    return name.replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, tuple[str, list[str]]]:
    """``modules.dep`` -> {name: (relative path, [dependency names])}."""
    deps: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or ":" not in line:
            continue
        path, _, rest = line.partition(":")
        path = path.strip()
        deps[module_name(path)] = (path, [module_name(d) for d in rest.split()])
    return deps


def parse_modules_builtin(text: str) -> set[str]:
    return {module_name(line.strip()) for line in text.splitlines() if line.strip()}


def parse_softdeps(text: str) -> dict[str, list[str]]:
    """``modules.softdep`` -> {name: [pre-dependencies]} (only ``pre:``; post ones are not needed to boot)."""
    pre: dict[str, list[str]] = {}
    for line in text.splitlines():
        words = line.split()
        if len(words) < 3 or words[0] != "softdep":
            continue
        name = _norm(words[1])
        mode = None
        for w in words[2:]:
            if w in ("pre:", "post:"):
                mode = w
            elif mode == "pre:":
                pre.setdefault(name, []).append(_norm(w))
    return pre


def resolve_load_order(
    modules_dep: str,
    modules_builtin: str,
    wanted: Iterable[tuple[str, bool]] = WANTED_MODULES,
    softdeps: str = "",
) -> ModulePlan:
    """The dependency closure of ``wanted`` in insmod order (every module after its dependencies).

    Built-in modules (per ``modules.builtin``) are skipped. A required module that is neither a
    module nor built in raises :class:`InitramfsError`; an optional one is listed in
    ``missing_optional``. Soft pre-dependencies are loaded first when they are modules.
    """
    deps = parse_modules_dep(modules_dep)
    builtin = parse_modules_builtin(modules_builtin)
    soft = parse_softdeps(softdeps)
    order: list[tuple[str, str, bool]] = []
    placed: dict[str, int] = {}
    builtin_hit: list[str] = []
    missing: list[str] = []

    def visit(name: str, required: bool, stack: tuple[str, ...]) -> None:
        if name in placed:
            if required and not order[placed[name]][2]:  # upgrade to required
                n, p, _ = order[placed[name]]
                order[placed[name]] = (n, p, True)
            return
        if name in stack:
            raise InitramfsError(f"dependency cycle in modules.dep: {' -> '.join(stack + (name,))}")
        path, dlist = deps[name]
        for s in soft.get(name, []):
            if s in deps and s not in stack:
                visit(s, False, stack + (name,))
        for d in dlist:
            if d in deps:
                visit(d, required, stack + (name,))
            elif d not in builtin:
                raise InitramfsError(
                    f"module {name} depends on {d}, which is neither in modules.dep nor in modules.builtin"
                )
        placed[name] = len(order)
        order.append((name, path, required))

    for raw, required in wanted:
        name = _norm(raw)
        if name in deps:
            visit(name, required, ())
        elif name in builtin:
            builtin_hit.append(name)
        elif required:
            raise InitramfsError(
                f"the kernel has no {name} (neither a module in modules.dep nor built in); "
                f"trenvx needs it to boot: use a Debian cloud-amd64 kernel"
            )
        else:
            missing.append(name)
    return ModulePlan(tuple(order), tuple(builtin_hit), tuple(missing))


def plan_modules(kernel: GuestKernel) -> ModulePlan:
    md = kernel.modules_dir
    try:
        dep = (md / "modules.dep").read_text()
    except FileNotFoundError:
        raise InitramfsError(f"{md}/modules.dep is missing; delete {kernel.root} and fetch the kernel again") from None
    builtin = (md / "modules.builtin").read_text() if (md / "modules.builtin").exists() else ""
    soft = (md / "modules.softdep").read_text() if (md / "modules.softdep").exists() else ""
    return resolve_load_order(dep, builtin, WANTED_MODULES, soft)


def find_busybox() -> Path:
    for c in BUSYBOX_CANDIDATES:
        p = Path(c)
        if p.is_file():
            if not _is_static_elf(p.read_bytes()):
                raise InitramfsError(
                    f"{p} is dynamically linked; the initramfs needs busybox-static "
                    f"(apt-get install busybox-static, or scripts/start.sh setup)"
                )
            return p
    raise InitramfsError("busybox not found; apt-get install busybox-static (or run scripts/start.sh setup)")


def _is_static_elf(data: bytes) -> bool:
    """True unless the ELF has a PT_INTERP program header (a dynamic loader)."""
    if data[:4] != b"\x7fELF" or data[4] != 2:
        return False
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        (ptype,) = struct.unpack_from("<I", data, phoff + i * phentsize)
        if ptype == 3:  # PT_INTERP
            return False
    return True


# ---------------------------------------------------------------------------------------------
# newc cpio writer


class CpioWriter:
    """Writes a newc ("070701") cpio archive; every entry owned by root, mtime 0 (reproducible)."""

    def __init__(self, f):
        self.f = f
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", nlink: int = 1, rdev: tuple[int, int] = (0, 0)) -> None:
        nameb = name.encode() + b"\0"
        fields = (
            self.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(nameb), 0,
        )  # fmt: skip
        self.ino += 1
        hdr = b"070701" + b"".join(b"%08X" % v for v in fields)
        self.f.write(hdr + nameb)
        self.f.write(b"\0" * (-(len(hdr) + len(nameb)) % 4))
        self.f.write(data)
        self.f.write(b"\0" * (-len(data) % 4))

    def dir(self, name: str, perm: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | perm, nlink=2)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def trailer(self) -> None:
        self.ino = 0
        self._entry("TRAILER!!!", 0)


def _write_cpio(out: Path, init: bytes, busybox: bytes, modules: Sequence[tuple[str, bytes, bool]]) -> None:
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            w = CpioWriter(f)
            for d in ("bin", "sbin", "dev", "etc", "etc/trenvx", "lib", "lib/modules", "newroot", "proc", "run", "sys", "tmp"):
                w.dir(d)
            w.chardev("dev/console", 5, 1, 0o600)
            w.chardev("dev/null", 1, 3, 0o666)
            w.file("bin/busybox", busybox, 0o755)
            w.symlink("bin/sh", "busybox")
            w.file("init", init, 0o755)
            listing = "".join(f"{name} {1 if req else 0}\n" for name, _, req in modules)
            w.file("etc/trenvx/modules", listing.encode())
            for name, data, _ in modules:
                w.file(f"lib/modules/{name}.ko", data)
            w.trailer()
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


def initramfs_digest(kernel: GuestKernel, plan: ModulePlan, init: bytes, busybox: bytes) -> str:
    h = hashlib.sha256()
    h.update(f"trenvx-initramfs:{BUILDER_VERSION}\0{kernel.version}\0".encode())
    h.update(hashlib.sha256(init).digest())
    h.update(hashlib.sha256(busybox).digest())
    for name, rel, req in plan.load:
        st = (kernel.modules_dir / rel).stat()
        h.update(f"{name}\0{rel}\0{int(req)}\0{st.st_size}\0".encode())
    return h.hexdigest()


async def ensure_initramfs(kernel: GuestKernel) -> Path:
    """Return ``kernel.root/initramfs-<hash>.cpio``, building it when its inputs changed."""
    return await asyncio.to_thread(_ensure_initramfs_sync, kernel)


def _ensure_initramfs_sync(kernel: GuestKernel) -> Path:
    if not kernel.modules_dir.is_dir():
        raise InitramfsError(f"{kernel.modules_dir} does not exist; fetch the kernel with ensure_kernel first")
    plan = plan_modules(kernel)
    init = INIT_SCRIPT.read_bytes()
    bb_path = find_busybox()
    busybox = bb_path.read_bytes()
    digest = initramfs_digest(kernel, plan, init, busybox)
    out = kernel.root / f"initramfs-{digest[:16]}.cpio"
    if out.is_file():
        return out
    modules = []
    for name, rel, req in plan.load:
        try:
            data = read_module(kernel.modules_dir / rel)
        except Exception as e:  # noqa: BLE001 - corrupt/unreadable module: say which
            raise InitramfsError(f"cannot read module {kernel.modules_dir / rel}: {e}") from None
        modules.append((name, data, req))
    _write_cpio(out, init, busybox, modules)
    # Older initramfs files of this kernel are kept: templates built with them may name them.
    return out


def describe(plan: ModulePlan) -> str:
    return (
        "load: " + " ".join(n for n, _, _ in plan.load)
        + (f"; built in: {' '.join(plan.builtin)}" if plan.builtin else "")
        + (f"; absent (optional): {' '.join(plan.missing_optional)}" if plan.missing_optional else "")
    )  # fmt: skip


__all__ = [
    "ModulePlan",
    "WANTED_MODULES",
    "ensure_initramfs",
    "find_busybox",
    "plan_modules",
    "resolve_load_order",
    "CpioWriter",
]
