"""A checkpoint of a running QEMU VM, taken in place: the VM stops for it and runs on.

What a checkpoint is, in ``dest`` (a directory the caller made, mode 0700):

- ``memory``: ONE full memory file (read-only, 0400): the base memory file the VM's RAM was
  mapped from (its template's), with every page of the VM's RAM written over it
  (:func:`~trenvx.vmm.qemu_stream.merge_into`; a sparse file: zero pages are holes). VMs restored from it map it ``share=off``, like a
  template's: they share its pages in the host's page cache and copy only the pages they write.
- ``vmstate`` (0600): the migration stream without any page of that RAM block: device state, and
  the small RAM blocks (firmware, ACPI tables) as they were.
- ``layer.qcow2``: the VM's disk as it was, an immutable qcow2 layer whose backing file is what
  the VM's disk was based on. A VM restored from the checkpoint gets its own overlay on it.
- ``layer-K.qcow2`` (a VM checkpointed before): the layers of the VM's earlier checkpoints that
  ``layer.qcow2`` stands on, by the relative names their headers give (second names again, no
  copy). The checkpoint is whole without the VM's directory: a VM's second checkpoint still
  starts VMs after the VM and its files are gone.

How, in order (the caller freezes the guest's filesystems before and thaws them after):

1. ``stop``: the vCPUs stop, QEMU flushes its disks.
2. The disk switch: the VM's disk file ``disk.qcow2`` gets a second name ``layer-N.qcow2``; a new
   empty overlay ``top-N.qcow2`` whose backing file is ``layer-N.qcow2`` (a name relative to
   the overlay's directory, so the same header is right in a checkpoint's directory) becomes the VM's disk
   (QMP ``blockdev-snapshot-sync``, ``mode: existing``: QEMU opens it with the open flags of the
   image it replaces, i.e. the drive's cache and discard modes); ``disk.qcow2`` is then made a
   name of the new overlay, so the disk path stays the VM's writable image for anything that
   opens it again (a restore after a pause to disk). QEMU keeps the layer open read-only: nothing
   writes to it again. Both names stay: QEMU reopens an image by the name it opened it with.
3. ``migrate`` into a file in ``dest``: every page of the RAM (a VM's RAM mapped ``share=off`` is
   all in the stream; QEMU sends zero pages as one byte), device state. A local write: about
   0.1 s for a 256 MiB guest here.
4. ``cont`` (QEMU takes its disk images back after the migration and runs on). The pages of the
   RAM file the migration faulted into the VMM only to read them are given back
   (:mod:`.ram_pages`): without that the source's resident memory grows by most of its RAM.
5. While the VM runs, :func:`~trenvx.vmm.qemu_stream.merge_into` turns the stream into the memory file and the
   device state (under TCG here, ~0.6 s for 256 MiB: Python parses the stream).

Nothing is copied but the RAM (the memory file is the base's, reflinked where the filesystem can,
plus the pages); the disk is the layer the VM wrote until now, shared by name, never copied. The
cost of a checkpoint grows with the VM's RAM, not with its disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from .base import VmmError, VmState
from .qemu import QemuDriver, QemuVm
from .ram_pages import PAGE_SIZE as HOST_PAGE
from .ram_pages import file_pages_present, mapping_of, page_out
from .qemu_img import qcow2_backing_name, qemu_img
from .qemu_stream import StreamFormatError, StreamStats, merge_into

log = logging.getLogger(__name__)

DRIVE_ID = "root"
"""The ``-drive id=`` of the VM's writable disk (see :func:`trenvx.vmm.qemu.qemu_argv`)."""
MEMORY = "memory"
VMSTATE = "vmstate"
LAYER = "layer.qcow2"
BANDWIDTH = 64 << 30
"""``max-bandwidth`` (bytes/s) of the migration: QEMU's default (128 MiB/s) is for networks."""
STREAM = ".stream"
"""The migration stream, in ``dest`` until it is merged."""
FINALIZE_TIMEOUT_S = 30.0
MAX_LOCAL_LAYERS = 64
"""Earlier layers of one VM a checkpoint follows (a longer chain is a damaged header)."""


@dataclass
class Checkpoint:
    """The files of a checkpoint and what it cost."""

    vmstate: Path
    memory_file: Path
    layer: Path
    stats: StreamStats
    stopped_s: float = 0.0
    """How long the VM's vCPUs were stopped."""
    times: dict[str, float] = field(default_factory=dict)
    """Seconds of each step: ``disk`` (the switch), ``migrate`` (into a file), ``cont``, and, while
    the VM runs, ``release`` (the pages the migration read given back) and ``merge`` (the file into
    the memory file)."""
    released_bytes: int = 0
    """Bytes of the RAM file the VMM mapped only because the migration read them, given back."""
    local_layers: list[Path] = field(default_factory=list)
    """The VM's earlier layers ``layer`` stands on, linked beside it (``layer-K.qcow2``)."""

    @property
    def stored_bytes(self) -> int:
        return sum(p.stat().st_size for p in (self.vmstate, self.memory_file))


