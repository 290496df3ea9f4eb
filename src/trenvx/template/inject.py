"""What trenvx puts into every root filesystem: the guest agent, tini, the init, the user ``user``.

Layout inside the tree::

    /opt/trenvx/init                 PID 1 (a /bin/sh script): mounts, then exec tini
    /opt/trenvx/bin/tini             the host's /usr/bin/tini-static (Debian package tini)
    /opt/trenvx/trenvx_agent/*.py    the guest agent (python3 -m trenvx_agent)

The tree comes from a user's image: every path is resolved inside the tree (a symlink such as
``/etc/passwd -> /somewhere`` points into the tree, never to the host).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import time
from pathlib import Path

from trenvx.config import AGENT_PORT
from trenvx.build_errors import InjectError

TINI_SOURCE = Path("/usr/bin/tini-static")
GUEST_DIR = "opt/trenvx"
AGENT_PACKAGE = "trenvx_agent"
USER_NAME = "user"
USER_ID = 1000
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
# paths inside a foreign tree


def in_tree(tree: Path, rel: str | os.PathLike[str], follow_last: bool = True) -> Path:
    """Resolve ``rel`` like a chroot at ``tree`` would: symlinks (absolute or relative) stay
    inside the tree. Missing components are fine (the path may be created)."""
    tree = Path(tree)
    parts = [p for p in Path(rel).parts if p not in ("/", "", ".")]
    resolved: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = tree.joinpath(*resolved, part)
        if candidate.is_symlink() and (parts or follow_last):
            hops += 1
            if hops > 40:
                raise InjectError(f"too many levels of symbolic links resolving /{Path(rel)} in {tree}")
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in Path(target).parts if p not in ("/", "", ".")] + parts
            continue
        resolved.append(part)
    return tree.joinpath(*resolved)


def _mkdirs(tree: Path, rel: str, mode: int = 0o755) -> Path:
    p = in_tree(tree, rel)
    if p.is_symlink():
        raise InjectError(f"/{rel} in the image is a dangling symbolic link; cannot create a directory there")
    p.mkdir(parents=True, exist_ok=True, mode=mode)
    return p


def _write(path: Path, data: bytes | str, mode: int) -> None:
    """Replace ``path`` (already resolved inside the tree) by a regular file."""
    if isinstance(data, str):
        data = data.encode()
    if path.is_symlink() or path.exists() and not path.is_file():
        if path.is_dir() and not path.is_symlink():
            raise InjectError(f"{path} is a directory; expected a file")
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.trenvx-tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------


def inject_guest_files(tree: Path, agent_src: Path) -> None:
    """Put the agent, tini, ``/opt/trenvx/init``, the user ``user`` and an empty machine-id into
    ``tree`` (a root filesystem directory we may modify)."""
    tree = Path(tree)
    agent_src = Path(agent_src)
    if not tree.is_dir():
        raise InjectError(f"root filesystem tree {tree} is not a directory")
    sources = sorted(p for p in agent_src.rglob("*.py") if "__pycache__" not in p.parts) if agent_src.is_dir() else []
    if not sources:
        raise InjectError(f"no guest agent to install: {agent_src} holds no *.py files")
    if not TINI_SOURCE.is_file():
        raise InjectError(f"{TINI_SOURCE} is missing; apt-get install tini (or run scripts/start.sh setup)")

    for d in ("proc", "sys", "dev", "run", "etc", "root"):
        _mkdirs(tree, d)
    tmp = _mkdirs(tree, "tmp")
    os.chmod(tmp, 0o1777)

    base = _mkdirs(tree, GUEST_DIR)
    agent_dir = base / AGENT_PACKAGE
    if agent_dir.is_symlink() or agent_dir.is_file():
        agent_dir.unlink()
    elif agent_dir.exists():
        shutil.rmtree(agent_dir)
    agent_dir.mkdir(mode=0o755)
    for src in sources:
        rel = src.relative_to(agent_src)
        dst = agent_dir / rel
        dst.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        _write(dst, src.read_bytes(), 0o644)

    bindir = base / "bin"
    if bindir.is_symlink():
        bindir.unlink()
    bindir.mkdir(exist_ok=True, mode=0o755)
    _write(bindir / "tini", TINI_SOURCE.read_bytes(), 0o755)
    _write(base / "init", init_script(), 0o755)

    _ensure_user(tree)
    _write(in_tree(tree, "etc/machine-id"), b"", 0o444)


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


def _ids(lines: list[str], field: int) -> set[int]:
    ids = set()
    for line in lines:
        f = line.split(":")
        if len(f) > field and f[field].isdigit():
            ids.add(int(f[field]))
    return ids


def _ensure_user(tree: Path) -> None:
    passwd_p = in_tree(tree, "etc/passwd")
    group_p = in_tree(tree, "etc/group")
    passwd = _read_lines(passwd_p)
    group = _read_lines(group_p)
    if not passwd:
        raise InjectError(f"the image has no /etc/passwd ({passwd_p}); is it a Linux root filesystem?")
    shell = "/bin/bash" if os.path.lexists(in_tree(tree, "bin/bash")) else "/bin/sh"

    user = next((line.split(":") for line in passwd if line.split(":")[0] == USER_NAME), None)
    if user is None:
        grp = next((line.split(":") for line in group if line.split(":")[0] == USER_NAME), None)
        used_uids = _ids(passwd, 2)
        uid = USER_ID
        while uid in used_uids:
            uid += 1
        if grp is not None and grp[2].isdigit():
            gid = int(grp[2])
        else:
            used_gids = _ids(group, 2)
            gid = uid if uid not in used_gids else USER_ID
            while gid in used_gids:
                gid += 1
            _write(group_p, "\n".join(group + [f"{USER_NAME}:x:{gid}:"]) + "\n", 0o644)
            gshadow_p = in_tree(tree, "etc/gshadow")
            if gshadow_p.is_file():
                _write(gshadow_p, "\n".join(_read_lines(gshadow_p) + [f"{USER_NAME}:!::"]) + "\n", _mode(gshadow_p, 0o640))
        _write(passwd_p, "\n".join(passwd + [f"{USER_NAME}:x:{uid}:{gid}::/home/{USER_NAME}:{shell}"]) + "\n", 0o644)
        shadow_p = in_tree(tree, "etc/shadow")
        if shadow_p.is_file():
            days = int(time.time() // 86400)
            line = f"{USER_NAME}:*:{days}:0:99999:7:::"
            _write(shadow_p, "\n".join(_read_lines(shadow_p) + [line]) + "\n", _mode(shadow_p, 0o640))
    else:
        uid = int(user[2]) if user[2].isdigit() else USER_ID
        gid = int(user[3]) if len(user) > 3 and user[3].isdigit() else uid

    home = in_tree(tree, f"home/{USER_NAME}")
    if not home.exists():
        _mkdirs(tree, "home")
        home.mkdir(mode=0o750)
        skel = in_tree(tree, "etc/skel")
        if skel.is_dir():
            for item in skel.iterdir():
                dst = home / item.name
                if item.is_dir() and not item.is_symlink():
                    shutil.copytree(item, dst, symlinks=True)
                else:
                    shutil.copy2(item, dst, follow_symlinks=False)
        for dirpath, dirnames, filenames in os.walk(home):
            os.lchown(dirpath, uid, gid)
            for n in dirnames + filenames:
                os.lchown(os.path.join(dirpath, n), uid, gid)


def _mode(p: Path, default: int) -> int:
    try:
        return stat.S_IMODE(p.stat().st_mode)
    except OSError:
        return default


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
