"""Kernel module resolution, the cpio writer and the initramfs init script (no VM, no network)."""

from __future__ import annotations

import io
import lzma
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from trenvx.kernel.debian import (
    GuestKernel,
    module_name,
    modinfo,
    normalize_version,
    read_module,
    write_modules_dep,
)
from trenvx.kernel.initramfs import (
    INIT_SCRIPT,
    CpioWriter,
    _is_static_elf,
    _write_cpio,
    parse_softdeps,
    resolve_load_order,
)
from trenvx.build_errors import InitramfsError, KernelError

MODULES_DEP = """\
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/block/virtio_blk.ko.xz: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/net/core/failover.ko:
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/char/virtio_console.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/char/hw_random/virtio-rng.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/nvdimm/libnvdimm.ko:
kernel/drivers/nvdimm/nd_btt.ko: kernel/drivers/nvdimm/libnvdimm.ko
kernel/drivers/nvdimm/nd_pmem.ko: kernel/drivers/nvdimm/nd_btt.ko kernel/drivers/nvdimm/libnvdimm.ko
kernel/drivers/nvdimm/nd_virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/nvdimm/virtio_pmem.ko: kernel/drivers/nvdimm/nd_virtio.ko kernel/drivers/nvdimm/libnvdimm.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_balloon.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/fs/fuse/virtiofs.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko kernel/fs/fuse/fuse.ko
"""
MODULES_BUILTIN = "kernel/fs/ext4/ext4.ko\nkernel/fs/jbd2/jbd2.ko\nkernel/crypto/crc32c_generic.ko\n"


def names(plan):
    return [n for n, _, _ in plan.load]


def test_load_order_respects_dependencies():
    plan = resolve_load_order(MODULES_DEP, MODULES_BUILTIN)
    order = names(plan)
    deps = {
        "virtio": ["virtio_ring"],
        "virtio_pci": ["virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_ring"],
        "virtio_blk": ["virtio"],
        "virtio_net": ["net_failover", "failover", "virtio"],
        "net_failover": ["failover"],
        "nd_pmem": ["nd_btt", "libnvdimm"],
        "virtio_pmem": ["nd_virtio", "libnvdimm", "virtio"],
    }
    for mod, ds in deps.items():
        for d in ds:
            assert order.index(d) < order.index(mod), f"{d} must load before {mod}: {order}"
    assert len(order) == len(set(order)), "each module once"
    # only the closure of what we asked for: fuse/virtiofs are not in it
    assert "virtiofs" not in order and "fuse" not in order
    # virtio-rng.ko is named virtio_rng; the compressed virtio_blk keeps its path
    assert "virtio_rng" in order
    assert dict((n, p) for n, p, _ in plan.load)["virtio_blk"] == "kernel/drivers/block/virtio_blk.ko.xz"


def test_builtin_and_missing_optional_are_skipped():
    plan = resolve_load_order(MODULES_DEP, MODULES_BUILTIN)
    assert "ext4" in plan.builtin
    assert "ext4" not in names(plan)
    assert "vmgenid" in plan.missing_optional


def test_required_flag_propagates_to_dependencies():
    plan = resolve_load_order(MODULES_DEP, MODULES_BUILTIN)
    req = {n: r for n, _, r in plan.load}
    assert req["virtio_ring"] and req["virtio_pci"] and req["failover"]
    assert not req["virtio_balloon"] and not req["libnvdimm"] and not req["nd_btt"]


def test_missing_required_module_is_an_error():
    with pytest.raises(InitramfsError, match="ext4"):
        resolve_load_order(MODULES_DEP, "")  # ext4 neither a module nor built in


def test_ext4_as_module_with_soft_dependency():
    dep = MODULES_DEP + (
        "kernel/fs/ext4/ext4.ko: kernel/fs/jbd2/jbd2.ko kernel/fs/mbcache.ko kernel/lib/crc16.ko\n"
        "kernel/fs/jbd2/jbd2.ko:\nkernel/fs/mbcache.ko:\nkernel/lib/crc16.ko:\nkernel/crypto/crc32c_generic.ko:\n"
    )
    plan = resolve_load_order(dep, "", softdeps="softdep ext4 pre: crc32c_generic\n")
    order = names(plan)
    for d in ("jbd2", "mbcache", "crc16", "crc32c_generic"):
        assert order.index(d) < order.index("ext4")


def test_cycle_is_reported():
    dep = "a.ko: b.ko\nb.ko: a.ko\n"
    with pytest.raises(InitramfsError, match="cycle"):
        resolve_load_order(dep, "", [("a", True)])


def test_unknown_dependency_is_reported():
    with pytest.raises(InitramfsError, match="neither"):
        resolve_load_order("a.ko: zz.ko\n", "", [("a", True)])


def test_parse_softdeps():
    assert parse_softdeps("softdep ext4 pre: crc32c post: foo\nsoftdep x-y pre: a b\n") == {
        "ext4": ["crc32c"],
        "x_y": ["a", "b"],
    }


