"""Exceptions of the build pipeline (kernel, initramfs, root filesystem, image), and the one
subprocess runner that raises them.

Every error names the stage that failed, what failed and, where we know it, what to do::

    BuildError("rootfs", "buildah build of /x/y.Dockerfile failed (exit 1): ...")

The runner starts programs with ``asyncio.create_subprocess_exec`` (never a shell), in their own
process group, with a timeout; on timeout or cancellation the whole group is killed.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

SETUP_HINT = "install the system packages with `scripts/start.sh setup`"

# The Debian package that provides each program we run, for "not found" messages.
PACKAGE_OF = {
    "apt-get": "apt",
    "apt-cache": "apt",
    "dpkg-deb": "dpkg",
    "buildah": "buildah",
    "debootstrap": "debootstrap",
    "mkfs.ext4": "e2fsprogs",
    "qemu-system-x86_64": "qemu-system-x86",
    "zstd": "zstd",
    "docker": "docker.io",
    "tar": "tar",
    "umount": "mount",
}


class BuildError(Exception):
    """A build stage failed. ``stage`` is one of kernel, initramfs, rootfs, inject, image, ..."""

    def __init__(self, stage: str, message: str):
        super().__init__(f"{stage}: {message}")
        self.stage = stage
        self.message = message


class CommandError(BuildError):
    """A program exited non-zero, timed out, or could not be started."""

    def __init__(
        self,
        stage: str,
        argv: Sequence[str],
        message: str,
        returncode: int | None = None,
        output: str = "",
    ):
        super().__init__(stage, message)
        self.argv = list(argv)
        self.returncode = returncode
        self.output = output


class KernelError(BuildError):
    def __init__(self, message: str):
        super().__init__("kernel", message)


class InitramfsError(BuildError):
    def __init__(self, message: str):
        super().__init__("initramfs", message)


class RootfsError(BuildError):
    def __init__(self, message: str):
        super().__init__("rootfs", message)


class InjectError(BuildError):
    def __init__(self, message: str):
        super().__init__("inject", message)


class ImageError(BuildError):
    def __init__(self, message: str):
        super().__init__("image", message)


Log = Callable[[str], object]


def _quote(argv: Sequence[str]) -> str:
    import shlex

    return " ".join(shlex.quote(str(a)) for a in argv)


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    except PermissionError:  # not our group (should not happen): kill the process itself
        try:
            proc.kill()
        except ProcessLookupError:
            pass


async def run(
    stage: str,
    argv: Sequence[str | os.PathLike[str]],
    *,
    timeout: float,
    log: Log | None = None,
    log_prefix: str = "",
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    hint: str = "",
    stdin_devnull: bool = True,
    tail_lines: int = 40,
) -> tuple[int, str]:
    """Run ``argv``; return (exit code, combined stdout+stderr).

    With ``log``, every output line is passed to it as it arrives (for long builds). On a non-zero
    exit (when ``check``), a timeout, or a missing program, raise :class:`CommandError` whose
    message holds the command, the last ``tail_lines`` of output and ``hint``.
    """
    args = [str(a) for a in argv]
    full_env = None
    if env is not None:
        full_env = {**os.environ, **env}
    try:
        proc = await asyncio.create_subprocess_exec(
            *args,
            stdin=asyncio.subprocess.DEVNULL if stdin_devnull else None,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            cwd=str(cwd) if cwd is not None else None,
            env=full_env,
            start_new_session=True,
        )
    except FileNotFoundError:
        prog = Path(args[0]).name
        pkg = PACKAGE_OF.get(prog)
        what = f"install the Debian package {pkg!r} ({SETUP_HINT})" if pkg else SETUP_HINT
        raise CommandError(stage, args, f"program {prog!r} not found; {what}") from None
    except PermissionError as e:
        raise CommandError(stage, args, f"cannot execute {args[0]}: {e}") from None

    lines: list[str] = []
    tail: deque[str] = deque(maxlen=tail_lines)

    def emit(raw: bytes) -> None:
        line = raw.decode(errors="replace").rstrip("\r")
        if "\r" in line:  # progress bars redraw with CR: keep the last state of the line
            line = line.rsplit("\r", 1)[-1]
        lines.append(line)
        tail.append(line)
        if log is not None:
            log(f"{log_prefix}{line}")

    async def pump() -> None:
        # Read chunks, not readline(): a progress bar without newlines can exceed any line limit.
        assert proc.stdout is not None
        buf = b""
        while True:
            chunk = await proc.stdout.read(65536)
            if not chunk:
                break
            buf += chunk
            *complete, buf = buf.split(b"\n")
            for raw in complete:
                emit(raw)
            if len(buf) > 1 << 20:  # a megabyte without a newline: cut it
                emit(buf)
                buf = b""
        if buf:
            emit(buf)
        await proc.wait()

    try:
        await asyncio.wait_for(pump(), timeout)
    except asyncio.TimeoutError:
        _kill_group(proc)
        await proc.wait()
        out = "\n".join(tail)
        raise CommandError(
            stage,
            args,
            f"`{_quote(args)}` did not finish within {timeout:g} s and was killed"
            + (f"; last output:\n{out}" if out else "")
            + (f"\n{hint}" if hint else ""),
            None,
            "\n".join(lines),
        ) from None
    except BaseException:  # cancelled: never leave the child running
        _kill_group(proc)
        try:
            await asyncio.shield(proc.wait())
        except BaseException:
            pass
        raise
    output = "\n".join(lines)
    rc = proc.returncode
    assert rc is not None
    if check and rc != 0:
        out = "\n".join(tail)
        raise CommandError(
            stage,
            args,
            f"`{_quote(args)}` failed (exit {rc})"
            + (f"; last output:\n{out}" if out else "")
            + (f"\n{hint}" if hint else ""),
            rc,
            output,
        )
    return rc, output
