"""Root filesystem trees: a template's Dockerfile or image (or the built-in base) as a directory.

``prepared_rootfs`` yields a writable directory holding the template's root filesystem, and
removes everything it made on exit (containers, mounts, temporary trees), also on errors and
cancellation. Builders, in order of preference:

* docker, when a Docker engine answers ``docker info`` (``docker build`` + ``docker export``);
* buildah (daemonless, ``--isolation chroot``, ``vfs`` storage under ``data_root/cache/buildah``):
  ``buildah build`` / ``buildah pull``, then ``buildah from`` + ``buildah mount``.

``TRENVX_BUILDER=buildah|docker`` forces one.

Without any registry, the base image is made with debootstrap from the Debian mirror apt uses
on this host (``debootstrap --variant=minbase --include=python3,ca-certificates bookworm``),
cached under ``data_root/cache/debootstrap/<hash>/`` and imported into the builder's store as
``localhost/trenvx-base:bookworm`` and ``docker.io/library/debian:bookworm``, so that a
Dockerfile ``FROM debian:bookworm`` builds offline.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from trenvx.config import TemplateConfig
from trenvx.filelock import AsyncFileLock
from trenvx.layout import DataRoot
from trenvx.build_errors import CommandError, RootfsError, run
from trenvx.vmm.process import pid_alive

Log = Callable[[str], object]

BUILDER_VERSION = "1"
BASE_SUITE = "bookworm"
BASE_VARIANT = "minbase"
BASE_INCLUDE = ("python3", "ca-certificates")
BASE_IMAGE = "localhost/trenvx-base:bookworm"
BASE_ALIASES = ("docker.io/library/debian:bookworm",)
BASE_LABEL = "org.trenvx.base-digest"
ROOTFS_LABEL = "org.trenvx.rootfs-digest"
"""On a Dockerfile's image: the rootfs digest it was built from (reused while it matches)."""
CONTAINER_PREFIX = "trenvx-rootfs-"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_SECURITY_MIRROR = "http://deb.debian.org/debian-security"

DEBOOTSTRAP_TIMEOUT = 1800.0
BUILD_TIMEOUT = 3600.0
PULL_TIMEOUT = 1800.0
QUICK_TIMEOUT = 120.0
COPY_TIMEOUT = 900.0


@dataclass
class RootfsTree:
    path: Path
    """A directory holding the root filesystem tree; writable, ours to modify until exit."""
    source: str
    """Human description, e.g. ``Dockerfile /x/y.Dockerfile via buildah``."""
    digest: str
    """:func:`rootfs_input_digest` of the template that produced it."""


# ---------------------------------------------------------------------------------------------
# input digest


def base_params() -> dict[str, object]:
    return {
        "suite": BASE_SUITE,
        "variant": BASE_VARIANT,
        "include": list(BASE_INCLUDE),
        "builder": BUILDER_VERSION,
    }


def base_digest() -> str:
    return hashlib.sha256(json.dumps(base_params(), sort_keys=True).encode()).hexdigest()[:16]


_BIG_FILE = 16 * 1024 * 1024


