"""Built templates on disk: the manifest of each build and the ``current`` build of each template.

A build lives in ``data_root/templates/<name>/<build_id>/`` and never changes after it is
published; publishing switches the ``current`` symlink atomically, so sandboxes restoring from an
older build keep working while a new one is built. A build is made in a staging directory next to
it, by one builder at a time per template: the builder holds ``<name>/.build.lock`` (a flock, see
:mod:`trenvx.filelock`) from its staging directory's creation to its publication, so any staging
directory found by the lock's holder is a crashed builder's.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from ..config import TemplateConfig
from ..layout import DataRoot
from ..vmm.base import MachineSpec, SnapshotFiles
from ..vmm.qemu_img import backing_chain
from .build_users import has_users

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
PRUNING = ".pruning"
"""Suffix of a build being removed by :meth:`TemplateStore.prune` (``.<build id>.pruning``)."""
ROOTFS = "rootfs.ext4"
UPPER = "upper.ext4"
"""Overlay mode: the writable layer the template's VM left behind, base of each sandbox's disk."""
MEMORY = "memory"
VMSTATE = "vmstate"
LAYER = "layer.qcow2"
"""A snapshot of a sandbox: its disk as it was, a qcow2 layer over its template's image (or over
the snapshot it was restored from), base of each new sandbox's own overlay."""
AGENT_TOKEN = "agent.token"
"""A snapshot of a sandbox: the access token its guest agent holds in the snapshot's memory (the
source sandbox's), which the first request to a restored copy must carry; that request gives the
copy its own token."""


class TemplateNotFound(Exception):
    """No published build of the template exists. Build it with template-manager."""


class MachineRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    vcpu: int
    mem_mb: int
    accelerator: str
    kernel: str
    initrd: str
    cmdline: str
    tcg_tb_size_mb: int

    def to_spec(self) -> MachineSpec:
        return MachineSpec(
            vcpu=self.vcpu, mem_mb=self.mem_mb, accelerator=self.accelerator,  # type: ignore[arg-type]
            kernel=Path(self.kernel), initrd=Path(self.initrd), cmdline=self.cmdline,
            tcg_tb_size_mb=self.tcg_tb_size_mb,
        )

    @classmethod
    def from_spec(cls, m: MachineSpec) -> "MachineRecord":
        return cls(
            vcpu=m.vcpu, mem_mb=m.mem_mb, accelerator=m.accelerator, kernel=str(m.kernel),
            initrd=str(m.initrd), cmdline=m.cmdline, tcg_tb_size_mb=m.tcg_tb_size_mb,
        )


class SnapshotOrigin(BaseModel):
    """A build that is a snapshot of a running sandbox (E2B's snapshot templates, and the
    snapshots forks start from): where it came from and which files it depends on."""

    model_config = ConfigDict(frozen=True)

    source_sandbox: str
    source_template: str
    """The template the source sandbox was created from (what its forks report as theirs)."""
    source_build: str
    """The build directory the source sandbox ran from: a template's build or another snapshot."""
    requires: list[str]
    """Build directories whose files this snapshot's refer to by path (its disk layer's backing
    chain): they must outlive it, whatever happens to their template (rebuilt, deleted)."""
    names: list[str] = []
    """E2B's names of the snapshot (the name it was given; empty for an unnamed one)."""
    ephemeral: bool = False
    """Taken for a fork: never listed, removed once no sandbox uses it."""


class FileHash(BaseModel):
    """One file of a build as it was published: its size and the hash of its contents
    (:mod:`trenvx.template.integrity`'s scheme)."""

    model_config = ConfigDict(frozen=True)

    size: int
    digest: str


class BuildIntegrity(BaseModel):
    """The hashes of a build's files, recorded when it was published: restores check them, so a
    file damaged on disk is found before a sandbox runs from it (see :mod:`trenvx.template.integrity`)."""

    model_config = ConfigDict(frozen=True)

    scheme: str
    files: dict[str, FileHash]


class TemplateManifest(BaseModel):
    """What a build is: its resolved config, inputs, versions, sizes and how long each stage took."""

    model_config = ConfigDict(frozen=True)

    name: str
    build_id: str
    created_at: str
    vmm_type: str
    input_digest: str
    inputs: dict[str, str]
    config: dict[str, Any]
    machine: MachineRecord
    accelerator_reason: str
    kernel_version: str
    versions: dict[str, str]
    sizes: dict[str, int]
    stage_seconds: dict[str, float]
    rootfs_source: str
    default_user: str = "root"
    """The account requests that name none run as (the template's ``user``); builds made before
    the setting existed ran everything as root."""
    default_workdir: str | None = None
    """That account's home: where processes start and relative paths resolve when a request
    gives no directory (None: the agent uses each user's own home)."""
    snapshot: SnapshotOrigin | None = None
    """Set when the build is a snapshot of a running sandbox (see :mod:`trenvx.sandbox.snapshots`)."""
    integrity: BuildIntegrity | None = None
    """The hashes of the build's files; None for builds made before trenvx recorded them (and for
    snapshots of sandboxes, which are not hashed)."""


