"""The guest kernel: Debian's cloud kernel package, unpacked under ``data_root/kernels/<version>/``.

``ensure_kernel`` downloads ``linux-image-<abi>-cloud-amd64`` with ``apt-get download`` (no
installation on the host), unpacks it with ``dpkg-deb -x`` into a temporary directory and renames
that into place, so a half-unpacked kernel is never seen. A second call finds the directory and
returns without running apt.

Version selection for ``"auto"``:

1. a kernel already unpacked under ``data_root/kernels/`` (the newest of them): templates built
   with it keep working after the archive moves on; name a version to change kernels;
2. else the kernel that Debian's meta-package ``linux-image-cloud-amd64`` depends on (the
   distribution's default cloud kernel; bookworm also carries a 6.12 series besides the default
   6.1, and ``auto`` stays on the default series);
3. else the newest ``linux-image-<abi>-cloud-amd64`` apt-cache knows.

``apt-get update`` runs only when apt knows no cloud kernel at all.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from trenvx.filelock import AsyncFileLock
from trenvx.layout import DataRoot
from trenvx.build_errors import CommandError, KernelError, run

FLAVOUR = "cloud-amd64"
PKG_RE = re.compile(r"^linux-image-(\d+\.\d+[^\s]*)-cloud-amd64$")
# A real kernel ABI (6.1.0-28, 6.12.117+deb12); meta-packages look like "6.12" only.
ABI_RE = re.compile(r"^\d+\.\d+\.\d+[-+][0-9A-Za-z.+~-]+$")

APT_TIMEOUT = 600.0
UPDATE_TIMEOUT = 600.0


@dataclass(frozen=True)
class GuestKernel:
    version: str
    """Full ``uname -r``, e.g. ``6.1.0-28-cloud-amd64``."""
    root: Path
    """``data_root/kernels/<version>/``: the unpacked package."""
    bzimage: Path
    """``root/boot/vmlinuz-<version>``: what ``-kernel`` boots."""
    modules_dir: Path
    """``root/lib/modules/<version>``."""

    @classmethod
    def at(cls, root: Path, version: str) -> "GuestKernel":
        return cls(
            version=version,
            root=root,
            bzimage=root / "boot" / f"vmlinuz-{version}",
            modules_dir=root / "lib" / "modules" / version,
        )

    def is_complete(self) -> bool:
        return self.bzimage.is_file() and (self.modules_dir / "modules.dep").is_file()


def _version_key(v: str) -> list[tuple[int, object]]:
    """Sort key close to dpkg's ordering for kernel ABIs: numbers numerically, text as text."""
    key: list[tuple[int, object]] = []
    for part in re.findall(r"\d+|[A-Za-z]+|[^0-9A-Za-z]", v):
        key.append((1, int(part)) if part.isdigit() else (0, part))
    return key


def normalize_version(kernel_version: str) -> str:
    """``6.1.0-28`` / ``6.1.0-28-cloud-amd64`` / ``linux-image-6.1.0-28-cloud-amd64`` -> full
    ``uname -r``. Raise :class:`KernelError` for anything that is not a cloud-amd64 ABI."""
    v = kernel_version.strip()
    v = v.removeprefix("linux-image-")
    if not v.endswith("-" + FLAVOUR):
        if re.search(r"-[a-z]+-amd64$", v) or v.endswith("-amd64"):
            raise KernelError(
                f"kernel_version {kernel_version!r} is not a {FLAVOUR} kernel; trenvx boots Debian's "
                f"cloud kernel: give its ABI like '6.1.0-28' or 'auto'"
            )
        v = f"{v}-{FLAVOUR}"
    abi = v[: -len(FLAVOUR) - 1]
    if not ABI_RE.match(abi):
        raise KernelError(
            f"kernel_version {kernel_version!r} is not a Debian kernel ABI; use e.g. '6.1.0-28' "
            f"(see `apt-cache search linux-image-.*-cloud-amd64`) or 'auto'"
        )
    return v


def cached_kernels(data_root: DataRoot) -> list[GuestKernel]:
    """Complete kernels under ``data_root/kernels``, oldest first."""
    found = []
    if data_root.kernels.is_dir():
        for d in data_root.kernels.iterdir():
            if d.name.startswith(".") or not d.is_dir():
                continue
            k = GuestKernel.at(d, d.name)
            if k.is_complete():
                found.append(k)
    return sorted(found, key=lambda k: _version_key(k.version))


