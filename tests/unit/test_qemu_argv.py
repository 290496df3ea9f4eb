"""The QEMU command line: what must match between a template's build and its restores."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from trenvx.vmm.base import DiskSpec, MachineSpec, VmmError, VmSpec
from trenvx.vmm.qemu import qemu_argv


def spec(shared: bool, disk: DiskSpec, accel: str = "tcg") -> VmSpec:
    m = MachineSpec(vcpu=2, mem_mb=256, accelerator=accel, kernel=Path("/k"), initrd=Path("/i"), cmdline="console=ttyS0")  # type: ignore[arg-type]
    return VmSpec(name="x", workdir=Path("/w"), machine=m, memory_file=Path("/mem"), memory_shared=shared, root_disk=disk)


def test_build_and_restore_differ_only_in_sharing_disk_and_incoming() -> None:
    build = qemu_argv(spec(True, DiskSpec(Path("/r.ext4"))), binary="q", incoming=False, qmp_fd=7)
    restore = qemu_argv(spec(False, DiskSpec(Path("/o.qcow2"), "qcow2")), binary="q", incoming=True, qmp_fd=7)
    assert "mem-path=/mem,share=on" in " ".join(build)
    assert "mem-path=/mem,share=off" in " ".join(restore)
    assert restore[-2:] == ["-incoming", "defer"] and "-incoming" not in build
    assert "-kernel" in build and "-kernel" not in restore, "a restore does not load the kernel again"
    diff = set(build) ^ set(restore)
    boot_only = {"-kernel", "/k", "-initrd", "/i", "-append", "console=ttyS0", "-incoming", "defer"}
    assert all(("share=" in a) or ("file=" in a) or a in boot_only for a in diff), diff


def test_accelerator_flags() -> None:
    tcg = " ".join(qemu_argv(spec(True, DiskSpec(Path("/r"))), binary="q", incoming=False, qmp_fd=3))
    kvm = " ".join(qemu_argv(spec(True, DiskSpec(Path("/r")), "kvm"), binary="q", incoming=False, qmp_fd=3))
    assert "tcg,tb-size=32" in tcg and "-cpu max" in tcg
    assert "-accel kvm" in kvm and "-cpu host" in kvm
    assert "q35" in tcg and "hostfwd=tcp:127.0.0.1:0-:49983" in tcg


def test_overlay_mode_maps_the_image_on_pmem_and_the_writable_layer_on_vda(tmp_path: Path) -> None:
    image = tmp_path / "rootfs.ext4"
    image.write_bytes(b"")
    os.truncate(image, 256 << 20)
    base = spec(False, DiskSpec(image, "raw", read_only=True))
    s = dataclasses.replace(base, root_on_pmem=True, scratch_disk=DiskSpec(tmp_path / "disk.qcow2", "qcow2"))
    argv = qemu_argv(s, binary="q", incoming=True, qmp_fd=3)
    line = " ".join(argv)
    assert f"memory-backend-file,id=pmem0,size={256 << 20},mem-path={image},share=on,readonly=on" in line
    assert "virtio-pmem-pci,memdev=pmem0" in line
    assert f"file={tmp_path / 'disk.qcow2'},format=qcow2" in line and f"file={image}" not in line
    assert argv[argv.index("-m") + 1] == "256M,slots=2,maxmem=512M"


def test_overlay_mode_refuses_an_unaligned_image_or_no_writable_layer(tmp_path: Path) -> None:
    image = tmp_path / "rootfs.ext4"
    image.write_bytes(b"x" * 4096)
    s = dataclasses.replace(spec(False, DiskSpec(image, "raw")), root_on_pmem=True, scratch_disk=DiskSpec(tmp_path / "d"))
    with pytest.raises(VmmError, match="multiple of 128 MiB"):
        qemu_argv(s, binary="q", incoming=True, qmp_fd=3)
    with pytest.raises(VmmError, match="scratch disk"):
        qemu_argv(dataclasses.replace(s, scratch_disk=None), binary="q", incoming=True, qmp_fd=3)
