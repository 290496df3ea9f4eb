"""The files of a template build checked against the hashes its manifest recorded at publication.

A build's files (root image, writable layer, guest memory, device state) never change once
published, and every sandbox of the template runs from them: a file damaged on disk (a bad
sector, an operator's mistake, a half-finished copy) would start sandboxes that crash or, worse,
run on corrupted memory. So the builder records each file's size and hash in the manifest
(:class:`~trenvx.template.store.BuildIntegrity`), and restores check them:

- fully (every byte hashed) the first time a server process restores a build, and again whenever
  a file's stat signature (size, mtime_ns, inode, device) differs from the one last verified;
- cheaply (a ``stat`` of each file, a few microseconds) on every other restore, so a hot create
  (~80 ms) does not pay for hashing hundreds of MiB.

A damaged build raises :class:`TemplateDamaged`, whose message names the template, the file and
the command that rebuilds it; no VM is started from it, and the verdict is remembered (by the same
stat signatures), so a pool retrying its refills does not hash the files again each time.

The hash (:func:`file_digest`) is SHA-256 over the SHA-256 of each 8 MiB chunk: the chunks are
hashed on two threads (hashlib releases the GIL), and a chunk that lies wholly in a hole of a
sparse file (guest memory never touched, an image's free space) is known to be zeros and is not
read. The result depends on the file's contents only, not on how it is laid out on disk, so a
build copied to another node (``cluster.template_copy``) checks the same.

What this does not do: catch a file damaged without its stat signature changing (bit rot under
an unchanged mtime) after the process verified it (the next server start does), or resist an
attacker who can write the data root (they can rewrite the manifest too; the hashes are not keyed).

Builds published before hashes were recorded are accepted with a warning (once per build per
process); ``template-manager`` records their hashes, as the files are then, the next time it finds
the build up to date (:func:`add_missing`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .store import (
    LAYER, MANIFEST, MEMORY, ROOTFS, UPPER, VMSTATE, BuildIntegrity, FileHash, TemplateBuild, TemplateStore,
)

log = logging.getLogger(__name__)

CHUNK = 8 << 20
SCHEME = "sha256-of-8MiB-chunk-sha256"
HASHED_FILES = (ROOTFS, UPPER, MEMORY, VMSTATE, LAYER)
"""The files of a build that are hashed, where present (the manifest and a snapshot's token are small
and read whole anyway)."""
HASH_THREADS = 2

Signature = tuple[int, int, int, int]
"""(size, mtime_ns, inode, device) of a file: when it is unchanged, so are the file's contents
(short of damage that bypasses the filesystem)."""


class TemplateDamaged(Exception):
    """A file of a template build does not match what its manifest recorded: the build must be rebuilt."""


def rebuild_hint(name: str) -> str:
    return (f"Rebuild it: template-manager --config <config.toml> --template {name} --force "
            f"(or through the API: POST /v2/templates/{name}/builds/<buildID>)")


_zero_chunk_digest: bytes | None = None


def _zero_digest(n: int) -> bytes:
    global _zero_chunk_digest
    if n != CHUNK:
        return hashlib.sha256(bytes(n)).digest()
    if _zero_chunk_digest is None:
        _zero_chunk_digest = hashlib.sha256(bytes(CHUNK)).digest()
    return _zero_chunk_digest


def _chunks_with_data(fd: int, size: int) -> set[int] | None:
    """Indices of the chunks that hold some data (not wholly in holes); None if the filesystem
    cannot say (then every chunk is read)."""
    out: set[int] = set()
    pos = 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == 6:  # ENXIO: no data after pos
                    break
                raise
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            out.update(range(start // CHUNK, (max(end, start + 1) - 1) // CHUNK + 1))
            pos = end
    except (OSError, AttributeError):
        return None
    return out


def _read_exactly(fd: int, n: int, offset: int) -> bytes:
    parts: list[bytes] = []
    while n > 0:
        b = os.pread(fd, n, offset)
        if not b:
            raise OSError(f"short read at byte {offset}: the file shrank while it was hashed")
        parts.append(b)
        n -= len(b)
        offset += len(b)
    return b"".join(parts) if len(parts) != 1 else parts[0]


def file_digest(path: Path, threads: int = HASH_THREADS) -> str:
    """The file's hash (see the module's docstring): hex SHA-256 of its chunks' SHA-256s."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        count = (size + CHUNK - 1) // CHUNK
        data = _chunks_with_data(fd, size)

        def one(i: int) -> bytes:
            n = min(CHUNK, size - i * CHUNK)
            if data is not None and i not in data:
                return _zero_digest(n)
            return hashlib.sha256(_read_exactly(fd, n, i * CHUNK)).digest()

        with ThreadPoolExecutor(max(1, threads), thread_name_prefix="hash") as ex:
            digests = list(ex.map(one, range(count)))
    finally:
        os.close(fd)
    top = hashlib.sha256(size.to_bytes(8, "little"))
    for d in digests:
        top.update(d)
    return top.hexdigest()


