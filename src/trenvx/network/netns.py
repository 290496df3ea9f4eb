"""Network namespaces without forking: create, enter for one call, delete.

Linux lets a *thread* switch its network namespace (``setns(fd, CLONE_NEWNET)``) without touching
the rest of the process, and a socket stays in the namespace it was created in whatever thread
uses it later. So everything done "inside" a sandbox's namespace (configuring its links with
netlink, loading its nftables rules, opening the DNS and egress-proxy sockets there) runs as a
call on a small pool of worker threads that enter the namespace, do the call and come back;
the asyncio loop never changes namespace. No ``ip netns exec``, no fork (pyroute2's own netns
helpers fork a child per call: tens of ms in a large process).

Namespaces are named files under ``/run/netns`` (bind mounts of the namespace), as iproute2
makes them, so ``ip netns list`` and ``ip netns exec`` see them too.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import functools
import os
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
MS_BIND = 4096
MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)
_executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="trenvx-netns")
_tenant_executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="trenvx-netns-tenant")
"""Sockets made for a guest's own traffic (its DNS queries and egress-proxy connections): a guest
opening connections quickly must not delay other tenants' slots and rule changes."""
_host_ns_fd: int | None = None
_host_lock = threading.Lock()


class NetnsError(OSError):
    """A namespace could not be created, entered or removed; the message says which and why."""


def _host_fd() -> int:
    """A descriptor of the namespace this process started in (where threads come back to)."""
    global _host_ns_fd
    with _host_lock:
        if _host_ns_fd is None:
            _host_ns_fd = os.open(f"/proc/{os.getpid()}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        return _host_ns_fd


def _setns(fd: int, what: str) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise NetnsError(e, f"setns into {what}: {os.strerror(e)}")


def path_of(name: str) -> Path:
    return NETNS_DIR / name


def exists(name: str) -> bool:
    return path_of(name).exists()


def names(prefix: str = "") -> list[str]:
    """Named namespaces under /run/netns starting with ``prefix``."""
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(prefix))
    except FileNotFoundError:
        return []


def _run_in(name: str, fn: Callable[[], T]) -> T:
    """In the calling worker thread: enter namespace ``name``, call ``fn``, come back."""
    host = _host_fd()
    try:
        ns_fd = os.open(path_of(name), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NetnsError(errno.ENOENT, f"network namespace {name} does not exist") from None
    try:
        _setns(ns_fd, f"network namespace {name}")
        try:
            return fn()
        finally:
            _setns(host, "the host's network namespace")  # a thread that cannot come back raises
    finally:
        os.close(ns_fd)


async def call_in(name: str, fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)`` run inside namespace ``name`` (on a worker thread)."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_executor, _run_in, name, functools.partial(fn, *args))


def _run_in_host(fn: Callable[[], T]) -> T:
    """In the calling worker thread: make sure it is in the host's namespace, then call ``fn``.
    (Every call enters its namespace explicitly: a thread that once failed to come back from a
    sandbox's namespace can never do host work in there.)"""
    _setns(_host_fd(), "the host's network namespace")
    return fn()


async def call_host(fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)`` on a worker thread in the host's namespace (blocking netlink calls: pyroute2's
    synchronous IPRoute cannot run on a thread whose event loop is running)."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_executor, _run_in_host, functools.partial(fn, *args))


def run_in(name: str, fn: Callable[..., T], *args: object) -> T:
    """Blocking form of :func:`call_in` (for code that is already off the event loop)."""
    return _executor.submit(_run_in, name, functools.partial(fn, *args)).result()


def _create(name: str) -> None:
    NETNS_DIR.mkdir(parents=True, exist_ok=True)
    path = path_of(name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0o444)
    except FileExistsError:
        raise NetnsError(errno.EEXIST, f"network namespace {name} already exists") from None
    os.close(fd)
    host = _host_fd()
    try:
        if _libc.unshare(CLONE_NEWNET) != 0:
            e = ctypes.get_errno()
            raise NetnsError(e, f"unshare(CLONE_NEWNET) for {name}: {os.strerror(e)} (root needed)")
        try:
            src = f"/proc/self/task/{threading.get_native_id()}/ns/net".encode()
            if _libc.mount(src, str(path).encode(), b"none", MS_BIND, None) != 0:
                e = ctypes.get_errno()
                raise NetnsError(e, f"bind-mounting network namespace {name}: {os.strerror(e)}")
        finally:
            _setns(host, "the host's network namespace")
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def run_in_new(name: str) -> None:
    """Blocking :func:`create` (for probes run outside an event loop)."""
    _executor.submit(_create, name).result()


async def create(name: str) -> None:
    """Create the named namespace ``name`` (fails if it exists)."""
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(_executor, _create, name)


def delete(name: str) -> bool:
    """Remove the name of namespace ``name``; it ends when nothing (process, socket) is left in it.
    False if it did not exist."""
    path = path_of(name)
    if not path.exists():
        return False
    _libc.umount2(str(path).encode(), MNT_DETACH)
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


async def asocket_in(name: str, family: int, kind: int, proto: int = 0, *, per_tenant: bool = False) -> socket.socket:
    """A new socket that lives in namespace ``name`` (``per_tenant``: for a guest's own traffic,
    on threads of their own)."""
    loop = asyncio.get_running_loop()
    pool = _tenant_executor if per_tenant else _executor
    return await loop.run_in_executor(pool, _run_in, name, functools.partial(socket.socket, family, kind, proto))


def write_sysctl(key: str, value: str) -> None:
    """Write ``/proc/sys/<key>`` (net.* keys are per namespace: call through :func:`call_in`)."""
    Path("/proc/sys", *key.split(".")).write_text(value)