def _hash_tree(h: "hashlib._Hash", root: Path) -> None:
    """Hash a build context: relative path, mode, and content (size+mtime for files > 16 MiB)."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if d != ".git")
        rel_dir = os.path.relpath(dirpath, root)
        for name in sorted(filenames):
            p = os.path.join(dirpath, name)
            rel = os.path.normpath(os.path.join(rel_dir, name))
            try:
                st = os.lstat(p)
            except OSError:
                continue
            h.update(f"{rel}\0{st.st_mode:o}\0".encode())
            if os.path.islink(p):
                h.update(os.readlink(p).encode() + b"\0")
            elif st.st_size > _BIG_FILE:
                h.update(f"{st.st_size}\0{st.st_mtime_ns}\0".encode())
            else:
                try:
                    with open(p, "rb") as f:
                        h.update(hashlib.sha256(f.read()).digest())
                except OSError:
                    h.update(b"unreadable\0")


def rootfs_input_digest(template: TemplateConfig) -> str:
    """A hash of what the tree is built from, without building: the Dockerfile and its context
    files, or the image name (plus size/mtime of an archive), or the base image's parameters; and
    this builder's version. Equal digests mean an unchanged source (a registry image's tag may
    still have moved: that is not detected)."""
    h = hashlib.sha256(f"trenvx-rootfs:{BUILDER_VERSION}\0".encode())
    if template.dockerfile:
        df = Path(template.dockerfile)
        ctx = Path(template.context) if template.context else df.parent
        try:
            h.update(b"dockerfile\0" + df.read_bytes())
        except OSError as e:
            raise RootfsError(f"cannot read Dockerfile {df}: {e.strerror}") from None
        h.update(b"\0context\0")
        _hash_tree(h, ctx)
        if any(_is_base_ref(f) for f in dockerfile_froms(df.read_text(errors="replace"))):
            h.update(b"\0base\0" + base_digest().encode())
    elif template.docker_img:
        h.update(b"image\0" + template.docker_img.encode())
        arch = _archive_path(template.docker_img)
        if arch is not None:
            try:
                st = arch.stat()
                h.update(f"\0{st.st_size}\0{st.st_mtime_ns}".encode())
            except OSError:
                h.update(b"\0missing")
        elif _is_base_ref(template.docker_img):
            h.update(b"\0base\0" + base_digest().encode())
    else:
        h.update(b"base\0" + json.dumps(base_params(), sort_keys=True).encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Dockerfile / image reference helpers


HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
BUILD_CA_PATH = "/run/trenvx/host-ca.crt"
"""Where a Dockerfile's RUN steps find the certificates the host trusts (read-only, during the
build only: not in the image). Hosts behind a TLS-inspecting proxy (this project's machines)
reach PyPI or npm only with them: ``pip install --cert /run/trenvx/host-ca.crt ...``."""


def host_ca_volume() -> list[str]:
    """buildah's option mounting the host's CA bundle at BUILD_CA_PATH, when the host has one."""
    return ["--volume", f"{HOST_CA_BUNDLE}:{BUILD_CA_PATH}:ro"] if HOST_CA_BUNDLE.is_file() else []


def dockerfile_froms(text: str) -> list[str]:
    """The base image references of a Dockerfile's FROM lines, without build-stage names."""
    stages: set[str] = set()
    refs: list[str] = []
    # join line continuations
    text = re.sub(r"\\\r?\n", " ", text)
    for line in text.splitlines():
        words = line.strip().split()
        if not words or words[0].upper() != "FROM":
            continue
        args = [w for w in words[1:] if not w.startswith("--")]
        if not args:
            continue
        ref = args[0]
        if len(args) >= 3 and args[1].upper() == "AS":
            stages.add(args[2].lower())
        if ref.lower() not in stages and ref.lower() != "scratch":
            refs.append(ref)
    return refs


def normalize_ref(ref: str) -> str:
    """``debian:bookworm`` -> ``docker.io/library/debian:bookworm`` (docker's short names)."""
    name, tag = ref, ""
    if "@" in ref:
        name, _, digest = ref.partition("@")
        tag = "@" + digest
    else:
        last = ref.rsplit("/", 1)[-1]
        if ":" in last:
            name, _, t = ref.rpartition(":")
            tag = ":" + t
    if not tag:
        tag = ":latest"
    first = name.split("/", 1)[0]
    if "/" not in name:
        name = f"docker.io/library/{name}"
    elif not ("." in first or ":" in first or first == "localhost"):
        name = f"docker.io/{name}"
    return name + tag


def _is_base_ref(ref: str) -> bool:
    if "$" in ref:
        return False
    n = normalize_ref(ref)
    return n == BASE_IMAGE or n in BASE_ALIASES


def _archive_path(img: str) -> Path | None:
    for prefix in ("oci-archive:", "docker-archive:"):
        if img.startswith(prefix):
            p = img[len(prefix) :]
            p = p.split(":", 1)[0] if not os.path.exists(p) else p  # strip an optional :ref
            return Path(p)
    return None


def image_tag(template_name: str) -> str:
    """The image a template's Dockerfile is built into: ``localhost/trenvx-tmpl/<name>:latest``."""
    safe = re.sub(r"[^a-z0-9._-]+", "-", template_name.lower()).strip("-._") or "template"
    return f"localhost/trenvx-tmpl/{safe}:latest"


# ---------------------------------------------------------------------------------------------
# debootstrap base tree


async def apt_mirrors() -> tuple[str, str | None]:
    """(Debian mirror, security mirror) as apt on this host is configured, from ``apt-cache policy``."""
    mirror = None
    security = None
    try:
        _, out = await run("rootfs", ["apt-cache", "policy"], timeout=QUICK_TIMEOUT)
    except CommandError:
        return DEFAULT_MIRROR, DEFAULT_SECURITY_MIRROR
    for line in out.splitlines():
        m = re.match(r"\s*\d+\s+(\S+://\S+)\s+(\S+?)/\S+\s+amd64\s+Packages", line)
        if not m:
            continue
        uri, suite = m.group(1).rstrip("/"), m.group(2)
        if suite == BASE_SUITE and mirror is None:
            mirror = uri
        elif suite == f"{BASE_SUITE}-security" and security is None:
            security = uri
    return mirror or DEFAULT_MIRROR, security


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()).rstrip("/") + "/"
    found = []
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                mnt = line.split()[1].encode().decode("unicode_escape")
                if mnt == prefix[:-1] or mnt.startswith(prefix):
                    found.append(mnt)
    except OSError:
        pass
    return found