async def _apt_cloud_kernels() -> list[str]:
    """Versions (full uname -r) of every linux-image-*-cloud-amd64 apt knows, newest last."""
    _, out = await run("kernel", ["apt-cache", "pkgnames", "linux-image-"], timeout=120)
    versions = []
    for name in out.split():
        m = PKG_RE.match(name)
        if m and ABI_RE.match(m.group(1)) and "unsigned" not in name and "dbg" not in name:
            versions.append(f"{m.group(1)}-{FLAVOUR}")
    return sorted(set(versions), key=_version_key)


async def _apt_default_kernel() -> str | None:
    """The kernel the meta-package linux-image-cloud-amd64 depends on, if apt knows it."""
    rc, out = await run(
        "kernel", ["apt-cache", "depends", "--important", f"linux-image-{FLAVOUR}"], timeout=120, check=False
    )
    if rc != 0:
        return None
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Depends:"):
            name = line.split(":", 1)[1].strip()
            m = PKG_RE.match(name)
            if m and ABI_RE.match(m.group(1)):
                return f"{m.group(1)}-{FLAVOUR}"
    return None


async def _apt_update(log: Callable[[str], object]) -> None:
    log("kernel: apt knows no cloud kernel package; running apt-get update")
    # Unreachable third-party repositories make apt-get update exit non-zero while Debian's
    # own indexes were refreshed fine: judge by what apt knows afterwards.
    await run("kernel", ["apt-get", "update"], timeout=UPDATE_TIMEOUT, check=False)


async def resolve_version(data_root: DataRoot, kernel_version: str, log: Callable[[str], object]) -> str:
    if kernel_version and kernel_version != "auto":
        return normalize_version(kernel_version)
    cached = cached_kernels(data_root)
    if cached:
        return cached[-1].version
    known = await _apt_cloud_kernels()
    if not known:
        await _apt_update(log)
        known = await _apt_cloud_kernels()
    if not known:
        raise KernelError(
            f"apt knows no linux-image-*-{FLAVOUR} package even after apt-get update; check that a Debian "
            f"mirror is configured in /etc/apt/sources.list(.d) and reachable"
        )
    default = await _apt_default_kernel()
    if default and default in known:
        return default
    return known[-1]


async def ensure_kernel(data_root: DataRoot, kernel_version: str = "auto", log=print) -> GuestKernel:
    """Return the unpacked guest kernel, downloading and unpacking it first if needed."""
    if kernel_version and kernel_version != "auto":
        version = normalize_version(kernel_version)
        k = GuestKernel.at(data_root.kernels / version, version)
        if k.is_complete():
            return k
    else:
        cached = cached_kernels(data_root)
        if cached:
            return cached[-1]

    async with AsyncFileLock(data_root.kernels / ".lock"):
        version = await resolve_version(data_root, kernel_version, log)
        k = GuestKernel.at(data_root.kernels / version, version)
        if k.is_complete():  # another process finished it while we waited for the lock
            return k
        await _download_and_unpack(data_root, k, log)
        return k


