"""A template's build copied from a node that has it, verified by content hash: templates are
available on every node without a user step.

What a node offers (:func:`describe_build`, served by the server's internal routes): the current
build of a template, its manifest, and each file with its size, mode and SHA-256; the guest
kernel and initramfs it restores with, by their path under ``data_root/kernels``.

What a node lacking the build does (:class:`TemplateCopier`): download each file into a staging
directory (zero runs stay holes: a memory file is mostly zeros), check its SHA-256 and size,
fetch the kernel files it lacks the same way, point the manifest at its own kernel, and publish
the build under the template's name as a build of its own would be. Its input digest is the
source's: the same build, recognised by content. A copy that fails leaves nothing behind.
Snapshots (builds whose disk layer stands on other builds) are not copied: creates from a
snapshot are placed on the nodes that hold it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from ..layout import DataRoot
from ..template.store import MANIFEST, TemplateBuild, TemplateManifest, TemplateNotFound, TemplateStore

log = logging.getLogger(__name__)

CHUNK = 1 << 20
_ZERO = bytes(CHUNK)
COPY_TIMEOUT = httpx.Timeout(connect=5.0, read=120.0, write=120.0, pool=30.0)


class TemplateCopyError(RuntimeError):
    """The build could not be copied; ``missing``: no live node holds it."""

    def __init__(self, message: str, missing: bool = False) -> None:
        super().__init__(message)
        self.missing = missing


@dataclass(frozen=True)
class FileDigest:
    name: str
    size: int
    mode: int
    sha256: str


_digests: dict[tuple[str, int, int, int], str] = {}
"""SHA-256 of files already hashed, by (path, inode, size, mtime): a build's files never change."""


