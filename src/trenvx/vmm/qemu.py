"""The QEMU driver: q35 machines whose guest RAM is a file, snapshots without copying that RAM.

- Build: guest RAM is ``memory-backend-file,share=on``: the guest writes straight into the file.
- Snapshot: ``stop``, migration capability ``x-ignore-shared`` (RAM stays in its file, only
  device state, a few hundred KB, is written), ``migrate`` to a file descriptor.
- Restore: no kernel or initrd (they are in the snapshot's RAM); the same RAM file with ``share=off`` (``MAP_PRIVATE``: pages come from the host page
  cache, shared by every sandbox, and are copied only when a guest writes one), a process started
  with ``-incoming defer``, ``migrate-incoming`` from a file descriptor, then ``cont``.
- Save to disk (a sandbox's pause): ``stop``, ``migrate`` into a pipe whose other end
  :func:`~trenvx.vmm.qemu_stream.filter_against` reads, keeping only the pages that differ from
  the template's memory file: device state + the pages the sandbox wrote. Restored like a
  template's snapshot, over the same file.

QMP is spoken with the ``qemu.qmp`` library over a socketpair handed to QEMU at start (no socket
file to wait for); a second QMP socket in the VM's workdir lets a restarted server re-attach.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient
from qemu.qmp.error import QMPError

from ..config import AGENT_PORT
from .jail import VmmJail
from .base import AgentEndpoint, SnapshotFiles, StageTimes, TcpEndpoint, Vm, VmmDriver, VmmError, VmSpec, VmState
from .preload import ensure_keep_readonly_files
from .process import VmmProcess
from .qemu_stream import StreamFormatError, StreamStats, filter_against

log = logging.getLogger(__name__)

GUEST_IP = "10.0.2.15"
GUEST_NET = f"{GUEST_IP}/24,10.0.2.2"
GUEST_DNS = "10.0.2.3"
"""Guest address and gateway of QEMU user networking; the initramfs configures eth0 with it."""

_HOSTFWD_RE = re.compile(rf"HOST_FORWARD\]\s+\d+\s+127\.0\.0\.1\s+(\d+)\s+{re.escape(GUEST_IP)}\s+{AGENT_PORT}")
QMP_TIMEOUT_S = 30.0
_UNIX_PATH_MAX = 108  # sun_path, including the terminating NUL
MIGRATION_TIMEOUT_S = 120.0
SAVE_BANDWIDTH = 64 << 30
"""``max-bandwidth`` of a save to disk (bytes/s): QEMU's default (128 MiB/s) throttles migrations
over networks, and a save goes to a local file."""
QUIT_TIMEOUT_S = 20.0
FILTER_DRAIN_TIMEOUT_S = 30.0


MIB = 1 << 20
PMEM_ALIGN = 128 * MIB
"""virtio-pmem regions are hot-plugged memory: the guest maps them in memory-block units (128 MiB
on x86), so an image on virtio-pmem is sized to a multiple of that."""


def pmem_size(path: Path) -> int:
    """The size of an image attached as virtio-pmem; it must be a multiple of :data:`PMEM_ALIGN`."""
    size = path.stat().st_size
    if size == 0 or size % PMEM_ALIGN:
        raise VmmError(
            f"{path} is {size} bytes; an image on virtio-pmem must be a non-zero multiple of "
            f"{PMEM_ALIGN // MIB} MiB (rebuild the template: its builder pads the image)"
        )
    return size


def qemu_argv(spec: VmSpec, *, binary: str, incoming: bool, qmp_fd: int, tap_fd: int = -1,
              jail_args: list[str] | None = None) -> list[str]:
    """The QEMU command line for ``spec``. Build and restore differ only in share= and -incoming.

    ``tap_fd`` >= 0: the guest NIC's tap is that descriptor (a jailed VMM: its jail opens the tap
    and enters the namespace, no ``nsenter``); ``jail_args``: the jail's QEMU options (``-sandbox``)."""
    m = spec.machine
    if m.accelerator == "kvm":
        accel = ["-accel", "kvm", "-cpu", "host,-arch-capabilities"]
    else:
        accel = ["-accel", f"tcg,tb-size={m.tcg_tb_size_mb}", "-cpu", "max"]
    share = "on" if spec.memory_shared else "off"
    memory = f"memory-backend-file,id=mem,size={m.mem_mb}M,mem-path={spec.memory_file},share={share}"
    if spec.anonymous_memory:
        memory = f"memory-backend-ram,id=mem,size={m.mem_mb}M"
    # The writable disk is the guest's /dev/vda: the root itself, or in overlay mode (root on
    # virtio-pmem) the upper layer.
    disk = spec.scratch_disk if spec.root_on_pmem else spec.root_disk
    if disk is None:
        raise VmmError(f"VM {spec.name}: a root on virtio-pmem needs a scratch disk for its writable layer")
    drive = f"file={disk.path},format={disk.format},if=none,id=root,cache=unsafe,discard=unmap,werror=report,rerror=report"
    if disk.read_only:
        drive += ",read-only=on"
    memory_size = f"{m.mem_mb}M"
    pmem: list[str] = []
    if spec.root_on_pmem:
        # The template's image, mapped read-only and shared: with DAX in the guest its pages are
        # the host's page cache pages of that one file, whatever the number of sandboxes.
        # x-ignore-shared leaves it out of snapshots, like the guest RAM file.
        size = pmem_size(spec.root_disk.path)
        memory_size += f",slots=2,maxmem={m.mem_mb + size // MIB}M"
        pmem = [
            "-object", f"memory-backend-file,id=pmem0,size={size},mem-path={spec.root_disk.path},share=on,readonly=on",
            "-device", "virtio-pmem-pci,memdev=pmem0,id=pmemdev0",
        ]
    argv = [
        binary,
        "-name", f"trenvx-{spec.name}",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        *accel,
        "-smp", str(m.vcpu),
        "-m", memory_size,
        "-object", memory,
        "-machine", "q35,memory-backend=mem,smbus=off,sata=off,vmport=off",
        "-serial", f"file:{spec.workdir / 'console.log'}",
        "-drive", drive, "-device", "virtio-blk-pci,drive=root,id=rootdev",
        "-netdev", netdev_arg(spec, tap_fd),
        "-device", "virtio-net-pci,netdev=net0,id=nic0,mac=52:54:00:12:34:56",
        "-device", "vmgenid,id=vmgen0,guid=auto",
        "-device", "virtio-rng-pci,id=rng0",
        # The guest gives the host back memory it freed (free page reporting; the initramfs sets
        # 16 KiB blocks).
        "-device", "virtio-balloon-pci,id=balloon0,free-page-reporting=on",
        "-chardev", f"socket,id=qmpfd,fd={qmp_fd}",
        "-mon", "chardev=qmpfd,mode=control",
        "-qmp", f"unix:{spec.workdir / 'qmp.sock'},server=on,wait=off",
        *pmem,
        *(jail_args or []),
    ]
    if spec.netns and jail_args is None:
        # QEMU runs inside the sandbox's network namespace: it opens the tap there, and its sockets
        # are that namespace's. (It still runs as root: a QEMU taken over by its guest could
        # setns back out; dropping its privileges is the jailed VMM's work.) nsenter execs QEMU:
        # same pid.
        argv = ["nsenter", f"--net=/run/netns/{spec.netns}", "--", *argv]
    if incoming:
        # The kernel and initrd are already in the snapshot's RAM: loading them again would only
        # cost each sandbox ~14 MiB of private memory (measured), so a restore omits them.
        argv += ["-incoming", "defer"]
    else:
        argv += ["-kernel", str(m.kernel), "-initrd", str(m.initrd), "-append", m.cmdline]
    return argv


