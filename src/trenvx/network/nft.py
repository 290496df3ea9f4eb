"""nftables through its own library, libnftables (Debian ``libnftables1``), not the ``nft`` command.

A ruleset is loaded as one nft script in one transaction: all of it applies or none does. The
library's netlink socket belongs to the namespace of the thread that made the context, so rules
of a sandbox's namespace are loaded through :func:`trenvx.network.netns.call_in`. A load costs a
fraction of a millisecond, which keeps rule changes off the cost of a create.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import subprocess
import threading

_lib: ctypes.CDLL | None = None
_lock = threading.Lock()
_run_lock = threading.Lock()
"""libnftables keeps process-wide caches (the interface cache among them) that are not safe to
use from two threads at once: seen as a spurious "Interface does not exist" while slots were made
in parallel. Runs are short (about a millisecond); one at a time."""


class NftError(RuntimeError):
    """libnftables refused a ruleset; the message has its error output and the script's start."""


def _library() -> ctypes.CDLL:
    global _lib
    with _lock:
        if _lib is None:
            name = ctypes.util.find_library("nftables") or "libnftables.so.1"
            try:
                lib = ctypes.CDLL(name)
            except OSError as e:
                raise NftError(
                    f"libnftables is not installed ({e}); install Debian's nftables package "
                    "(scripts/start.sh setup does)"
                ) from None
            lib.nft_ctx_new.restype = ctypes.c_void_p
            lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
            lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
            lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
            lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
            lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
            lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
            _lib = lib
        return _lib


def available() -> str:
    """Empty if libnftables can be loaded, else why not."""
    try:
        _library()
    except NftError as e:
        return str(e)
    return ""


FD_SETSIZE = 1024
FD_MARGIN = 64
"""libnftables waits on its netlink socket with select(), whose fd_set holds descriptors below
FD_SETSIZE: a socket numbered 1024 or more aborts the whole process (glibc's fortify check; seen:
the server died with ~200 sandboxes open). With the process's descriptors near that, a script runs
through the ``nft`` command instead (a child of this thread: same namespace; ~10 ms, not ~1 ms)."""


def _fds_in_use() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


def run(script: str) -> str:
    """Run an nft script in the calling thread's network namespace; its output (``list`` commands)."""
    lib = _library()
    with _run_lock:
        if _fds_in_use() >= FD_SETSIZE - FD_MARGIN:
            return _run_command(script)
        return _run_locked(lib, script)


def _run_command(script: str) -> str:
    try:
        r = subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise NftError("the nft command is not installed; install Debian's nftables package "
                       "(scripts/start.sh setup does)") from None
    except subprocess.TimeoutExpired:
        raise NftError("the nft command did not finish within 30 s") from None
    if r.returncode != 0:
        head = "\n".join(script.strip().splitlines()[:6])
        raise NftError(f"nftables refused the ruleset: {r.stderr.strip() or 'no reason given'}\n(script starts: {head})")
    return r.stdout


def _run_locked(lib: ctypes.CDLL, script: str) -> str:
    ctx = lib.nft_ctx_new(0)
    if not ctx:
        raise NftError("nft_ctx_new failed")
    try:
        lib.nft_ctx_buffer_output(ctx)
        lib.nft_ctx_buffer_error(ctx)
        rc = lib.nft_run_cmd_from_buffer(ctx, script.encode())
        out = (lib.nft_ctx_get_output_buffer(ctx) or b"").decode(errors="replace")
        if rc != 0:
            err = (lib.nft_ctx_get_error_buffer(ctx) or b"").decode(errors="replace").strip()
            head = "\n".join(script.strip().splitlines()[:6])
            raise NftError(f"nftables refused the ruleset: {err or 'no reason given'}\n(script starts: {head})")
        return out
    finally:
        lib.nft_ctx_free(ctx)