def sha256_of(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
    hit = _digests.get(key)
    if hit is not None:
        return hit
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    _digests[key] = h.hexdigest()
    return _digests[key]


def _digest_of(path: Path, name: str) -> FileDigest:
    st = path.stat()
    return FileDigest(name, st.st_size, stat.S_IMODE(st.st_mode), sha256_of(path))


def describe_build(store: TemplateStore, data_root: DataRoot, name: str) -> dict[str, Any]:
    """What a node offers of template ``name``'s current build (blocking: hashes files the first time).
    Raises :class:`TemplateNotFound`, :class:`TemplateCopyError` for a snapshot."""
    build = store.current(name)
    if build.manifest.snapshot is not None:
        raise TemplateCopyError(f"{name} is a snapshot: its sandboxes start on the nodes that hold it")
    files = [_digest_of(p, p.name) for p in sorted(build.path.iterdir())
             if p.is_file() and not p.name.startswith(".") and p.name != MANIFEST]
    kernels = data_root.kernels.resolve()
    kernel_files = []
    for p in (build.manifest.machine.kernel, build.manifest.machine.initrd):
        path = Path(p).resolve()
        if not path.is_relative_to(kernels):
            raise TemplateCopyError(f"the kernel file {p} of {name} is not under {kernels}")
        kernel_files.append(_digest_of(path, str(path.relative_to(kernels))))
    return {"name": name, "build_id": build.manifest.build_id, "manifest": build.manifest.model_dump(mode="json"),
            "files": [f.__dict__ for f in files], "kernel_files": [f.__dict__ for f in kernel_files]}


def build_file(store: TemplateStore, data_root: DataRoot, name: str, build_id: str, file: str) -> Path:
    """The path of one file a node offers (a build's file, or a kernel file with ``name`` ``-kernel``),
    refusing anything outside them. Raises :class:`FileNotFoundError`."""
    if name == "-kernel":
        base = data_root.kernels.resolve()
        path = (base / file).resolve()
    else:
        base = store.build_dir(name, build_id).resolve()
        path = (base / file).resolve()
        if path.parent != base or path.name.startswith(".") or path.name == MANIFEST:
            raise FileNotFoundError(file)
    if not path.is_relative_to(base) or not path.is_file():
        raise FileNotFoundError(file)
    return path


class TemplateCopier:
    """Copies builds into this node's store, one copy per template at a time."""

    def __init__(self, store: TemplateStore, data_root: DataRoot, secret_headers: dict[str, str],
                 keep_builds: int = 2) -> None:
        self.store = store
        self.data_root = data_root
        self.keep_builds = keep_builds
        """Builds kept per template once a copy is published (see :meth:`TemplateStore.prune`)."""
        self.headers = secret_headers
        self._locks: dict[str, asyncio.Lock] = {}
        self.copied: list[tuple[str, str, float]] = []
        """(template, source node, seconds) of each copy made."""

    async def copy(self, name: str, source_url: str, source_name: str = "", build_id: str | None = None
                   ) -> TemplateBuild:
        """Copy ``name``'s current build from the node at ``source_url`` (unless this node holds one,
        or with ``build_id``, one at least as new). Raises :class:`TemplateCopyError`."""
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            try:
                have = self.store.current(name)
                if build_id is None or have.manifest.build_id >= build_id:
                    return have  # another create copied it meanwhile
            except TemplateNotFound:
                pass
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            async with httpx.AsyncClient(timeout=COPY_TIMEOUT, headers=self.headers) as client:
                try:
                    r = await client.get(f"{source_url}/cluster/templates/{name}")
                except httpx.HTTPError as e:
                    raise TemplateCopyError(f"template {name}: node {source_name or source_url} did not answer: {e!r}") \
                        from None
                if r.status_code != 200:
                    raise TemplateCopyError(f"template {name}: node {source_name or source_url} answered "
                                            f"{r.status_code}: {r.text[:300]}", missing=r.status_code == 404)
                offer = r.json()
                build = await self._copy(client, source_url, offer)
            seconds = loop.time() - t0
            self.copied.append((name, source_name or source_url, seconds))
            await self.store.prune_quietly(name, self.keep_builds)  # older copies go, as after a build
            log.info("cluster: template %s (build %s) copied from node %s in %.1f s", name, build.manifest.build_id,
                     source_name or source_url, seconds)
            return build

    async def _copy(self, client: httpx.AsyncClient, url: str, offer: dict[str, Any]) -> TemplateBuild:
        name, build_id = offer["name"], offer["build_id"]
        manifest = TemplateManifest.model_validate(offer["manifest"])
        tdir = self.data_root.template_dir(name)
        tdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        staging = tdir / f".{build_id}.copy.partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(mode=0o700)
        try:
            for f in offer["files"]:
                fd = FileDigest(**f)
                _check_name(fd.name)
                await download(client, f"{url}/cluster/templates/{name}/{build_id}/files/{fd.name}",
                                     staging / fd.name, fd)
            kernels = self.data_root.kernels
            local_kernel: list[str] = []
            for f in offer["kernel_files"]:
                fd = FileDigest(**f)
                dest = (kernels / fd.name).resolve()
                if not dest.is_relative_to(kernels.resolve()):
                    raise TemplateCopyError(f"template {name}: kernel file {fd.name!r} is outside the kernels directory")
                if not (dest.is_file() and dest.stat().st_size == fd.size
                        and await asyncio.to_thread(sha256_of, dest) == fd.sha256):
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    tmp = dest.with_name(f".{dest.name}.copy")
                    await download(client, f"{url}/cluster/templates/-kernel/-/files/{fd.name}", tmp, fd)
                    os.replace(tmp, dest)
                local_kernel.append(str(dest))
            machine = manifest.machine.model_copy(update={"kernel": local_kernel[0], "initrd": local_kernel[1]})
            manifest = manifest.model_copy(update={"machine": machine})
            return self.store.publish(name, staging, manifest)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

async def download(client: httpx.AsyncClient, url: str, dest: Path, fd: FileDigest) -> None:
    """``url`` into ``dest`` (zero runs left as holes), checked against ``fd``'s size and SHA-256;
    ``dest`` gets ``fd``'s mode. Raises :class:`TemplateCopyError` (and removes ``dest``)."""
    h = hashlib.sha256()
    size = 0
    try:
        async with client.stream("GET", url) as r:
            if r.status_code != 200:
                raise TemplateCopyError(f"{url}: {r.status_code} {(await r.aread())[:200]!r}")
            with open(dest, "wb") as out:
                async for chunk in r.aiter_bytes(CHUNK):
                    h.update(chunk)
                    size += len(chunk)
                    if chunk == _ZERO[:len(chunk)]:
                        out.seek(len(chunk), os.SEEK_CUR)  # a hole, as in the source
                    else:
                        out.write(chunk)
                out.truncate(size)
    except httpx.HTTPError as e:
        dest.unlink(missing_ok=True)
        raise TemplateCopyError(f"downloading {url} failed: {e!r}") from None
    if size != fd.size or h.hexdigest() != fd.sha256:
        dest.unlink(missing_ok=True)
        raise TemplateCopyError(f"{fd.name} arrived damaged (size {size}, SHA-256 {h.hexdigest()[:16]}; expected "
                                f"{fd.size}, {fd.sha256[:16]}); the copy was discarded")
    os.chmod(dest, fd.mode & 0o777)


def _check_name(name: str) -> None:
    if not name or "/" in name or name.startswith(".") or name == MANIFEST:
        raise TemplateCopyError(f"a build file named {name!r} is refused")