async def checkpoint(driver: QemuDriver, vm: QemuVm, *, base_memory: Path, dest: Path) -> Checkpoint:
    """Checkpoint ``vm`` (its RAM mapped from ``base_memory``) into ``dest``; see the module's text.

    The VM is stopped only for the disk switch and the migration into a file in ``dest`` (a
    local write of its RAM's non-zero pages); it runs again before that file is turned into the
    memory file. It runs again also when the checkpoint fails (then ``dest`` holds nothing of it;
    a disk switch already made stays: the VM's disk is one layer deeper, with the same content).
    Raises :class:`VmmError`."""
    disk = vm.spec.own_disk
    if disk.format != "qcow2" or disk.read_only:
        raise VmmError(f"VM {vm.spec.name}: its disk {disk.path} is {disk.format}"
                       f"{' and read-only' if disk.read_only else ''}; a checkpoint needs a writable qcow2 overlay")
    if vm.state not in (VmState.running, VmState.paused):
        raise VmmError(f"VM {vm.spec.name} is {vm.state.value}: only a running or paused VM can be checkpointed")
    was_running = vm.state is VmState.running
    times: dict[str, float] = {}
    memory_out, vmstate_out, layer_out = dest / MEMORY, dest / VMSTATE, dest / LAYER
    stream = dest / STREAM
    mapped = await asyncio.to_thread(_mapped_before, vm, base_memory)  # before the stop: it stays short
    t_stop = time.perf_counter()
    try:
        await vm.pause()
        try:
            t0 = time.perf_counter()
            layer = await switch_disk(vm, disk.path)
            times["disk"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            await _migrate_to_file(driver, vm, stream)
            times["migrate"] = time.perf_counter() - t0
        finally:
            if was_running:
                t0 = time.perf_counter()
                await vm.resume()
                times["cont"] = time.perf_counter() - t0
        stopped = time.perf_counter() - t_stop
        t0 = time.perf_counter()
        released = await asyncio.to_thread(_release_read_pages, vm, mapped)
        times["release"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        stats = await asyncio.to_thread(_merge_file, stream, vmstate_out, base_memory, memory_out)
        times["merge"] = time.perf_counter() - t0
        os.chmod(memory_out, 0o400)  # the driver maps only read-only memory files privately
        below = _link_layers(layer, layer_out)
    except StreamFormatError as e:
        _remove(vmstate_out, memory_out, layer_out, *_local_layers(layer, dest))
        raise VmmError(f"checkpoint of {vm.spec.name}: its migration stream: {e}") from None
    except BaseException:
        _remove(vmstate_out, memory_out, layer_out, *_local_layers(layer, dest))
        raise
    finally:
        stream.unlink(missing_ok=True)
    return Checkpoint(vmstate_out, memory_out, layer_out, stats, stopped, times, released, below)


def _mapped_before(vm: QemuVm, base_memory: Path) -> tuple[int, bytearray] | None:
    """Where the VM's RAM file is mapped and which of its pages the VMM maps, before the migration
    reads them all (None where that cannot be read: nothing is given back then). A page the guest
    faults in after this is given back too: it comes back on its next use."""
    try:
        found = mapping_of(vm.pid, base_memory)
        if found is None:
            return None
        return found[0], file_pages_present(vm.pid, *found)
    except OSError as e:
        log.info("checkpoint of %s: cannot read the pages its VMM maps (%s); none will be given back", vm.spec.name, e)
        return None


def _release_read_pages(vm: QemuVm, before: tuple[int, bytearray] | None) -> int:
    """Give back the file pages the migration faulted in (see :mod:`.ram_pages`); bytes advised."""
    if before is None:
        return 0
    start, was = before
    try:
        now = file_pages_present(vm.pid, start, len(was) * HOST_PAGE)
        fresh = bytearray(a & ~b & 1 for a, b in zip(now, was))
        return page_out(vm.pid, start, fresh)
    except OSError as e:
        log.info("checkpoint of %s: the pages its migration read were not given back: %s", vm.spec.name, e)
        return 0


def _remove(*paths: Path) -> None:
    for p in paths:
        p.unlink(missing_ok=True)
        p.with_name(p.name + ".part").unlink(missing_ok=True)


async def switch_disk(vm: QemuVm, disk: Path) -> Path:
    """Make the VM's disk image ``disk`` an immutable layer under a new overlay (steps of the
    module's text; the VM must be stopped). Returns the layer's own name, ``layer-N.qcow2``."""
    blocks = await vm.execute("query-block")
    found = [b for b in blocks if b.get("device") == DRIVE_ID and b.get("inserted")]
    if not found:
        raise VmmError(f"VM {vm.spec.name} has no drive {DRIVE_ID!r} (query-block: {[b.get('device') for b in blocks]})")
    size = int(found[0]["inserted"]["image"]["virtual-size"])
    n = 1
    while disk.with_name(f"layer-{n}.qcow2").exists() or disk.with_name(f"top-{n}.qcow2").exists():
        n += 1
    layer, top = disk.with_name(f"layer-{n}.qcow2"), disk.with_name(f"top-{n}.qcow2")
    os.link(disk, layer)
    try:
        await qemu_img("create", "-q", "-u", "-f", "qcow2", "-F", "qcow2", "-b", layer.name, str(top), str(size))
        os.chmod(top, 0o600)
        owner = disk.stat()
        os.chown(top, owner.st_uid, owner.st_gid)  # a jailed VMM opens it as its own uid
        await vm.execute("blockdev-snapshot-sync", {
            "device": DRIVE_ID, "snapshot-file": str(top), "format": "qcow2", "mode": "existing",
        })
    except BaseException:
        top.unlink(missing_ok=True)
        layer.unlink(missing_ok=True)
        raise
    tmp = disk.with_name(f".{disk.name}.{n}.tmp")
    tmp.unlink(missing_ok=True)
    os.link(top, tmp)
    os.replace(tmp, disk)
    return layer


async def _migrate_to_file(driver: QemuDriver, vm: QemuVm, stream: Path) -> None:
    """Migrate the stopped VM into the file ``stream`` (0600): all of its RAM, device state."""
    await vm.execute(
        "migrate-set-capabilities",
        {"capabilities": [{"capability": "x-ignore-shared", "state": True}, {"capability": "events", "state": True}]},
    )
    await vm.execute("migrate-set-parameters", {"max-bandwidth": BANDWIDTH})
    fd = os.open(stream, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        await driver._send_fd(vm, fd, "checkpoint")
    finally:
        os.close(fd)  # QEMU has its own copy
    try:
        await driver._migrate_and_wait(vm, "migrate", {"uri": "fd:checkpoint"})
    except BaseException:
        with contextlib.suppress(Exception):  # an fd QEMU never used stays open in it
            await vm.execute("closefd", {"fdname": "checkpoint"}, timeout=5)
        raise
    await _wait_finalized(vm)


async def _wait_finalized(vm: QemuVm) -> None:
    """Wait until QEMU has left the run state ``finish-migrate``: its MIGRATION event says
    ``completed`` a moment before, and a ``cont`` in that moment is refused ("Migration is not
    finalized yet")."""
    deadline = time.monotonic() + FINALIZE_TIMEOUT_S
    while True:
        status = (await vm.execute("query-status")).get("status")
        if status != "finish-migrate":
            return
        if time.monotonic() > deadline:
            raise VmmError(f"VM {vm.spec.name} stayed in finish-migrate {FINALIZE_TIMEOUT_S:.0f}s after its migration")
        await asyncio.sleep(0.005)


def _merge_file(stream: Path, vmstate_out: Path, base_memory: Path, memory_out: Path) -> StreamStats:
    """The merge's thread: the stream file into the memory file and the device state."""
    fd = os.open(vmstate_out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with open(stream, "rb", buffering=1 << 20) as src, os.fdopen(fd, "wb", buffering=1 << 20) as dst:
        stats = merge_into(src, dst, base_memory, memory_out)
        dst.flush()
        os.fsync(dst.fileno())
    return stats


def _local_layers(layer: Path, dest: Path) -> list[Path]:
    """The names in ``dest`` of the layers below ``layer`` that live beside it: those its chain
    names relatively (a VM's earlier layers, :func:`switch_disk`), down to the first absolute name
    (a template's image or a checkpoint's layer, which have names of their own)."""
    out: list[Path] = []
    current = layer
    while len(out) < MAX_LOCAL_LAYERS:
        name = qcow2_backing_name(current)
        if not name or os.path.isabs(name) or "/" in name or name in (LAYER, ".", ".."):
            break
        current = layer.parent / name
        out.append(dest / name)
    return out


def _link_layers(layer: Path, layer_out: Path) -> list[Path]:
    """``layer`` as ``layer_out``, and each earlier layer of the VM it stands on beside it under
    the relative name its header gives, so the chain resolves in ``layer_out``'s directory.
    Returns the earlier layers' new names."""
    _link_or_copy(layer, layer_out)
    below = _local_layers(layer, layer_out.parent)
    for name in below:
        _link_or_copy(layer.parent / name.name, name)
    return below


def _link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` as a second name of ``src`` (the same inode: no copy), or a copy across filesystems."""
    try:
        os.link(src, dst)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        shutil.copyfile(src, dst)
        os.chmod(dst, 0o600)
