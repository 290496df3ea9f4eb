"""What trenvx puts into every root filesystem: the guest agent, tini, the init, the user ``user``
(its account: :mod:`trenvx.template.accounts`).

Layout inside the tree::

    /opt/trenvx/init                 PID 1 (a /bin/sh script): mounts, then exec tini
    /opt/trenvx/bin/tini             the host's /usr/bin/tini-static (Debian package tini)
    /opt/trenvx/trenvx_agent/*.py    the guest agent (python3 -m trenvx_agent)
    /opt/trenvx/trenvx_interpreter/  the code interpreter's server (python3 -m trenvx_interpreter; started
                                     by templates that want it, e.g. ``code-interpreter``)

The tree comes from a user's image: every path is resolved inside the tree (a symlink such as
``/etc/passwd -> /somewhere`` points into the tree, never to the host: :mod:`trenvx.template.tree`).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from trenvx.config import AGENT_PORT
from trenvx.build_errors import InjectError

from .accounts import ensure_default_user
from .tree import in_tree, make_dirs, write_file

TINI_SOURCE = Path("/usr/bin/tini-static")
GUEST_DIR = "opt/trenvx"
AGENT_PACKAGE = "trenvx_agent"
INIT_MARKER = "trenvx-init: starting agent"
"""The rootfs init prints this line to the console right before it starts tini and the agent."""

PYTHON_CANDIDATES = ("usr/bin/python3", "usr/local/bin/python3")

INIT_SCRIPT = r"""#!/bin/sh
# /opt/trenvx/init: PID 1 of every trenvx VM, started by the initramfs (written by trenvx).
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8 TERM=linux

mount -t proc -o nosuid,nodev,noexec proc /proc 2>/dev/null
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys 2>/dev/null
[ -c /dev/null ] || mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts -o nosuid,noexec,gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /dev/shm
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /tmp
mount -t tmpfs -o nosuid,nodev,mode=755 tmpfs /run
mkdir -p /run/lock && chmod 1777 /run/lock
# devtmpfs has none of these; bash process substitution and many tools need them.
ln -sfn /proc/self/fd /dev/fd
ln -sfn /proc/self/fd/0 /dev/stdin
ln -sfn /proc/self/fd/1 /dev/stdout
ln -sfn /proc/self/fd/2 /dev/stderr
[ -e /dev/ptmx ] || ln -s pts/ptmx /dev/ptmx
[ -s /etc/hostname ] && cat /etc/hostname > /proc/sys/kernel/hostname 2>/dev/null
# The sandbox's identity files live in memory, bind-mounted over /etc as a container's are: the
# agent's /init rewrites them in every restored sandbox, and a first write through overlayfs and
# ext4 (a copy-up) cost every restore ~100 ms of translation under TCG. They are in the VM's
# memory, so pauses, forks and snapshots keep them; /init writes them again after a boot from disk.
mkdir -p /run/trenvx/etc
for f in hostname hosts machine-id; do
	[ -e /etc/$f ] || : > /etc/$f
	cat /etc/$f > /run/trenvx/etc/$f 2>/dev/null
	mount -o bind /run/trenvx/etc/$f /etc/$f 2>/dev/null
done

# trenvx.dns=IP[,IP...] on the kernel command line: the resolver the sandbox network offers.
for a in $(cat /proc/cmdline); do
	case "$a" in
	trenvx.dns=*)
		rm -f /etc/resolv.conf
		for ns in $(echo "${a#trenvx.dns=}" | tr ',' ' '); do echo "nameserver $ns"; done > /etc/resolv.conf
		;;
	esac
done

TRENVX_PYTHON=/usr/bin/python3
[ -x "$TRENVX_PYTHON" ] || TRENVX_PYTHON=/usr/local/bin/python3
export TRENVX_PYTHON