class TemplateBuild:
    """One published build of a template, as the sandbox layer uses it."""

    def __init__(self, path: Path, manifest: TemplateManifest) -> None:
        self.path = path
        self.manifest = manifest

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def build_id(self) -> str:
        return self.manifest.build_id

    @property
    def rootfs(self) -> Path:
        return self.path / ROOTFS

    @property
    def default_user(self) -> str:
        """The user the template's sandboxes run commands and file calls as by default."""
        return self.manifest.default_user

    @property
    def default_workdir(self) -> str | None:
        return self.manifest.default_workdir

    @property
    def overlay(self) -> bool:
        """The root is the image on virtio-pmem (DAX) under a writable layer on a disk."""
        # Builds made before the overlay mode existed may say overlay = true (the key was ignored
        # then) but have no writable layer: they are restored with their root on virtio-blk.
        return bool(self.manifest.config.get("overlay", False)) and "upper_bytes" in self.manifest.sizes

    @property
    def upper(self) -> Path:
        return self.path / UPPER

    @property
    def is_snapshot(self) -> bool:
        return self.manifest.snapshot is not None

    @property
    def writable_base(self) -> Path:
        """The image a sandbox's own disk starts from: a snapshot's disk layer, else the upper
        layer in overlay mode, else the root."""
        if self.is_snapshot:
            return self.path / LAYER
        return self.upper if self.overlay else self.rootfs

    @property
    def writable_format(self) -> str:
        """The format of :attr:`writable_base` (a qcow2 overlay names it as its backing format)."""
        return "qcow2" if self.is_snapshot else "raw"

    @property
    def init_token(self) -> str | None:
        """The token the guest agent of a restored copy of this build holds until its ``/init``
        (a snapshot's: its source sandbox's); None for templates (their agent has none)."""
        if not self.is_snapshot:
            return None
        try:
            return (self.path / AGENT_TOKEN).read_text().strip() or None
        except OSError:
            return None

    @property
    def disk_mb(self) -> int:
        """The sandbox's disk size in MiB: the root image, plus the writable layer in overlay mode."""
        try:
            return sum(p.stat().st_size for p in (self.rootfs, *([self.upper] if self.overlay else []))) >> 20
        except OSError:
            return int(self.manifest.config.get("disk_mb", 0) or 0)

    def files(self) -> list[Path]:
        """The build's images and memory, all read-only once published."""
        return [self.rootfs, self.snapshot.memory_file, *([self.upper] if self.overlay else []),
                *([self.path / LAYER] if self.is_snapshot else [])]

    @property
    def snapshot(self) -> SnapshotFiles:
        return SnapshotFiles(vmstate=self.path / VMSTATE, memory_file=self.path / MEMORY)

    @property
    def machine(self) -> MachineSpec:
        return self.manifest.machine.to_spec()

    @property
    def config(self) -> TemplateConfig:
        return TemplateConfig.model_validate(self.manifest.config)


def new_build_id(digest: str) -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S") + "-" + digest[:8]


