"""Where things live under ``data_root``. One place names every path.

::

    data_root/
      kernels/<version>/            unpacked Debian kernel package, vmlinuz, modules
      kernels/<version>/initramfs-<hash>.cpio
      cache/debootstrap/<hash>/     base root filesystems (a tree per input hash)
      cache/buildah/                buildah's storage (vfs driver)
      templates/<name>/<build_id>/  one build: rootfs.ext4, memory, vmstate, manifest.json
      templates/<name>/current      symlink to the build sandboxes start from
      sandboxes/<sandbox_id>/       per-sandbox files: disk overlay, sockets, console log
      run/                          server lock, state database, logs
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DataRoot:
    root: Path

    @property
    def kernels(self) -> Path:
        return self.root / "kernels"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def templates(self) -> Path:
        return self.root / "templates"

    @property
    def sandboxes(self) -> Path:
        return self.root / "sandboxes"

    @property
    def run(self) -> Path:
        return self.root / "run"

    def template_dir(self, name: str) -> Path:
        return self.templates / name

    def template_current(self, name: str) -> Path:
        """The symlink to the build that new sandboxes of ``name`` start from."""
        return self.templates / name / "current"

    def sandbox_dir(self, sandbox_id: str) -> Path:
        return self.sandboxes / sandbox_id

    def ensure(self) -> "DataRoot":
        for p in (self.kernels, self.cache, self.templates, self.sandboxes, self.run):
            p.mkdir(parents=True, exist_ok=True)
        return self