echo "@MARKER@ on port @PORT@" > /dev/console
exec /opt/trenvx/bin/tini -s -g -- /bin/sh -c 'while :; do PYTHONPATH=/opt/trenvx "$TRENVX_PYTHON" -u -m trenvx_agent --port @PORT@; echo "trenvx agent exited $?" > /dev/console; sleep 0.2; done'
"""


def init_script(port: int = AGENT_PORT) -> str:
    return INIT_SCRIPT.replace("@MARKER@", INIT_MARKER).replace("@PORT@", str(port))


# ---------------------------------------------------------------------------------------------


def inject_guest_files(tree: Path, agent_src: Path, packages: dict[str, Path] | None = None) -> None:
    """Put the agent, tini, ``/opt/trenvx/init``, the user ``user`` and an empty machine-id into
    ``tree`` (a root filesystem directory we may modify); ``packages``: more guest Python packages
    (``/opt/trenvx/<name>/``, from the source folder given)."""
    tree = Path(tree)
    agent_src = Path(agent_src)
    if not tree.is_dir():
        raise InjectError(f"root filesystem tree {tree} is not a directory")
    sources = guest_sources(agent_src)
    if not sources:
        raise InjectError(f"no guest agent to install: {agent_src} holds no *.py files")
    if not TINI_SOURCE.is_file():
        raise InjectError(f"{TINI_SOURCE} is missing; apt-get install tini (or run scripts/start.sh setup)")

    for d in ("proc", "sys", "dev", "run", "etc", "root"):
        make_dirs(tree, d)
    tmp = make_dirs(tree, "tmp")
    os.chmod(tmp, 0o1777)

    base = make_dirs(tree, GUEST_DIR)
    _install_package(base / AGENT_PACKAGE, agent_src, sources)
    for name, src_dir in (packages or {}).items():
        _install_package(base / name, src_dir, guest_sources(src_dir))

    bindir = base / "bin"
    if bindir.is_symlink():
        bindir.unlink()
    bindir.mkdir(exist_ok=True, mode=0o755)
    write_file(bindir / "tini", TINI_SOURCE.read_bytes(), 0o755)
    write_file(base / "init", init_script(), 0o755)

    ensure_default_user(tree)
    write_file(in_tree(tree, "etc/machine-id"), b"", 0o444)


def guest_sources(src_dir: Path) -> list[Path]:
    """The ``*.py`` files of a guest package's source folder (none if it does not exist)."""
    return sorted(p for p in Path(src_dir).rglob("*.py") if "__pycache__" not in p.parts) if Path(src_dir).is_dir() else []


def _install_package(dest: Path, src_dir: Path, sources: list[Path]) -> None:
    """``dest`` (inside the tree) becomes exactly the package's sources, 0644 files in 0755 folders."""
    if dest.is_symlink() or dest.is_file():
        dest.unlink()
    elif dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(mode=0o755)
    for src in sources:
        dst = dest / src.relative_to(src_dir)
        dst.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        write_file(dst, src.read_bytes(), 0o644)


# ---------------------------------------------------------------------------------------------


_PY_INSTALL_HINT = (
    "install python3 in the image: add `RUN apt-get update && apt-get install -y --no-install-recommends "
    "python3` to the Dockerfile (python3-minimal is not enough), or base it on debian:bookworm, which "
    "trenvx builds with python3"
)


def check_python(tree: Path) -> None:
    """Raise :class:`InjectError` unless the tree has ``/usr/bin/python3`` (or
    ``/usr/local/bin/python3``) with the standard library's ``json`` module: the agent needs both."""
    tree = Path(tree)
    found_interp = None
    for cand in PYTHON_CANDIDATES:
        p = in_tree(tree, cand)
        if p.is_file():
            found_interp = (cand, p)
            break
    if found_interp is None:
        raise InjectError(f"the root filesystem has no /usr/bin/python3 (the guest agent runs on it); {_PY_INSTALL_HINT}")
    cand, real = found_interp
    m = re.match(r"python(\d+\.\d+)", real.name)
    versions = [m.group(1)] if m else []
    if not versions:
        versions = sorted(
            {d.name[len("python"):] for base in ("usr/lib", "usr/local/lib") for d in in_tree(tree, base).glob("python3.*")}
        )  # fmt: skip
    for v in versions:
        for base in ("usr/lib", "usr/local/lib"):
            lib = in_tree(tree, f"{base}/python{v}")
            if (lib / "json" / "__init__.py").is_file() or list((lib / "json").glob("__pycache__/__init__*.pyc")):
                return
            if in_tree(tree, f"{base}/python{v.replace('.', '')}.zip").is_file():
                return
    raise InjectError(
        f"/{cand} in the root filesystem lacks the standard library's json module "
        f"(python3-minimal only?); {_PY_INSTALL_HINT}"
    )


__all__ = ["inject_guest_files", "check_python", "init_script", "in_tree", "INIT_MARKER"]