class TemplateStore:
    def __init__(self, data_root: DataRoot) -> None:
        self.data_root = data_root

    def current(self, name: str) -> TemplateBuild:
        link = self.data_root.template_current(name)
        try:
            path = link.resolve(strict=True)
            manifest = TemplateManifest.model_validate_json((path / MANIFEST).read_text())
        except (OSError, ValueError):
            raise TemplateNotFound(
                f"template {name!r} is not built; run: template-manager --config <config.toml> --template {name}"
            ) from None
        return TemplateBuild(path, manifest)

    def names(self) -> list[str]:
        if not self.data_root.templates.is_dir():
            return []
        return sorted(p.name for p in self.data_root.templates.iterdir() if (p / "current").is_symlink())

    def build_dir(self, name: str, build_id: str) -> Path:
        return self.data_root.template_dir(name) / build_id

    def staging_dir(self, name: str, build_id: str) -> Path:
        return self.data_root.template_dir(name) / f".{build_id}.partial"

    def build_lock(self, name: str) -> Path:
        """The file a builder of ``name`` holds a flock on while it builds (it holds its pid)."""
        return self.data_root.template_dir(name) / ".build.lock"

    def new_build_id(self, name: str, digest: str) -> str:
        """A build id of ``name`` no build or staging directory has (two builds with the same
        inputs in the same second would otherwise get the same one)."""
        base = new_build_id(digest)
        build_id, n = base, 1
        while self.build_dir(name, build_id).exists() or self.staging_dir(name, build_id).exists():
            n += 1
            build_id = f"{base}-{n}"
        return build_id

    def publish(self, name: str, staging: Path, manifest: TemplateManifest) -> TemplateBuild:
        """Make a finished staging dir the current build of ``name`` (atomic symlink swap)."""
        (staging / MANIFEST).write_text(manifest.model_dump_json(indent=2))
        final = self.build_dir(name, manifest.build_id)
        os.rename(staging, final)
        link = self.data_root.template_current(name)
        tmp = link.with_name(".current.tmp")
        if tmp.is_symlink():
            tmp.unlink()
        tmp.symlink_to(final.name)
        os.replace(tmp, link)
        return TemplateBuild(final, manifest)

    def remove_stale_staging(self, name: str) -> None:
        """Remove crashed builders' staging directories: call it only holding :meth:`build_lock`."""
        d = self.data_root.template_dir(name)
        if d.is_dir():
            for p in d.glob(".*.partial"):
                shutil.rmtree(p, ignore_errors=True)

    def builds(self, name: str) -> list[Path]:
        d = self.data_root.template_dir(name)
        if not d.is_dir():
            return []
        return sorted(
            p for p in d.iterdir()
            if p.is_dir() and not p.is_symlink() and not p.name.startswith(".") and (p / MANIFEST).exists()
        )

    def published(self, name: str) -> list[TemplateBuild]:
        """Every readable build of ``name``, oldest first."""
        out = []
        for p in self.builds(name):
            try:
                out.append(TemplateBuild(p, TemplateManifest.model_validate_json((p / MANIFEST).read_text())))
            except (OSError, ValueError):
                continue
        return out

    def required_by_snapshots(self) -> set[str]:
        """Build directories some snapshot's files refer to (:attr:`SnapshotOrigin.requires`)."""
        out: set[str] = set()
        if not self.data_root.templates.is_dir():
            return out
        for manifest in self.data_root.templates.glob(f"*/*/{MANIFEST}"):
            try:
                m = TemplateManifest.model_validate_json(manifest.read_text())
            except (OSError, ValueError):
                continue
            if m.snapshot is not None:
                out.update(m.snapshot.requires)
        return out

    def under_sandbox_disks(self) -> set[str]:
        """Build directories (real paths) the disks of this data_root's sandboxes stand on: the
        backing chains of their qcow2 images, whatever process runs them, paused ones too."""
        out: set[str] = set()
        with contextlib.suppress(OSError):
            for disk in self.data_root.sandboxes.glob("*/*.qcow2"):
                for image in backing_chain(disk):
                    try:
                        out.add(str(image.parent.resolve()))
                    except OSError:
                        out.add(str(image.parent))
        return out

    async def prune_quietly(self, name: str, keep: int) -> list[str]:
        """:meth:`prune` off the event loop, after a publish: a failure is logged, not raised (the
        new build stands; the next publish tries again)."""
        try:
            removed = await asyncio.to_thread(self.prune, name, keep)
        except OSError as e:
            log.warning("template %s: removing older builds failed: %s", name, e)
            return []
        if removed:
            log.info("template %s: removed %d older build(s) nothing stands on: %s", name, len(removed),
                     ", ".join(removed))
        return removed

    def prune(self, name: str, keep: int = 2) -> list[str]:
        """Delete the older builds of template ``name`` that nothing stands on, and return their ids.

        Kept: the current build and the newest ``keep - 1`` others (a server that resolved the
        previous build just before a publish still finds it), a build with a live user (a sandbox
        restored from it, running or paused, whatever server or data_root it belongs to: see
        :mod:`.build_users`), one under a disk of this data_root's sandboxes (its backing chain),
        and one a snapshot requires. A snapshot's own builds are left to its collector."""
        try:
            current = self.data_root.template_current(name).resolve(strict=True)
        except OSError:
            current = None
        builds = self.builds(name)
        others = [p.resolve() for p in builds if p.resolve() != current]  # oldest first (ids start with the time)
        newest = set(others[-(keep - 1):]) if keep > 1 else set()
        required = self.required_by_snapshots()
        under_disks = self.under_sandbox_disks()
        removed = []
        for p in builds:
            real = p.resolve()
            if real == current or real in newest or str(real) in required or str(real) in under_disks:
                continue
            try:
                manifest = TemplateManifest.model_validate_json((p / MANIFEST).read_text())
            except (OSError, ValueError):
                continue  # not ours to judge
            if manifest.snapshot is not None or has_users(p):
                continue
            # Renamed first: a restore recording itself meanwhile either finds the build gone
            # (build_users.add_user raises) or left its entry in it, seen here, and the build stays.
            doomed = p.with_name(f".{p.name}{PRUNING}")
            try:
                os.rename(p, doomed)
            except OSError:
                continue
            if has_users(doomed):
                with contextlib.suppress(OSError):
                    os.rename(doomed, p)
                continue
            shutil.rmtree(doomed, ignore_errors=True)
            removed.append(p.name)
        for left in self.data_root.template_dir(name).glob(f".*{PRUNING}"):  # of a prune cut short
            shutil.rmtree(left, ignore_errors=True)
        return removed