def test_module_name():
    assert module_name("kernel/drivers/char/hw_random/virtio-rng.ko") == "virtio_rng"
    assert module_name("a/b/virtio_blk.ko.zst") == "virtio_blk"
    assert module_name("x.ko.xz") == "x"


def _fake_module(name: str, depends: str) -> bytes:
    # not an ELF: modinfo() falls back to scanning the whole file
    return b"\0junk\0" + f"name={name}\0depends={depends}\0license=GPL\0".encode()


def test_write_modules_dep_from_modinfo(tmp_path: Path):
    md = tmp_path / "lib/modules/1.0"
    (md / "kernel").mkdir(parents=True)
    (md / "kernel/a.ko").write_bytes(_fake_module("a", ""))
    (md / "kernel/b.ko.xz").write_bytes(lzma.compress(_fake_module("b", "a")))
    (md / "kernel/c-d.ko").write_bytes(_fake_module("c_d", "b"))
    write_modules_dep(md)
    plan = resolve_load_order((md / "modules.dep").read_text(), "", [("c_d", True)])
    assert names(plan) == ["a", "b", "c_d"]
    assert modinfo(read_module(md / "kernel/b.ko.xz"))["depends"] == ["a"]


def test_normalize_version():
    assert normalize_version("6.1.0-28") == "6.1.0-28-cloud-amd64"
    assert normalize_version("6.1.0-28-cloud-amd64") == "6.1.0-28-cloud-amd64"
    assert normalize_version("linux-image-6.12.117+deb12-cloud-amd64") == "6.12.117+deb12-cloud-amd64"
    for bad in ("6.1.0-28-amd64", "latest", "6.12"):
        with pytest.raises(KernelError):
            normalize_version(bad)


def test_guest_kernel_paths(tmp_path: Path):
    k = GuestKernel.at(tmp_path / "v", "6.1.0-1-cloud-amd64")
    assert k.bzimage == tmp_path / "v/boot/vmlinuz-6.1.0-1-cloud-amd64"
    assert k.modules_dir == tmp_path / "v/lib/modules/6.1.0-1-cloud-amd64"
    assert not k.is_complete()


def _read_newc(data: bytes) -> dict[str, tuple[int, bytes, tuple[int, int]]]:
    out = {}
    f = io.BytesIO(data)
    while True:
        hdr = f.read(110)
        assert hdr[:6] == b"070701"
        fields = [int(hdr[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        mode, size, rmaj, rmin, namesize = fields[1], fields[6], fields[9], fields[10], fields[11]
        name = f.read(namesize)[:-1].decode()
        f.read(-(110 + namesize) % 4)
        body = f.read(size)
        f.read(-size % 4)
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, body, (rmaj, rmin))


def test_cpio_writer_layout(tmp_path: Path):
    out = tmp_path / "i.cpio"
    _write_cpio(out, b"#!/bin/busybox sh\n", b"BB", [("virtio", b"MOD", True), ("balloon", b"B", False)])
    entries = _read_newc(out.read_bytes())
    assert stat.S_ISCHR(entries["dev/console"][0]) and entries["dev/console"][2] == (5, 1)
    assert entries["init"][0] & 0o777 == 0o755 and entries["init"][1].startswith(b"#!")
    assert stat.S_ISLNK(entries["bin/sh"][0]) and entries["bin/sh"][1] == b"busybox"
    assert entries["lib/modules/virtio.ko"][1] == b"MOD"
    assert entries["etc/trenvx/modules"][1] == b"virtio 1\nballoon 0\n"
    for d in ("proc", "sys", "dev", "newroot"):
        assert stat.S_ISDIR(entries[d][0])
    assert not list(tmp_path.glob("*.tmp*"))


@pytest.mark.skipif(shutil.which("cpio") is None, reason="cpio not installed")
def test_cpio_readable_by_gnu_cpio(tmp_path: Path):
    out = tmp_path / "i.cpio"
    with open(out, "wb") as f:
        w = CpioWriter(f)
        w.dir("d")
        w.file("d/x", b"hello" * 3, 0o600)
        w.trailer()
    listing = subprocess.run(["cpio", "-it"], stdin=open(out, "rb"), capture_output=True, text=True, check=True)
    assert listing.stdout.split() == ["d", "d/x"]


def test_static_elf_detection():
    busybox = Path("/bin/busybox")
    if busybox.exists():
        assert _is_static_elf(busybox.read_bytes())
    assert not _is_static_elf(Path("/bin/ls").read_bytes())
    assert not _is_static_elf(b"not an elf")


@pytest.mark.skipif(not Path("/bin/busybox").exists(), reason="busybox-static not installed")
def test_init_script_parses():
    subprocess.run(["/bin/busybox", "sh", "-n", str(INIT_SCRIPT)], check=True)
    text = INIT_SCRIPT.read_text()
    assert "TRENVX-INIT-ERROR:" in text and "TRENVX-PROBE-OK" in text
    assert "/opt/trenvx/init" in text
    # never an interactive shell on failure
    assert "$B sh\n" not in text and "exec sh" not in text