async def _download_and_unpack(data_root: DataRoot, k: GuestKernel, log: Callable[[str], object]) -> None:
    pkg = f"linux-image-{k.version}"
    data_root.kernels.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{k.version}-", dir=data_root.kernels))
    try:
        dl = tmp / "deb"
        dl.mkdir()
        log(f"kernel: downloading {pkg}")
        argv = ["apt-get", "download", "-o", "APT::Sandbox::User=root", pkg]
        try:
            await run("kernel", argv, timeout=APT_TIMEOUT, cwd=dl)
        except CommandError as e:
            if "Unable to locate package" in e.output or "Can't select" in e.output or "No packages found" in e.output:
                await _apt_update(log)
                try:
                    await run("kernel", argv, timeout=APT_TIMEOUT, cwd=dl)
                except CommandError as e2:
                    raise KernelError(
                        f"apt cannot download {pkg}: {e2.message}\nlist the available cloud kernels with "
                        f"`apt-cache search linux-image-.*-cloud-amd64` and set kernel_version to one of them "
                        f"(or 'auto')"
                    ) from None
            else:
                raise KernelError(
                    f"apt-get download {pkg} failed; is a Debian mirror reachable? {e.message}"
                ) from None
        debs = sorted(dl.glob("*.deb"))
        if len(debs) != 1:
            raise KernelError(f"apt-get download {pkg} produced {len(debs)} .deb files in {dl}, expected one")
        root = tmp / "root"
        log(f"kernel: unpacking {debs[0].name}")
        await run("kernel", ["dpkg-deb", "-x", debs[0], root], timeout=600)
        staged = GuestKernel.at(root, k.version)
        if not staged.bzimage.is_file():
            raise KernelError(f"{debs[0].name} holds no boot/vmlinuz-{k.version}; is it a kernel image package?")
        if not staged.modules_dir.is_dir():
            raise KernelError(f"{debs[0].name} holds no lib/modules/{k.version}")
        if not (staged.modules_dir / "modules.dep").is_file():
            # Debian's package leaves modules.dep to depmod in its postinst; we do not install
            # the package, so write it from the modules' own `depends=` (what depmod reads too).
            log("kernel: writing modules.dep")
            await asyncio.to_thread(write_modules_dep, staged.modules_dir)
        if k.root.exists():  # an incomplete leftover: replace it
            shutil.rmtree(k.root)
        os.rename(root, k.root)
        log(f"kernel: {k.version} ready at {k.root}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


def module_name(path: str | Path) -> str:
    """``kernel/drivers/virtio/virtio_pci.ko.xz`` -> ``virtio_pci`` (dashes become underscores)."""
    name = Path(path).name
    for suf in MODULE_SUFFIXES:
        if name.endswith(suf):
            name = name[: -len(suf)]
            break
    return name.replace("-", "_")


def read_module(path: Path) -> bytes:
    """The ELF bytes of a kernel module, decompressing .ko.xz / .ko.gz / .ko.zst."""
    data = path.read_bytes()
    name = path.name
    if name.endswith(".xz"):
        import lzma

        return lzma.decompress(data)
    if name.endswith(".gz"):
        import gzip

        return gzip.decompress(data)
    if name.endswith(".zst"):
        import subprocess

        zstd = shutil.which("zstd")
        if not zstd:
            raise KernelError(f"{path} is zstd-compressed but the zstd program is missing; apt-get install zstd")
        return subprocess.run([zstd, "-dcq", str(path)], check=True, capture_output=True, timeout=60).stdout
    return data


def _modinfo_section(data: bytes) -> bytes:
    """The ``.modinfo`` section of an ELF64 little-endian module (the whole file if unparsable)."""
    import struct

    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return data
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    if not shoff or shstrndx >= shnum:
        return data

    def section(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, off, size = struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)
        return name, off, size

    _, stroff, _ = section(shstrndx)
    for i in range(shnum):
        name, off, size = section(i)
        end = data.find(b"\0", stroff + name)
        if data[stroff + name : end] == b".modinfo":
            return data[off : off + size]
    return data


def modinfo(data: bytes) -> dict[str, list[str]]:
    """The fields (``depends``, ``softdep``, ``name``, ...) of a module's .modinfo section."""
    info: dict[str, list[str]] = {}
    for entry in _modinfo_section(data).split(b"\0"):
        key, sep, val = entry.partition(b"=")
        if sep and key and key.isascii():
            info.setdefault(key.decode(), []).append(val.decode(errors="replace"))
    return info


def write_modules_dep(modules_dir: Path) -> None:
    """Write ``modules.dep`` (and ``modules.softdep`` if absent) for the modules under
    ``modules_dir``: each line ``path: deps...`` with the transitive dependencies, nearest last as
    modprobe expects (modprobe loads the list from the end)."""
    paths: dict[str, str] = {}
    direct: dict[str, list[str]] = {}
    softpre: dict[str, list[str]] = {}
    for p in sorted(modules_dir.rglob("*.ko*")):
        if not p.name.endswith(MODULE_SUFFIXES) or not p.is_file():
            continue
        rel = p.relative_to(modules_dir).as_posix()
        name = module_name(p)
        paths.setdefault(name, rel)
        info = modinfo(read_module(p))
        deps = [d.replace("-", "_") for v in info.get("depends", []) for d in v.split(",") if d]
        direct[name] = deps
        for sd in info.get("softdep", []):
            m = re.search(r"pre:\s*([^:]*?)(?:\s+post:|$)", sd)
            if m:
                softpre.setdefault(name, []).extend(x.replace("-", "_") for x in m.group(1).split())

    def closure(name: str) -> list[str]:
        order: list[str] = []
        seen: set[str] = set()

        def visit(n: str) -> None:
            for d in direct.get(n, []):
                if d in seen or d not in paths:
                    continue
                seen.add(d)
                visit(d)
                order.append(d)

        visit(name)
        return order  # dependencies first

    with open(modules_dir / "modules.dep.tmp", "w") as f:
        for name, rel in sorted(paths.items(), key=lambda kv: kv[1]):
            deps = closure(name)
            f.write(f"{rel}:" + "".join(f" {paths[d]}" for d in reversed(deps)) + "\n")
    os.replace(modules_dir / "modules.dep.tmp", modules_dir / "modules.dep")
    if softpre and not (modules_dir / "modules.softdep").exists():
        with open(modules_dir / "modules.softdep", "w") as f:
            for name, pre in sorted(softpre.items()):
                f.write(f"softdep {name} pre: {' '.join(pre)}\n")