async def _umount_under(path: Path) -> None:
    for mnt in sorted(_mounts_under(path), key=len, reverse=True):
        await run("rootfs", ["umount", "-l", mnt], timeout=QUICK_TIMEOUT, check=False)


async def _remove_tree(path: Path) -> None:
    """rm -rf that first detaches anything mounted below ``path`` (debootstrap mounts /proc, /sys)."""
    if not os.path.lexists(path):
        return
    await _umount_under(path)
    if _mounts_under(path):
        raise RootfsError(f"cannot remove {path}: still mounted below it: {_mounts_under(path)}")
    await asyncio.to_thread(shutil.rmtree, path, True)


async def ensure_debootstrap(data_root: DataRoot, log: Log) -> Path:
    """The debootstrap'd base tree under ``cache/debootstrap/<hash>/`` (built once, then reused).
    Treat it as read-only: it is shared by every later import."""
    digest = base_digest()
    top = data_root.cache / "debootstrap"
    final = top / digest
    if final.is_dir():
        return final
    async with AsyncFileLock(top / ".lock"):
        if final.is_dir():
            return final
        for stale in top.glob(".tmp-*"):
            await _remove_tree(stale)
        mirror, security = await apt_mirrors()
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{digest}-", dir=top))
        argv = [
            "debootstrap",
            f"--variant={BASE_VARIANT}",
            f"--include={','.join(BASE_INCLUDE)}",
            BASE_SUITE,
            str(tmp),
            mirror,
        ]
        log(f"rootfs: debootstrap {BASE_SUITE} ({BASE_VARIANT} + {', '.join(BASE_INCLUDE)}) from {mirror}")
        try:
            try:
                await run(
                    "rootfs", argv, timeout=DEBOOTSTRAP_TIMEOUT, log=log, log_prefix="debootstrap: ",
                    hint=f"is the Debian mirror {mirror} reachable? (it is the one apt uses on this host)",
                )  # fmt: skip
            except CommandError as e:
                logf = tmp / "debootstrap" / "debootstrap.log"
                extra = ""
                if logf.exists():
                    extra = "\ndebootstrap.log ends with:\n" + "\n".join(logf.read_text(errors="replace").splitlines()[-20:])
                raise RootfsError(f"debootstrap of the base image failed: {e.message}{extra}") from None
            await _umount_under(tmp)
            _finish_base_tree(tmp, mirror, security)
            os.rename(tmp, final)
        finally:
            if tmp.exists():
                await _remove_tree(tmp)
    log(f"rootfs: base tree ready at {final}")
    return final