def netdev_arg(spec: VmSpec, tap_fd: int = -1) -> str:
    """The guest NIC's backend: the slot's tap, or user networking with the agent's port forward
    (``restrict=on`` for isolated sandboxes: the guest reaches neither the host nor the outside).

    The backend is part of the snapshot (user networking saves a ``slirp`` section): a template is
    restored with the kind of backend it was built with."""
    if spec.net_tap and tap_fd >= 0:
        return f"tap,id=net0,fd={tap_fd}"
    if spec.net_tap:
        return f"tap,id=net0,ifname={spec.net_tap},script=no,downscript=no"
    restrict = ",restrict=on" if spec.isolated_user_net else ""
    return f"user,id=net0{restrict},hostfwd=tcp:127.0.0.1:{spec.agent_host_port}-:{AGENT_PORT}"


def _find_forward(usernet: object, guest_port: int) -> int:
    """The host port of the TCP forward to ``guest_port`` in the text of ``info usernet``, else 0."""
    pat = rf"HOST_FORWARD\]\s+\d+\s+127\.0\.0\.1\s+(\d+)\s+{re.escape(GUEST_IP)}\s+{guest_port}\b"
    m = re.search(pat, str(usernet))
    return int(m.group(1)) if m else 0


class QemuVm(Vm):
    def __init__(self, spec: VmSpec, process: VmmProcess, qmp: QMPClient, state: VmState,
                 jail: VmmJail | None = None) -> None:
        self.spec = spec
        self.jail = jail
        """The VMM's jail (uid, cgroup), released once the process is reaped; None: not jailed."""
        self.agent_port = spec.agent_host_port
        self.process = process
        self.qmp = qmp
        self.state = state

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def agent_endpoint(self) -> AgentEndpoint:
        if self.spec.guest_address:
            return TcpEndpoint(self.spec.guest_address, AGENT_PORT)
        return TcpEndpoint("127.0.0.1", self.agent_port)

    def is_alive(self) -> bool:
        return self.process.is_alive()

    async def wait_exit(self) -> int:
        return await self.process.wait()

    async def execute(self, cmd: str, args: dict[str, Any] | None = None, timeout: float = QMP_TIMEOUT_S) -> Any:
        try:
            return await asyncio.wait_for(self.qmp.execute(cmd, args), timeout)
        except asyncio.TimeoutError:
            raise VmmError(f"QEMU (pid {self.pid}) did not answer QMP {cmd} within {timeout:.0f}s") from None
        except QMPError as e:
            raise VmmError(f"QMP {cmd} failed on QEMU pid {self.pid}: {e}; {self._exit_hint()}") from e

    def _exit_hint(self) -> str:
        if self.is_alive():
            return "QEMU is still running"
        return f"QEMU exited with {self.process.returncode}: {self.process.output_tail(5)}"

    async def pause(self) -> None:
        await self.execute("stop")
        self.state = VmState.paused

    async def resume(self) -> None:
        await self.execute("cont")
        self.state = VmState.running

    async def quit(self, timeout: float = QUIT_TIMEOUT_S) -> None:
        """End QEMU cleanly (QMP ``quit``: its disk images are closed, qcow2 metadata written), or
        kill it when it does not end within ``timeout``."""
        if self.is_alive():
            try:
                await self.execute("quit", timeout=min(timeout, QMP_TIMEOUT_S))
            except VmmError:
                pass  # the connection may close before the answer: the exit below is what counts
            try:
                await asyncio.wait_for(self.process.wait(), timeout)
            except asyncio.TimeoutError:
                log.warning("QEMU (pid %d) of %s did not quit within %.0f s; killing it", self.pid, self.spec.name, timeout)
        await self.kill()

    async def forward_port(self, guest_port: int) -> int:
        """A host port on 127.0.0.1 forwarded to ``guest_port`` of the guest (added once, then reused).
        With a tap network there is no forward: the port is reached at the guest's address."""
        if self.spec.guest_address:
            return guest_port
        if guest_port == AGENT_PORT:
            return self.agent_port
        found = _find_forward(await self.execute("human-monitor-command", {"command-line": "info usernet"}), guest_port)
        if found:
            return found
        out = await self.execute(
            "human-monitor-command", {"command-line": f"hostfwd_add net0 tcp:127.0.0.1:0-:{guest_port}"}
        )
        if str(out).strip():
            raise VmmError(f"cannot forward guest port {guest_port} of {self.spec.name}: {str(out).strip()}")
        found = _find_forward(await self.execute("human-monitor-command", {"command-line": "info usernet"}), guest_port)
        if not found:
            raise VmmError(f"the forward of guest port {guest_port} of {self.spec.name} did not appear in info usernet")
        return found

    async def kill(self) -> None:
        try:
            await self.qmp.disconnect()
        except Exception:  # noqa: BLE001 - the process is going away anyway
            pass
        await self.process.kill()
        self.state = VmState.exited
        if self.jail is not None:
            await asyncio.to_thread(self.jail.release)