def record(directory: Path) -> BuildIntegrity:
    """The hashes of the build files in ``directory`` (a staging directory about to be published)."""
    files = {}
    for name in HASHED_FILES:
        p = directory / name
        if p.is_file():
            files[name] = FileHash(size=p.stat().st_size, digest=file_digest(p))
    return BuildIntegrity(scheme=SCHEME, files=files)


def add_missing(store: TemplateStore, build: TemplateBuild) -> TemplateBuild:
    """``build`` with its files' hashes recorded in its manifest if it had none (a build from before
    they were kept): the files are trusted as they are now. Call it holding the template's build lock."""
    if build.manifest.integrity is not None or build.is_snapshot:
        return build
    t0 = time.perf_counter()
    manifest = build.manifest.model_copy(update={"integrity": record(build.path)})
    tmp = build.path / f".{MANIFEST}.tmp"
    tmp.write_text(manifest.model_dump_json(indent=2))
    os.replace(tmp, build.path / MANIFEST)
    log.info("template %s build %s: recorded the hashes of its files (made before they were kept) in %.1f s",
             build.name, build.build_id, time.perf_counter() - t0)
    return TemplateBuild(build.path, manifest)


def _signature(p: Path) -> Signature:
    st = os.stat(p)
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)


class IntegrityChecker:
    """Remembers, per build directory, the stat signatures of its files when they were last fully
    verified (or found damaged), so that each restore only ``stat``s them."""

    def __init__(self) -> None:
        self._verified: dict[Path, dict[str, Signature]] = {}
        self._damaged: dict[Path, tuple[dict[str, Signature], str]] = {}
        self._warned: set[Path] = set()
        self._locks: dict[Path, threading.Lock] = {}
        self._guard = threading.Lock()
        self.full_checks = 0
        """How many full verifications (every byte hashed) this checker made."""

    def _damaged_error(self, build: TemplateBuild, what: str) -> TemplateDamaged:
        return TemplateDamaged(
            f"template {build.name!r} (build {build.build_id}) is damaged on disk: {what}; no sandbox is started "
            f"from it. {rebuild_hint(build.name)}"
        )

    def _signatures(self, build: TemplateBuild) -> dict[str, Signature]:
        assert build.manifest.integrity is not None
        sigs = {}
        for name, want in build.manifest.integrity.files.items():
            try:
                sigs[name] = _signature(build.path / name)
            except OSError as e:
                raise self._damaged_error(build, f"its file {name} cannot be read ({e.strerror or e})") from None
            if sigs[name][0] != want.size:
                raise self._damaged_error(build, f"its file {name} has {sigs[name][0]} bytes, {want.size} when it was built")
        return sigs

    def quick(self, build: TemplateBuild) -> bool:
        """True when the build needs no hashing now: verified before with the same stat signatures,
        or made before hashes were kept (accepted, with a warning once). Raises
        :class:`TemplateDamaged` when a file is missing, has another size, or was found damaged
        with these signatures."""
        if build.manifest.integrity is None:
            if not build.is_snapshot and build.path not in self._warned:
                self._warned.add(build.path)
                log.warning("template %s build %s has no hashes of its files (built before trenvx recorded them): "
                            "they are not checked; run template-manager --config <config.toml> --template %s to "
                            "record them", build.name, build.build_id, build.name)
            return True
        sigs = self._signatures(build)
        if self._verified.get(build.path) == sigs:
            return True
        damaged = self._damaged.get(build.path)
        if damaged is not None and damaged[0] == sigs:
            raise self._damaged_error(build, damaged[1])
        return False

    def verify(self, build: TemplateBuild) -> None:
        """Hash every file whose signature is not the verified one (blocking: run it in a thread)."""
        if self.quick(build):
            return
        assert build.manifest.integrity is not None
        with self._guard:
            lock = self._locks.setdefault(build.path, threading.Lock())
        with lock:  # concurrent first restores of a build hash it once
            if self.quick(build):
                return
            sigs = self._signatures(build)
            known = self._verified.get(build.path, {})
            t0 = time.perf_counter()
            self.full_checks += 1
            for name, want in build.manifest.integrity.files.items():
                if known.get(name) == sigs[name]:
                    continue
                got = file_digest(build.path / name)
                if got != want.digest:
                    what = f"its file {name} does not match the hash recorded when it was built"
                    self._damaged[build.path] = (sigs, what)
                    self._verified.pop(build.path, None)
                    log.error("template %s build %s: %s (recorded %s, now %s)", build.name, build.build_id, what,
                              want.digest[:16], got[:16])
                    raise self._damaged_error(build, what)
            self._verified[build.path] = sigs
            self._damaged.pop(build.path, None)
            log.info("template %s build %s: its files match their hashes (%.2f s)", build.name, build.build_id,
                     time.perf_counter() - t0)

    async def check(self, build: TemplateBuild) -> None:
        """:meth:`verify` without blocking the event loop: only ``stat``s when the build was verified
        before, else hashes in a thread."""
        if not self.quick(build):
            await asyncio.to_thread(self.verify, build)


CHECKER = IntegrityChecker()
"""The server process's checker: every restore path uses it, so each build is verified once."""


async def check_build(build: TemplateBuild) -> None:
    """Raise :class:`TemplateDamaged` if ``build``'s files do not match its manifest's hashes."""
    await CHECKER.check(build)