def _finish_base_tree(tree: Path, mirror: str, security: str | None) -> None:
    """Tidy a fresh debootstrap tree: package cache out, apt sources with updates and security."""
    for deb in (tree / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()
    # Package lists (~45 MB) are stale as soon as the image is used: `apt-get update` first,
    # as with Debian's official container images.
    lists = tree / "var/lib/apt/lists"
    for f in lists.iterdir() if lists.is_dir() else ():
        if f.is_file():
            f.unlink()
    sources = [
        f"deb {mirror} {BASE_SUITE} main",
        f"deb {mirror} {BASE_SUITE}-updates main",
    ]
    if security:
        sources.append(f"deb {security} {BASE_SUITE}-security main")
    (tree / "etc/apt/sources.list").write_text("\n".join(sources) + "\n")
    # The build host's name does not belong in the image. (Its /etc/resolv.conf stays: the VM's
    # init replaces it when the kernel command line has trenvx.dns=.)
    hostname = tree / "etc/hostname"
    if hostname.is_file() and not hostname.is_symlink():
        hostname.write_text("trenvx\n")


# ---------------------------------------------------------------------------------------------
# buildah


class Buildah:
    """buildah with trenvx's private storage (vfs driver) under ``data_root/cache``."""

    def __init__(self, data_root: DataRoot, log: Log):
        self.root = data_root.cache / "buildah"
        self.runroot = data_root.cache / "buildah-run"
        self.log = log

    def argv(self, *args: str | os.PathLike[str]) -> list[str]:
        return [
            "buildah",
            "--root", str(self.root),
            "--runroot", str(self.runroot),
            "--storage-driver", "vfs",
            *[str(a) for a in args],
        ]  # fmt: skip

    @property
    def env(self) -> dict[str, str]:
        return {"BUILDAH_ISOLATION": "chroot", "STORAGE_DRIVER": "vfs"}

    async def __call__(
        self,
        *args: str | os.PathLike[str],
        timeout: float = QUICK_TIMEOUT,
        check: bool = True,
        stream: bool = False,
        hint: str = "",
    ) -> tuple[int, str]:
        self.root.mkdir(parents=True, exist_ok=True)
        self.runroot.mkdir(parents=True, exist_ok=True)
        return await run(
            "rootfs",
            self.argv(*args),
            timeout=timeout,
            check=check,
            env=self.env,
            log=self.log if stream else None,
            log_prefix="buildah: ",
            hint=hint,
        )

    async def inspect_image(self, name: str) -> dict | None:
        rc, out = await self("inspect", "--type", "image", name, check=False)
        if rc != 0:
            return None
        try:
            return json.loads(out)
        except json.JSONDecodeError:
            return None

    @staticmethod
    def labels(info: dict) -> dict[str, str]:
        cfg = (info.get("OCIv1") or {}).get("config") or {}
        return dict(cfg.get("Labels") or {})

    async def containers(self) -> list[tuple[str, str]]:
        """(id, name) of every buildah working container in our storage."""
        rc, out = await self("containers", "--json", check=False)
        if rc != 0 or not out.strip():
            return []
        try:
            data = json.loads(out)
        except json.JSONDecodeError:
            return []
        return [(c.get("id", ""), c.get("containername", "")) for c in data or []]

    async def remove_stale_containers(self) -> None:
        """Remove our containers left by processes that died (their pid is in the name)."""
        for cid, name in await self.containers():
            m = re.match(rf"{CONTAINER_PREFIX}(\d+)-", name)
            if m and not pid_alive(int(m.group(1))):
                self.log(f"rootfs: removing stale buildah container {name}")
                await self("umount", cid, check=False)
                await self("rm", cid, check=False)


def _container_name() -> str:
    return f"{CONTAINER_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"


async def _uncancellable(coro) -> None:
    """Run cleanup to its end even if the task is cancelled meanwhile; re-raise the cancel after."""
    task = asyncio.ensure_future(coro)
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done():
                break
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    task.result()


async def ensure_base_image_buildah(bh: Buildah, data_root: DataRoot, log: Log) -> str:
    """``localhost/trenvx-base:bookworm`` (and the debian:bookworm alias) in buildah's storage."""
    digest = base_digest()
    info = await bh.inspect_image(BASE_IMAGE)
    if info is not None and bh.labels(info).get(BASE_LABEL) == digest:
        await _tag_base_aliases(bh, digest)
        return BASE_IMAGE
    async with AsyncFileLock(data_root.cache / "buildah-base.lock"):
        await _import_base_buildah(bh, data_root, log, digest)
        await _tag_base_aliases(bh, digest)
    return BASE_IMAGE


async def _import_base_buildah(bh: Buildah, data_root: DataRoot, log: Log, digest: str) -> None:
    info = await bh.inspect_image(BASE_IMAGE)  # again: another process may have imported it meanwhile
    if info is None or bh.labels(info).get(BASE_LABEL) != digest:
        tree = await ensure_debootstrap(data_root, log)
        log(f"rootfs: importing the base tree into buildah as {BASE_IMAGE}")
        name = _container_name()
        try:
            await bh("from", "--name", name, "scratch")
            _, mnt = await bh("mount", name)
            mnt_path = Path(mnt.strip().splitlines()[-1])
            await run("rootfs", ["cp", "-a", "--reflink=auto", f"{tree}/.", f"{mnt_path}/"], timeout=COPY_TIMEOUT)
            await bh(
                "config",
                "--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "--cmd", "/bin/bash",
                "--os", "linux",
                "--arch", "amd64",
                "--label", f"{BASE_LABEL}={digest}",
                "--created-by", f"trenvx debootstrap {BASE_SUITE} {BASE_VARIANT}",
                name,
            )  # fmt: skip
            await bh("commit", "--quiet", name, BASE_IMAGE, timeout=COPY_TIMEOUT)
        finally:
            await _uncancellable(_buildah_cleanup(bh, name))


async def _tag_base_aliases(bh: Buildah, digest: str) -> None:
    for alias in BASE_ALIASES:
        ai = await bh.inspect_image(alias)
        if ai is None:
            await bh("tag", BASE_IMAGE, alias)
        elif BASE_LABEL in bh.labels(ai) and bh.labels(ai)[BASE_LABEL] != digest:
            await bh("tag", BASE_IMAGE, alias)  # an older trenvx base: point the alias at this one
        # else: ours already, or a real (pulled) image of that name: leave it alone


async def _remove_if_dangling(bh: Buildah, previous: dict | None, tag: str) -> None:
    """Remove the image ``tag`` named before a rebuild, once nothing names it any more (vfs storage
    keeps a full copy of the tree per image: old builds would pile up)."""
    old_id = (previous or {}).get("FromImageID") or ""
    if not old_id:
        return
    rc, out = await bh("images", "--json", "--no-trunc", check=False)
    try:
        images = json.loads(out) if rc == 0 and out.strip() else []
    except json.JSONDecodeError:
        return
    for img in images or []:
        if (img.get("id") or "").removeprefix("sha256:") == old_id and not img.get("names"):
            await bh("rmi", old_id, check=False)


async def _buildah_cleanup(bh: Buildah, name: str) -> None:
    await bh("umount", name, check=False)
    await bh("rm", name, check=False)


async def _buildah_image_for(template: TemplateConfig, bh: Buildah, data_root: DataRoot, log: Log,
                             reuse_image: bool = True) -> tuple[str, str]:
    """Build or fetch the template's image in buildah's storage; return (image, description)."""
    if template.dockerfile:
        df = Path(template.dockerfile)
        ctx = Path(template.context) if template.context else df.parent
        if not df.is_file():
            raise RootfsError(f"Dockerfile {df} of template {template.name!r} does not exist")
        if not ctx.is_dir():
            raise RootfsError(f"build context {ctx} of template {template.name!r} is not a directory")
        froms = dockerfile_froms(df.read_text(errors="replace"))
        local = True
        for ref in froms:
            if _is_base_ref(ref):
                await ensure_base_image_buildah(bh, data_root, log)
            elif "$" in ref or await bh.inspect_image(ref) is None:
                local = False
        pull = "never" if (template.no_pull or local) else "false"
        tag = image_tag(template.name)
        previous = await bh.inspect_image(tag)
        # Built from trenvx's base only: the image is a function of the Dockerfile, its context and
        # the base, all in the rootfs digest, so an image labelled with that digest is reused (an
        # agent or interpreter change used to re-run every RUN step, minutes of apt per build).
        digest = rootfs_input_digest(template)
        cacheable = bool(froms) and all(_is_base_ref(ref) for ref in froms)
        if reuse_image and cacheable and previous is not None and bh.labels(previous).get(ROOTFS_LABEL) == digest:
            log(f"rootfs: {tag} is up to date (Dockerfile, context and base unchanged)")
            return tag, f"Dockerfile {df} via buildah"
        log(f"rootfs: buildah build {df} (context {ctx}) -> {tag}")
        try:
            await bh(
                "build",
                "--isolation", "chroot",
                f"--pull={pull}",
                *host_ca_volume(),
                *(["--label", f"{ROOTFS_LABEL}={digest}"] if cacheable else []),
                "-f", df,
                "-t", tag,
                ctx,
                timeout=BUILD_TIMEOUT,
                stream=True,
            )  # fmt: skip
        except CommandError as e:
            hint = ""
            if not local and re.search(r"pinging container registry|dial tcp|no such host|i/o timeout|"
                                       r"initializing source|short-name", e.output):  # fmt: skip
                hint = (
                    "\nthe base image is not in trenvx's local storage and no registry is reachable: base the "
                    "Dockerfile on debian:bookworm (built offline by trenvx), or give the image as an archive "
                    "(docker_img = \"docker-archive:/path/image.tar\" or \"oci-archive:/path/image.tar\")"
                )
            raise RootfsError(f"buildah build of {df} for template {template.name!r} failed: {e.message}{hint}") from None
        await _remove_if_dangling(bh, previous, tag)
        return tag, f"Dockerfile {df} via buildah"

    if template.docker_img:
        img = template.docker_img
        arch = _archive_path(img)
        if arch is not None:
            if not arch.is_file():
                raise RootfsError(f"docker_img {img!r} of template {template.name!r}: archive {arch} does not exist")
            log(f"rootfs: loading {img}")
            _, out = await bh("pull", "--quiet", img, timeout=PULL_TIMEOUT, hint=f"is {arch} an image archive of that format?")
            image_id = out.strip().splitlines()[-1] if out.strip() else img
            return image_id, f"image archive {img} via buildah"
        if _is_base_ref(img):
            return await ensure_base_image_buildah(bh, data_root, log), f"image {img} (trenvx debootstrap base) via buildah"
        if await bh.inspect_image(img) is not None:
            return img, f"local image {img} via buildah"
        if template.no_pull:
            raise RootfsError(
                f"docker_img {img!r} of template {template.name!r} is not in trenvx's buildah storage "
                f"({bh.root}) and no_pull is set; load it first or give an archive path"
            )
        log(f"rootfs: pulling {img}")
        try:
            await bh("pull", img, timeout=PULL_TIMEOUT, stream=True)
        except CommandError as e:
            raise RootfsError(
                f"cannot pull {img!r} for template {template.name!r}: {e.message}\nno registry may be reachable from "
                f"this host; save the image elsewhere (docker save -o image.tar {img}) and set "
                f"docker_img = \"docker-archive:/path/image.tar\", or use a Dockerfile FROM debian:bookworm"
            ) from None
        return img, f"image {img} pulled via buildah"

    image = await ensure_base_image_buildah(bh, data_root, log)
    return image, f"debootstrap {BASE_SUITE} {BASE_VARIANT} (+{','.join(BASE_INCLUDE)}) via buildah"


@asynccontextmanager
async def _buildah_rootfs(template: TemplateConfig, data_root: DataRoot, log: Log, digest: str,
                          reuse_image: bool = True) -> AsyncIterator[RootfsTree]:
    bh = Buildah(data_root, log)
    await bh.remove_stale_containers()
    image, source = await _buildah_image_for(template, bh, data_root, log, reuse_image)
    name = _container_name()
    try:
        # inside the try: a cancel during `from` (a full copy with vfs) must still remove the container
        await bh("from", "--pull=never", "--quiet", "--name", name, image, timeout=COPY_TIMEOUT)
        _, out = await bh("mount", name)
        lines = out.strip().splitlines()
        if not lines:
            raise RootfsError(f"buildah mount {name} printed no mount point")
        path = Path(lines[-1].strip())
        if not path.is_dir():
            raise RootfsError(f"buildah mount {name} gave {path}, which is not a directory")
        yield RootfsTree(path=path, source=source, digest=digest)
    finally:
        await _uncancellable(_buildah_cleanup(bh, name))


# ---------------------------------------------------------------------------------------------
# docker (when an engine answers)


async def docker_available() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        rc, _ = await run("rootfs", ["docker", "info", "--format", "{{.ServerVersion}}"], timeout=15, check=False)
    except CommandError:
        return False
    return rc == 0


async def _docker_has(ref: str) -> bool:
    rc, _ = await run("rootfs", ["docker", "image", "inspect", ref], timeout=QUICK_TIMEOUT, check=False)
    return rc == 0


async def ensure_base_image_docker(data_root: DataRoot, log: Log) -> str:
    digest = base_digest()
    rc, out = await run(
        "rootfs",
        ["docker", "image", "inspect", "--format", f'{{{{index .Config.Labels "{BASE_LABEL}"}}}}', BASE_IMAGE],
        timeout=QUICK_TIMEOUT,
        check=False,
    )
    if rc != 0 or out.strip() != digest:
        tree = await ensure_debootstrap(data_root, log)
        log(f"rootfs: importing the base tree into docker as {BASE_IMAGE}")
        work = Path(tempfile.mkdtemp(prefix=".docker-import-", dir=data_root.cache))
        try:
            tar = work / "base.tar"
            await run("rootfs", ["tar", "--numeric-owner", "--xattrs", "-C", tree, "-cf", tar, "."], timeout=COPY_TIMEOUT)
            await run(
                "rootfs",
                ["docker", "import", "--change", f"LABEL {BASE_LABEL}={digest}", "--change", 'CMD ["/bin/bash"]',
                 "--change", "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", tar, BASE_IMAGE],
                timeout=COPY_TIMEOUT,
            )  # fmt: skip
        finally:
            shutil.rmtree(work, ignore_errors=True)
    for alias in BASE_ALIASES:
        if not await _docker_has(alias):
            await run("rootfs", ["docker", "tag", BASE_IMAGE, alias], timeout=QUICK_TIMEOUT)
    return BASE_IMAGE


async def _docker_image_for(template: TemplateConfig, data_root: DataRoot, log: Log) -> tuple[str, str]:
    if template.dockerfile:
        df = Path(template.dockerfile)
        ctx = Path(template.context) if template.context else df.parent
        for ref in dockerfile_froms(df.read_text(errors="replace")):
            if _is_base_ref(ref) and not await _docker_has(ref):
                await ensure_base_image_docker(data_root, log)
        tag = image_tag(template.name)
        log(f"rootfs: docker build {df} (context {ctx}) -> {tag}")
        try:
            await run(
                "rootfs", ["docker", "build", "-f", df, "-t", tag, ctx],
                timeout=BUILD_TIMEOUT, log=log, log_prefix="docker: ",
            )  # fmt: skip
        except CommandError as e:
            raise RootfsError(f"docker build of {df} for template {template.name!r} failed: {e.message}") from None
        return tag, f"Dockerfile {df} via docker"
    if template.docker_img:
        img = template.docker_img
        if img.startswith("docker-archive:"):
            arch = _archive_path(img)
            _, out = await run("rootfs", ["docker", "load", "-i", arch], timeout=PULL_TIMEOUT)
            m = re.search(r"Loaded image(?: ID)?: (\S+)", out)
            if not m:
                raise RootfsError(f"docker load -i {arch} named no image: {out[-500:]}")
            return m.group(1), f"image archive {img} via docker"
        if img.startswith("oci-archive:"):
            raise RootfsError(
                f"docker_img {img!r}: OCI archives are loaded with buildah; run with TRENVX_BUILDER=buildah"
            )
        if _is_base_ref(img) and not await _docker_has(img):
            return await ensure_base_image_docker(data_root, log), f"image {img} (trenvx debootstrap base) via docker"
        if not await _docker_has(img):
            if template.no_pull:
                raise RootfsError(f"docker_img {img!r} is not in docker's local images and no_pull is set")
            try:
                await run("rootfs", ["docker", "pull", img], timeout=PULL_TIMEOUT, log=log, log_prefix="docker: ")
            except CommandError as e:
                raise RootfsError(f"cannot pull {img!r} for template {template.name!r}: {e.message}") from None
        return img, f"image {img} via docker"
    return await ensure_base_image_docker(data_root, log), f"debootstrap {BASE_SUITE} {BASE_VARIANT} via docker"


@asynccontextmanager
async def _docker_rootfs(template: TemplateConfig, data_root: DataRoot, log: Log, digest: str,
                         reuse_image: bool = True) -> AsyncIterator[RootfsTree]:
    # (docker's own layer cache decides what a build re-runs; reuse_image is buildah's)
    image, source = await _docker_image_for(template, data_root, log)
    work = Path(tempfile.mkdtemp(prefix=".rootfs-", dir=data_root.cache))
    name = _container_name()
    try:
        await run("rootfs", ["docker", "create", "--name", name, image, "/bin/true"], timeout=QUICK_TIMEOUT)
        try:
            tar = work / "rootfs.tar"
            await run("rootfs", ["docker", "export", "-o", tar, name], timeout=COPY_TIMEOUT)
        finally:
            await _uncancellable(run("rootfs", ["docker", "rm", "-f", name], timeout=QUICK_TIMEOUT, check=False))
        tree = work / "tree"
        tree.mkdir()
        await run("rootfs", ["tar", "--numeric-owner", "--xattrs", "-xpf", tar, "-C", tree], timeout=COPY_TIMEOUT)
        tar.unlink()
        yield RootfsTree(path=tree, source=source, digest=digest)
    finally:
        await _uncancellable(_remove_tree(work))


# ---------------------------------------------------------------------------------------------


async def choose_builder() -> str:
    forced = os.environ.get("TRENVX_BUILDER", "").strip().lower()
    if forced in ("buildah", "docker"):
        return forced
    if forced and forced != "auto":
        raise RootfsError(f"TRENVX_BUILDER={forced!r}: use buildah, docker or auto")
    return "docker" if await docker_available() else "buildah"


@asynccontextmanager
async def prepared_rootfs(template: TemplateConfig, data_root: DataRoot, log: Log = print, *,
                          reuse_image: bool = True) -> AsyncIterator[RootfsTree]:
    """Yield the template's root filesystem as a writable directory; clean up everything on exit.
    ``reuse_image=False``: build a Dockerfile's image again even if its inputs are unchanged."""
    data_root.cache.mkdir(parents=True, exist_ok=True)
    digest = rootfs_input_digest(template)
    builder = await choose_builder()
    cm = _docker_rootfs if builder == "docker" else _buildah_rootfs
    async with cm(template, data_root, log, digest, reuse_image) as tree:
        yield tree


__all__ = [
    "RootfsTree",
    "prepared_rootfs",
    "rootfs_input_digest",
    "ensure_debootstrap",
    "dockerfile_froms",
    "normalize_ref",
    "image_tag",
]