class QemuDriver(VmmDriver):
    name = "qemu"
    device_layout = "4: virtio-balloon free page reporting"
    root_on_pmem = True
    free_page_reporting = True
    # Free page reporting under QEMU 7.2 needs preload/keep_readonly_files.c: QEMU 7.2 discards a
    # reported page of a file-backed RAM block with fallocate(PUNCH_HOLE) on the file even when
    # the mapping is private, so one sandbox's freed pages became holes in the template's memory
    # file and every later sandbox read zeros there (measured: numpy failed to import in all
    # restores after one sandbox dropped its page cache). The library turns hole punches into
    # read-only files into no-ops; the driver refuses a private RAM file that is writable.

    def __init__(self, binary: str = "qemu-system-x86_64", *, cache_dir: Path | None = None) -> None:
        self.binary = binary
        self.cache_dir = cache_dir or Path("/var/lib/trenvx/cache")

    async def _environment(self, spec: VmSpec) -> dict[str, str]:
        """QEMU's environment: for a RAM file mapped privately (a sandbox's restore), the library
        that keeps the template's file intact (see above)."""
        if spec.memory_shared or spec.anonymous_memory:
            return {}
        try:
            writable = spec.memory_file.stat().st_mode & 0o222
        except OSError as e:
            raise VmmError(f"cannot read the memory file {spec.memory_file} of {spec.name}: {e}") from None
        if writable:
            raise VmmError(
                f"the memory file {spec.memory_file} is writable; a sandbox maps its template's memory "
                "privately, and only a read-only file (chmod a-w; published templates are) is safe from "
                "QEMU's discards of freed guest pages"
            )
        library = str(await ensure_keep_readonly_files(self.cache_dir))
        preloaded = os.environ.get("LD_PRELOAD", "")
        return {"LD_PRELOAD": f"{preloaded}:{library}" if preloaded else library,
                "TRENVX_PRIVATE_RAM": str(spec.memory_file)}

    async def _spawn(self, spec: VmSpec, *, incoming: bool) -> QemuVm:
        qmp_path = str(spec.workdir / "qmp.sock")
        if len(qmp_path.encode()) >= _UNIX_PATH_MAX:
            raise VmmError(
                f"the VM's control socket path {qmp_path} is {len(qmp_path.encode())} bytes, over the "
                f"{_UNIX_PATH_MAX - 1}-byte limit of UNIX sockets; choose a shorter data_root"
            )
        spec.workdir.mkdir(parents=True, exist_ok=True)
        env = await self._environment(spec)
        jail = await asyncio.to_thread(self._jail, spec, env) if spec.jail is not None else None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # A jailed VMM's tap is opened by its jail inside the namespace onto this descriptor number.
        tap_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC) if jail is not None and spec.net_tap else -1
        try:
            argv = qemu_argv(spec, binary=self.binary, incoming=incoming, qmp_fd=theirs.fileno(), tap_fd=tap_fd,
                             jail_args=jail.qemu_args() if jail is not None else None)
            process = await VmmProcess.spawn(
                argv, spec.workdir / "vmm.log", pass_fds=[theirs.fileno(), *([tap_fd] if tap_fd >= 0 else [])],
                kill_with_owner=spec.kill_with_owner,
                env=jail.environment(env) if jail is not None else env, clean_env=jail is not None,
                preexec=jail.preexec(kill_with_owner=spec.kill_with_owner, tap_fd=tap_fd) if jail is not None else None,
            )
        except BaseException:
            ours.close()
            if jail is not None:
                jail.release()
            raise
        finally:
            theirs.close()
            if tap_fd >= 0:
                os.close(tap_fd)
        qmp = QMPClient(spec.name)
        try:
            await asyncio.wait_for(qmp.connect(ours), QMP_TIMEOUT_S)
        except BaseException as e:  # incl. cancellation (a pool closing): the process must not outlive us
            ours.close()
            await process.kill()
            if jail is not None:
                jail.release()
            if isinstance(e, (asyncio.TimeoutError, QMPError, OSError)):
                raise VmmError(
                    f"QEMU for {spec.name} did not come up (exit {process.returncode}): {process.output_tail(10) or e}"
                ) from None
            raise
        vm = QemuVm(spec, process, qmp, VmState.incoming if incoming else VmState.running, jail)
        if spec.guest_address:
            vm.agent_port = AGENT_PORT
        elif not spec.agent_host_port:
            try:
                vm.agent_port = await self._forwarded_port(vm)
            except BaseException:
                await vm.kill()
                raise
        return vm

    @staticmethod
    def _jail(spec: VmSpec, env: dict[str, str]) -> VmmJail:
        """The jail of ``spec``'s VMM (see :mod:`.jail`): it owns its sandbox directory and its
        writable disk, and reads the files it maps (memory file, backing chain, pmem image, the
        preload library)."""
        assert spec.jail is not None
        own = spec.own_disk
        own_files = [own.path] if not own.read_only else []
        read = [] if spec.anonymous_memory else [spec.memory_file]
        if own.read_only:
            read.append(own.path)
        if spec.root_on_pmem or spec.root_disk.read_only:
            read.append(spec.root_disk.path)
        read += [Path(p) for p in env.get("LD_PRELOAD", "").split(":") if p]
        read += [p for p in (spec.machine.kernel, spec.machine.initrd) if str(p) not in ("", ".")]  # a cold boot
        own_dirs = sorted({spec.workdir, *(p.parent for p in own_files)}, key=lambda p: len(p.parts))
        return VmmJail.prepare(
            spec.jail, spec.name, own_dirs=own_dirs, own_files=own_files, read_files=read,
            mem_mb=spec.machine.mem_mb, netns=spec.netns, tap=spec.net_tap,
        )

    async def _forwarded_port(self, vm: QemuVm) -> int:
        """The host port the kernel chose for the agent's forward (``hostfwd`` with port 0)."""
        text = await vm.execute("human-monitor-command", {"command-line": "info usernet"})
        m = _HOSTFWD_RE.search(str(text))
        if not m:
            raise VmmError(f"cannot find the agent port forward of {vm.spec.name} in: {text!r}")
        return int(m.group(1))

    async def boot(self, spec: VmSpec) -> QemuVm:
        return await self._spawn(spec, incoming=False)

    async def snapshot(self, vm: Vm, dest: Path) -> SnapshotFiles:
        assert isinstance(vm, QemuVm)
        dest.mkdir(parents=True, exist_ok=True)
        vmstate = dest / "vmstate"
        await vm.pause()
        await vm.execute(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": "x-ignore-shared", "state": True}, {"capability": "events", "state": True}]},
        )
        fd = os.open(vmstate, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            await self._send_fd(vm, fd, "snapshot")
        finally:
            os.close(fd)
        await self._migrate_and_wait(vm, "migrate", {"uri": "fd:snapshot"})
        with open(vmstate, "rb+") as f:
            os.fsync(f.fileno())
        return SnapshotFiles(vmstate=vmstate, memory_file=vm.spec.memory_file)

    async def save_diff(self, vm: Vm, dest: Path, base_memory: Path) -> StreamStats:
        """Stop ``vm`` and write its whole state into ``dest`` (mode 0600) as device state + the
        pages of its RAM that differ from ``base_memory`` (its template's memory file).

        The VM stays stopped (its disks flushed and released by the migration): the caller ends it,
        or continues it (``resume``) if the save failed. Restore the file with :meth:`restore`
        and ``SnapshotFiles(dest, base_memory)`` into a VM prestarted like every sandbox's.
        """
        assert isinstance(vm, QemuVm)
        await vm.pause()
        await vm.execute(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": "x-ignore-shared", "state": True}, {"capability": "events", "state": True}]},
        )
        await vm.execute("migrate-set-parameters", {"max-bandwidth": SAVE_BANDWIDTH})
        part = dest.with_name(dest.name + ".part")
        out_fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        try:
            await self._send_fd(vm, write_fd, "save")
        except BaseException:
            for fd in (read_fd, out_fd):
                os.close(fd)
            part.unlink(missing_ok=True)
            raise
        finally:
            os.close(write_fd)  # QEMU holds the only write end now: its close is the stream's end
        filtering = asyncio.ensure_future(asyncio.to_thread(_filter_into, read_fd, out_fd, base_memory))
        try:
            try:
                await self._migrate_and_wait(vm, "migrate", {"uri": "fd:save"})
            except BaseException as e:
                # Unused, the fd stays open in QEMU (the reader would wait forever); used, QEMU closed it.
                with contextlib.suppress(Exception):
                    await vm.execute("closefd", {"fdname": "save"}, timeout=5)
                try:
                    await asyncio.wait_for(asyncio.shield(filtering), FILTER_DRAIN_TIMEOUT_S)
                except StreamFormatError as fe:  # the stream's fault, not the migration's: say so
                    raise VmmError(f"saving {vm.spec.name} failed: its migration stream: {fe}") from e
                except Exception:  # noqa: BLE001 - the migration's own error is the one to report
                    pass
                raise
            stats = await asyncio.wait_for(filtering, FILTER_DRAIN_TIMEOUT_S)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        os.replace(part, dest)
        return stats

    async def prestart(self, spec: VmSpec) -> QemuVm:
        vm = await self._spawn(spec, incoming=True)
        try:
            await vm.execute(
                "migrate-set-capabilities",
                {"capabilities": [{"capability": "x-ignore-shared", "state": True}, {"capability": "events", "state": True}]},
            )
        except BaseException:
            await vm.kill()
            raise
        return vm

    async def restore(self, vm: Vm, snapshot: SnapshotFiles, times: StageTimes | None = None) -> None:
        assert isinstance(vm, QemuVm)
        if vm.state is not VmState.incoming:
            raise VmmError(f"VM {vm.spec.name} is {vm.state.value}, not waiting for a snapshot")
        t0 = time.perf_counter()
        await self._load(vm, snapshot.vmstate)
        t1 = time.perf_counter()
        await vm.resume()
        if times is not None:
            times.steps["load"] = t1 - t0
            times.steps["resume"] = time.perf_counter() - t1

    async def full_snapshot(self, spec: VmSpec, snapshot: SnapshotFiles, dest: Path) -> SnapshotFiles:
        """A snapshot with the guest RAM inside its stream, made from ``snapshot`` (RAM in a file).

        The VM of ``spec`` (private RAM mapped from the file) loads ``snapshot`` without running
        and migrates everything, RAM included, into ``dest/vmstate-full``. Restoring it with
        ``anonymous_memory`` copies all of the guest RAM into each VM: the E2B-style baseline.
        """
        dest.mkdir(parents=True, exist_ok=True)
        vm = await self.prestart(spec)
        try:
            await self._load(vm, snapshot.vmstate)
            part = dest / "vmstate-full.part"
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                await self._send_fd(vm, fd, "full")
            finally:
                os.close(fd)
            await self._migrate_and_wait(vm, "migrate", {"uri": "fd:full"})
            os.replace(part, dest / "vmstate-full")
        finally:
            await vm.kill()
        return SnapshotFiles(vmstate=dest / "vmstate-full", memory_file=snapshot.memory_file)

    async def _load(self, vm: QemuVm, vmstate: Path) -> None:
        """Load device state (and RAM, if the stream has it) into a VM waiting with ``-incoming defer``."""
        fd = os.open(vmstate, os.O_RDONLY)
        try:
            await self._send_fd(vm, fd, "restore")
        finally:
            os.close(fd)
        await self._migrate_and_wait(vm, "migrate-incoming", {"uri": "fd:restore"})

    async def _send_fd(self, vm: QemuVm, fd: int, name: str) -> None:
        vm.qmp.send_fd_scm(fd)
        await vm.execute("getfd", {"fdname": name})

    async def _migrate_and_wait(self, vm: QemuVm, cmd: str, args: dict[str, Any]) -> None:
        """Run a migration command and wait for its MIGRATION event to say completed or failed."""
        with vm.qmp.listener("MIGRATION") as events:
            await vm.execute(cmd, args)
            deadline = time.monotonic() + MIGRATION_TIMEOUT_S
            while True:
                left = deadline - time.monotonic()
                try:
                    event = await asyncio.wait_for(events.get(), max(left, 0.001))
                except asyncio.TimeoutError:
                    raise VmmError(f"{cmd} on {vm.spec.name} did not finish within {MIGRATION_TIMEOUT_S:.0f}s") from None
                status = event.get("data", {}).get("status")
                if status == "completed":
                    return
                if status in ("failed", "cancelled"):
                    info = await vm.execute("query-migrate")
                    raise VmmError(
                        f"{cmd} on {vm.spec.name} {status}: {info.get('error-desc', 'no reason given')}; "
                        f"{vm.process.output_tail(5)}"
                    )


def _filter_into(read_fd: int, out_fd: int, base_memory: Path) -> StreamStats:
    """The filter's thread: the stream from ``read_fd`` into ``out_fd`` (fsynced), both closed at
    the end (closing the read end fails QEMU's migration if the filter stopped early)."""
    with os.fdopen(read_fd, "rb", buffering=1 << 20) as src, os.fdopen(out_fd, "wb", buffering=1 << 20) as dst:
        stats = filter_against(src, dst, base_memory)
        dst.flush()
        os.fsync(dst.fileno())
    return stats
