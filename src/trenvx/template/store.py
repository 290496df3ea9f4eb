"""Built templates on disk: the manifest of each build and the ``current`` build of each template.

A build lives in ``data_root/templates/<name>/<build_id>/`` and never changes after it is
published; publishing switches the ``current`` symlink atomically, so sandboxes restoring from an
older build keep working while a new one is built. A build is made in a staging directory next to
it, by one builder at a time per template: the builder holds ``<name>/.build.lock`` (a flock, see
:mod:`trenvx.filelock`) from its staging directory's creation to its publication, so any staging
directory found by the lock's holder is a crashed builder's.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from ..config import TemplateConfig
from ..layout import DataRoot
from ..vmm.base import MachineSpec, SnapshotFiles

MANIFEST = "manifest.json"
ROOTFS = "rootfs.ext4"
UPPER = "upper.ext4"
"""Overlay mode: the writable layer the template's VM left behind, base of each sandbox's disk."""
MEMORY = "memory"
VMSTATE = "vmstate"


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
    def writable_base(self) -> Path:
        """The image a sandbox's own disk starts from: the upper layer in overlay mode, else the root."""
        return self.upper if self.overlay else self.rootfs

    @property
    def disk_mb(self) -> int:
        """The sandbox's disk size in MiB: the root image, plus the writable layer in overlay mode."""
        try:
            return sum(p.stat().st_size for p in (self.rootfs, *([self.upper] if self.overlay else []))) >> 20
        except OSError:
            return int(self.manifest.config.get("disk_mb", 0) or 0)

    def files(self) -> list[Path]:
        """The build's images and memory, all read-only once published."""
        return [self.rootfs, self.snapshot.memory_file, *([self.upper] if self.overlay else [])]

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

    def prune(self, name: str, in_use: set[str]) -> list[str]:
        """Delete builds of ``name`` that are neither current nor in ``in_use`` (build ids)."""
        try:
            current = self.data_root.template_current(name).resolve(strict=True).name
        except OSError:
            current = ""
        removed = []
        for p in self.builds(name):
            if p.name != current and p.name not in in_use:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
        return removed

