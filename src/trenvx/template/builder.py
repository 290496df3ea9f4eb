"""The build pipeline of a template: source -> root filesystem -> ext4 image -> boot -> snapshot.

Stages, each timed and reported:

1. ``kernel``      the guest kernel package and an initramfs that loads its virtio modules
2. ``accelerator`` KVM or TCG, chosen by probing (cached)
3. ``rootfs``      Dockerfile / image / debootstrap base -> a tree with the agent injected -> ext4
4. ``boot``        the VM started from the kernel; the guest agent's /health awaited
5. ``start``       ``start_cmd`` started, ``ready_cmd`` awaited
6. ``snapshot``    device state written; guest RAM stays in the template's memory file
7. ``publish``     manifest written, files made read-only, ``current`` switched atomically

Unchanged inputs skip the build (the input digest is in the manifest). Builds of one template
run one at a time, across processes (a flock on ``<name>/.build.lock``, held from the staging
directory's creation to the publication): a second build waits, logging "waiting for the build of
NAME by pid N", then reuses the first one's build when its inputs are the same (even with
``force``: that build was made after it was asked for), or builds after it. A failed build removes
its staging directory and kills its VM, and the error names the stage (with the guest console's
last lines when the guest is at fault).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from .. import __version__, diskspace
from ..filelock import AsyncFileLock
from ..config import INTERPRETER_PORT, Config, TemplateConfig, VmmType
from ..guest.client import AgentClient
from ..kernel.debian import ensure_kernel
from ..kernel.initramfs import BUILDER_VERSION as INITRAMFS_VERSION
from ..kernel.initramfs import INIT_SCRIPT, WANTED_MODULES, ensure_initramfs
from ..layout import DataRoot
from ..network import mode as network_mode
from ..network.slot import HostNetwork, NetworkSlot
from ..vmm import DiskSpec, MachineSpec, VmSpec, driver_for
from ..vmm.accel import choose_accelerator
from ..vmm.base import Vm
from ..vmm.qemu import GUEST_DNS, GUEST_NET, PMEM_ALIGN
from ..build_errors import BuildError
from . import integrity
from .image import make_empty_ext4, make_ext4_image, pad_to
from .accounts import Account, find_account
from .inject import check_python, guest_sources, init_script, inject_guest_files
from .tree import in_tree
from .rootfs import prepared_rootfs, rootfs_input_digest
from .store import MEMORY, ROOTFS, UPPER, MachineRecord, TemplateBuild, TemplateManifest, TemplateStore

log = logging.getLogger(__name__)

AGENT_SRC = Path(__file__).resolve().parent.parent / "guest" / "agent"
INTERPRETER_SRC = AGENT_SRC.parent / "interpreter"
INTERPRETER_PACKAGE = "trenvx_interpreter"
STAGES = ("kernel", "accelerator", "rootfs", "boot", "start", "snapshot", "publish")
T = TypeVar("T")
MiB = 1 << 20


class BuildReporter(Protocol):
    def stage_started(self, stage: str) -> None: ...
    def stage_finished(self, stage: str, seconds: float) -> None: ...
    def message(self, text: str) -> None: ...


class LogReporter:
    """Reports stages to the ``logging`` module (for servers and tests)."""

    def stage_started(self, stage: str) -> None:
        log.info("build stage %s ...", stage)

    def stage_finished(self, stage: str, seconds: float) -> None:
        log.info("build stage %s done in %.1fs", stage, seconds)

    def message(self, text: str) -> None:
        log.debug("%s", text)


@dataclass
class BuildResult:
    build: TemplateBuild
    skipped: bool
    """True when the inputs were unchanged and the existing build was kept."""
    stage_seconds: dict[str, float] = field(default_factory=dict)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def agent_digest() -> str:
    """The guest files trenvx injects: the agent's sources and the guest's init script."""
    h = hashlib.sha256()
    for p in sorted(AGENT_SRC.glob("*.py")):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    h.update(b"init\0" + init_script().encode())
    return h.hexdigest()


def interpreter_digest() -> str:
    """The code interpreter's sources (an input of the templates that run it)."""
    h = hashlib.sha256()
    for p in guest_sources(INTERPRETER_SRC):
        h.update(str(p.relative_to(INTERPRETER_SRC)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def kernel_cmdline(accelerator: str = "kvm", overlay: bool = False) -> str:
    """The guest kernel's command line.

    Under TCG, ``norandmaps`` turns the guest's address-space randomisation off. QEMU 7.2's TCG
    keys translated code by virtual address, so with ASLR every new process (each command) runs
    its shared libraries at new addresses and has all of their code translated again, and the
    32 MiB translation cache thrashed (8 flushes for a few commands). Measured in one sandbox:
    ``bash -l -c true`` 450 -> 75 ms, ``python3 -c "print('Hello World')"`` 900 -> 190 ms.
    The guest is one tenant's machine, whose code is the untrusted party anyway; under KVM the
    guest keeps ASLR.

    With ``overlay`` the root is the template's image on virtio-pmem, mounted read-only with DAX
    under a writable layer on ``/dev/vda`` (see the initramfs).
    """
    root = "root=/dev/pmem0 rootflags=dax trenvx.upper=/dev/vda" if overlay else "root=/dev/vda rw"
    line = f"console=ttyS0 quiet panic=-1 {root} trenvx.net={GUEST_NET} trenvx.dns={GUEST_DNS}"
    return line + " norandmaps" if accelerator == "tcg" else line


def _tool_version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.splitlines()[0].strip() if out else "unknown"


class TemplateBuilder:
    def __init__(self, config: Config, reporter: BuildReporter | None = None) -> None:
        self.config = config
        self.data_root = DataRoot(config.data_root).ensure()
        self.store = TemplateStore(self.data_root)
        self.reporter = reporter or LogReporter()
        self._space_need = 0
        """About how many bytes the build under way needs in the data root (for its errors)."""

    def network_kind(self, tpl: TemplateConfig) -> str:
        """``netns`` (a tap in a network slot) or ``user`` (QEMU's user networking): what sandboxes of
        this template will run with on this host. VMMs without a NIC (vsock only) are ``user``."""
        if tpl.vmm_type is not VmmType.qemu:
            return "user"
        mode, _ = network_mode.resolve(self.config.network)
        return mode.value

    def resolved(self, tpl: TemplateConfig) -> TemplateConfig:
        """``tpl`` with its defaults that depend on the VMM decided (``overlay``: on with QEMU, where
        it was measured; Cloud Hypervisor has virtio-pmem too, but has not run here)."""
        if tpl.overlay is not None:
            return tpl
        return tpl.model_copy(update={"overlay": tpl.vmm_type is VmmType.qemu})

    def input_digest(self, tpl: TemplateConfig) -> tuple[str, dict[str, str]]:
        """A hash of everything that changes the build's result, without building anything."""
        tpl = self.resolved(tpl)
        # The Dockerfile's and context's paths are not inputs (their contents are, in "rootfs"):
        # one template in two checkouts is one build.
        settings = tpl.model_dump(mode="json", exclude={"name", "aliases", "boot_timeout_s", "ready_timeout_s",
                                                        "dockerfile", "context"})
        inputs = {
            "rootfs": rootfs_input_digest(tpl),
            "agent": agent_digest(),
            "interpreter": interpreter_digest() if tpl.code_interpreter else "",
            "template": _digest(settings),
            "vmm": _digest(self.config.vmm.model_dump(mode="json")),
            "boot": _digest([kernel_cmdline("kvm", tpl.overlay), kernel_cmdline("tcg", tpl.overlay)]),
            # The guest's early setup (overlay root, memory reporting) is in the snapshot's RAM.
            "initramfs": _digest([INITRAMFS_VERSION, INIT_SCRIPT.read_text(), WANTED_MODULES]),
            "devices": driver_for(tpl.vmm_type, self.config).device_layout,
            # The NIC's backend is in the snapshot: a tap in a network slot, or user networking.
            "network": self.network_kind(tpl),
            "trenvx": __version__,
            "snapshot": str(SNAPSHOT_RECIPE),
        }
        return _digest(inputs), inputs

    async def build(self, name: str, *, force: bool = False) -> BuildResult:
        tpl = self.config.get_template(name)
        tpl = self.resolved(tpl)
        if tpl.overlay and not driver_for(tpl.vmm_type, self.config).root_on_pmem:
            raise BuildError(
                "config", f"template {name!r}: overlay = true needs virtio-pmem, which {tpl.vmm_type.value} "
                "does not have; use vmm_type = \"qemu\" or \"cloud-hypervisor\", or overlay = false",
            )
        digest, inputs = self.input_digest(tpl)
        before = self.published_with(name, digest)
        if before is not None and not force:
            if before.manifest.integrity is None:
                async with AsyncFileLock(self.store.build_lock(name), on_wait=lambda pid: self._waiting(name, pid)):
                    before = await asyncio.to_thread(self.with_hashes, self.published_with(name, digest) or before)
            self.reporter.message(f"template {name!r} is up to date (build {before.build_id}); use --force to rebuild")
            return BuildResult(before, skipped=True)
        # One builder per template at a time, across processes: a second one waits for the first,
        # then reuses what it published when the inputs are the same, or builds after it.
        lock = AsyncFileLock(self.store.build_lock(name), on_wait=lambda pid: self._waiting(name, pid))
        async with lock:
            after = self.published_with(name, digest)
            # force: a build published while this one waited was made after it was asked for.
            fresh = lock.waited and after is not None and (before is None or after.build_id != before.build_id)
            if after is not None and (not force or fresh):
                self.reporter.message(f"template {name!r} was built with the same inputs while this build waited "
                                      f"(build {after.build_id}); reusing it")
                return BuildResult(after, skipped=True)
            self.store.remove_stale_staging(name)  # a crashed builder's: a live one would hold the lock
            self._space_need = self.space_needed(tpl)
            self.check_space(tpl.name, "space", self._space_need)
            build_id = self.store.new_build_id(name, digest)
            staging = self.store.staging_dir(name, build_id)
            staging.mkdir(parents=True)
            try:
                return await self._build(tpl, build_id, staging, digest, inputs, force=force)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise

    def space_needed(self, tpl: TemplateConfig) -> int:
        """About how many bytes a build of ``tpl`` takes in the data root: what its last build
        takes (its files' allocated blocks), else its guest RAM (the memory file can grow to it)
        plus 64 MiB (a lower bound: the root image's size is known only once it is made)."""
        for build in reversed(self.store.published(tpl.name)):
            try:
                return sum(p.stat().st_blocks * 512 for p in build.path.iterdir() if p.is_file())
            except OSError:
                continue
        return (tpl.mem_mb + 64) * MiB

    def check_space(self, name: str, stage: str, need: int) -> None:
        """BuildError naming the data root and the space needed when less than ``need`` bytes are free."""
        where = self.data_root.template_dir(name)
        if diskspace.free_bytes(where if where.exists() else self.data_root.templates) < need:
            raise BuildError(stage, diskspace.full_message(self.data_root.root, f"a build of template {name!r}", need))

    def published_with(self, name: str, digest: str) -> TemplateBuild | None:
        """The current build of ``name`` if it was made from the inputs ``digest`` (and is whole)."""
        try:
            existing = self.store.current(name)
        except Exception:  # noqa: BLE001 - not built yet, or unreadable: build it
            return None
        if existing.manifest.input_digest == digest and existing.snapshot.vmstate.exists():
            return existing
        return None

    def with_hashes(self, build: TemplateBuild) -> TemplateBuild:
        """``build`` (up to date) with its files' hashes recorded if it was made before they were kept."""
        if build.manifest.integrity is not None:
            return build
        try:
            return integrity.add_missing(self.store, build)
        except OSError as e:
            log.warning("could not record the hashes of template %s build %s: %s", build.name, build.build_id, e)
            return build

    def _waiting(self, name: str, pid: int | None) -> None:
        text = f"waiting for the build of {name} by pid {pid if pid is not None else '(unknown)'}"
        log.info("%s", text)
        if not isinstance(self.reporter, LogReporter):
            self.reporter.message(text)

    async def _stage(self, times: dict[str, float], stage: str, work: Callable[[], Awaitable[T]]) -> T:
        self.reporter.stage_started(stage)
        t0 = time.perf_counter()
        try:
            result = await work()
        except (asyncio.CancelledError, KeyboardInterrupt):
            raise
        except Exception as e:  # noqa: BLE001 - every failure is reported with its stage
            if diskspace.space_problem(e, self.data_root.templates):
                # ENOSPC, or its symptoms (mkfs's stderr, a QEMU killed by SIGBUS on its RAM file)
                raise BuildError(stage, diskspace.full_message(self.data_root.root, "this build", self._space_need)
                                 + f" (what failed: {e})") from e
            if isinstance(e, BuildError):
                raise
            raise BuildError(stage, f"{type(e).__name__}: {e}") from e
        times[stage] = round(time.perf_counter() - t0, 3)
        self.reporter.stage_finished(stage, times[stage])
        return result

    async def _build(
        self, tpl: TemplateConfig, build_id: str, staging: Path, digest: str, inputs: dict[str, str],
        *, force: bool = False,
    ) -> BuildResult:
        times: dict[str, float] = {}
        say = self.reporter.message

        async def kernel_stage() -> tuple[Any, Path]:
            kernel = await ensure_kernel(self.data_root, tpl.kernel_version, log=say)
            return kernel, await ensure_initramfs(kernel)

        kernel, initrd = await self._stage(times, "kernel", kernel_stage)

        async def accel_stage() -> Any:
            return await choose_accelerator(
                self.config.vmm.accelerator.value, self.config.vmm.qemu_binary,
                kernel.bzimage, initrd, self.data_root.cache,
            )

        accel = await self._stage(times, "accelerator", accel_stage)
        say(f"accelerator: {accel.name} ({accel.reason})")

        async def rootfs_stage() -> tuple[str, int, Account, bool]:
            # --force also rebuilds a Dockerfile's image (new packages), not only the VM's stages
            async with prepared_rootfs(tpl, self.data_root, say, reuse_image=not force) as tree:
                check_python(tree.path)
                inject_guest_files(tree.path, AGENT_SRC, {INTERPRETER_PACKAGE: INTERPRETER_SRC} if tpl.code_interpreter else {})
                account = find_account(tree.path, tpl.user)
                home_exists = in_tree(tree.path, account.home.lstrip("/")).is_dir()
                if not tpl.overlay:
                    size = await make_ext4_image(tree.path, staging / ROOTFS, tpl.disk_mb)
                    return tree.source, size, account, home_exists
                # Overlay mode: the image holds the content only (it is never written) and is
                # padded for virtio-pmem; the free space is the writable layer's.
                await make_ext4_image(tree.path, staging / ROOTFS, 0)
                size = pad_to(staging / ROOTFS, PMEM_ALIGN)
                await make_empty_ext4(staging / UPPER, max(tpl.disk_mb, 64))
                return tree.source, size, account, home_exists

        rootfs_source, rootfs_size, account, home_exists = await self._stage(times, "rootfs", rootfs_stage)
        # The guest's RAM file grows as it touches pages: a full filesystem there kills QEMU with SIGBUS.
        self.check_space(tpl.name, "boot", (tpl.mem_mb + 32) * MiB)
        say(f"default user: {account.name} (uid {account.uid}, home {account.home})")

        machine = MachineSpec(
            vcpu=tpl.vcpu, mem_mb=tpl.mem_mb, accelerator=accel.name, kernel=kernel.bzimage, initrd=initrd,
            cmdline=kernel_cmdline(accel.name, tpl.overlay), tcg_tb_size_mb=self.config.vmm.tcg_tb_size_mb,
        )
        network: HostNetwork | None = None
        slot: NetworkSlot | None = None
        if inputs["network"] == "netns":
            # The build VM runs in a network slot of its own, so that the snapshot's NIC has the
            # tap backend sandboxes restore into. Its egress is open (the start command is the
            # operator's, and may install things).
            network = HostNetwork(self.config.network, self.data_root.root, owner=f"build_{os.getpid()}")
            await network.start(sweep=False)
            slot = await network.acquire()
        spec = VmSpec(
            name=f"build-{tpl.name}", workdir=staging / "vm", machine=machine,
            memory_file=staging / MEMORY, memory_shared=True,
            root_disk=DiskSpec(staging / ROOTFS, "raw", read_only=tpl.overlay),
            root_on_pmem=tpl.overlay, scratch_disk=DiskSpec(staging / UPPER, "raw") if tpl.overlay else None,
            **(slot.vm_fields() if slot is not None else {}),
        )
        driver = driver_for(tpl.vmm_type, self.config)
        vm: Vm | None = None
        try:
            async def boot_stage() -> Vm:
                nonlocal vm
                vm = await driver.boot(spec)
                await self._wait_agent(vm, tpl.boot_timeout_s)
                return vm

            vm = await self._stage(times, "boot", boot_stage)
            assert vm is not None
            running_vm = vm

            async def start_stage() -> None:
                await self._start_and_wait_ready(running_vm, tpl)

            await self._stage(times, "start", start_stage)

            async def snapshot_stage() -> None:
                await wait_until_idle(running_vm)
                await driver.snapshot(running_vm, staging)

            await self._stage(times, "snapshot", snapshot_stage)
        except BuildError as e:
            if vm is not None and e.stage in ("boot", "start"):
                tail = vm.console_tail(25) or "(empty)"
                raise BuildError(e.stage, f"{e.message}\nlast lines of the guest console:\n{tail}") from e
            raise
        finally:
            if vm is not None:
                await vm.kill()
            if network is not None:
                await network.close()

        async def publish_stage() -> TemplateBuild:
            shutil.rmtree(staging / "vm", ignore_errors=True)
            for f in (staging / ROOTFS, staging / MEMORY, *([staging / UPPER] if tpl.overlay else [])):
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
                f.chmod(0o444)
            hashes = await asyncio.to_thread(integrity.record, staging)  # checked before each restore
            manifest = TemplateManifest(
                name=tpl.name, build_id=build_id,
                created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                vmm_type=tpl.vmm_type.value, input_digest=digest, inputs=inputs,
                config=tpl.model_dump(mode="json"), machine=MachineRecord.from_spec(machine),
                accelerator_reason=accel.reason, kernel_version=kernel.version,
                versions={
                    "trenvx": __version__, "python": sys.version.split()[0],
                    "qemu": _tool_version([self.config.vmm.qemu_binary, "--version"]),
                },
                sizes={
                    "rootfs_bytes": rootfs_size,
                    "memory_bytes": (staging / MEMORY).stat().st_size,
                    "vmstate_bytes": (staging / "vmstate").stat().st_size,
                    **({"upper_bytes": (staging / UPPER).stat().st_size} if tpl.overlay else {}),
                },
                stage_seconds=times, rootfs_source=rootfs_source,
                default_user=account.name, default_workdir=account.home if home_exists else None,
                integrity=hashes,
            )
            return self.store.publish(tpl.name, staging, manifest)

        build = await self._stage(times, "publish", publish_stage)
        await self.store.prune_quietly(tpl.name, self.config.template_manager.keep_builds)
        return BuildResult(build, skipped=False, stage_seconds=times)

    async def _wait_agent(self, vm: Vm, timeout_s: float) -> None:
        client = AgentClient.for_endpoint(vm.agent_endpoint)
        try:
            waiter = asyncio.ensure_future(client.wait_healthy(timeout_s))
            died = asyncio.ensure_future(vm.wait_exit())
            done, _ = await asyncio.wait({waiter, died}, return_when=asyncio.FIRST_COMPLETED)
            if died in done:
                waiter.cancel()
                raise RuntimeError(f"the VM exited (status {died.result()}) before its agent answered")
            died.cancel()
            waiter.result()
        finally:
            await client.aclose()

    async def _start_background(self, client: AgentClient, cmd: str, cwd: str, envs: dict[str, str], tag: str) -> None:
        """Start ``cmd`` as root; it keeps running (into the snapshot), only our stream of it ends."""
        stream = client.start(cmd, envs=envs, cwd=cwd, user="root", tag=tag)
        first = await stream.__anext__()
        if first.kind != "start":
            raise RuntimeError(f"{tag} did not start: {first}")
        self.reporter.message(f"{tag} running as pid {first.pid}")
        await stream.aclose()

    async def _start_and_wait_ready(self, vm: Vm, tpl: TemplateConfig) -> None:
        """Start the code interpreter (``code_interpreter = true``) and ``start_cmd`` in the background,
        and wait until they are ready (its /health, ``ready_cmd``), all as root: they are the
        operator's, and prepare the machine every sandbox starts from."""
        client = AgentClient.for_endpoint(vm.agent_endpoint, timeout=tpl.ready_timeout_s)
        try:
            deadline = time.monotonic() + tpl.ready_timeout_s
            if tpl.code_interpreter:
                await self._start_background(client, INTERPRETER_CMD, "/", {}, "code_interpreter")
                await _wait_until_ok(client, INTERPRETER_READY, deadline, "the code interpreter's server (port "
                                     f"{INTERPRETER_PORT}) did not answer /health")
            if tpl.start_cmd.cmd:
                envs = _read_envfile(tpl.start_cmd.envfile_path) if tpl.start_cmd.envfile_path else {}
                await self._start_background(client, tpl.start_cmd.cmd, tpl.start_cmd.working_dir, envs, "start_cmd")
            if tpl.ready_cmd:
                await _wait_until_ok(client, tpl.ready_cmd, deadline, f"ready_cmd {tpl.ready_cmd!r} still fails")
            # Flush the guest's dirty pages to the disk image, so the snapshot's page cache and
            # the image the sandboxes' overlays are based on agree.
            res = await client.run(["sync"])
            if res.exit_code != 0:
                raise RuntimeError(f"sync in the guest failed: {res.stderr!r}")
        finally:
            await client.aclose()


SETTLE_WINDOW_S = 0.5
SETTLE_BUSY_FRACTION = 0.04
SETTLE_TIMEOUT_S = 30.0
SNAPSHOT_RECIPE = 2
"""Changes of how the snapshot is taken (2: the guest settles first), an input of every build."""


async def wait_until_idle(vm: Vm, *, timeout_s: float = SETTLE_TIMEOUT_S) -> float:
    """Wait until the guest has finished what it was doing (its VMM process used under
    SETTLE_BUSY_FRACTION of a core over two windows of SETTLE_WINDOW_S), at most ``timeout_s``.

    Whatever the guest is still doing when the snapshot is taken, every sandbox restored from it
    does again: right after its agent ran ``sync`` a guest had ~160 ms of work left (TCG), which
    each restore then paid before its agent answered. Measured from the host (the VMM's CPU
    time), so that asking does not itself wake the guest. Returns the seconds waited."""
    from ..vmm.process import cpu_seconds_of

    t0 = time.monotonic()
    quiet = 0
    before = cpu_seconds_of(vm.pid)
    while quiet < 2 and time.monotonic() - t0 < timeout_s:
        await asyncio.sleep(SETTLE_WINDOW_S)
        now = cpu_seconds_of(vm.pid)
        quiet = quiet + 1 if now - before < SETTLE_BUSY_FRACTION * SETTLE_WINDOW_S else 0
        before = now
    waited = time.monotonic() - t0
    if quiet < 2:
        log.warning("the guest was still busy after %.0f s; snapshotting it as it is", waited)
    return waited


INTERPRETER_CMD = f"PYTHONPATH=/opt/trenvx exec python3 -m trenvx_interpreter --port {INTERPRETER_PORT}"
"""The code interpreter's server (src/trenvx/guest/interpreter), started as root before ``start_cmd``
in templates with ``code_interpreter = true``; it starts the kernels as the template's user."""
INTERPRETER_READY = ("python3 -c \"import urllib.request as u; "
                     f"u.urlopen('http://127.0.0.1:{INTERPRETER_PORT}/health', timeout=5)\"")


async def _wait_until_ok(client: AgentClient, cmd: str, deadline: float, failure: str) -> None:
    """Run ``cmd`` (as root) until it exits 0, backing off up to 1 s; RuntimeError(failure) at the deadline."""
    delay = 0.05
    while True:
        res = await client.run(cmd, user="root", timeout=max(1.0, deadline - time.monotonic()))
        if res.exit_code == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{failure} within the ready timeout (exit {res.exit_code}): "
                               f"{res.stderr.decode(errors='replace')[-500:]}")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 1.0)


def _read_envfile(path: str) -> dict[str, str]:
    envs: dict[str, str] = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        k, v = line.split("=", 1)
        envs[k.strip().removeprefix("export ").strip()] = v.strip().strip("\"'")
    return envs
