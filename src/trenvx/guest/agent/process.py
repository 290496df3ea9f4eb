"""Processes of the sandbox: spawning, output fan-out, input, signals, PTYs, reaping.

A :class:`ManagedProcess` is a child of the agent. One pump thread reads its stdout and
stderr (or its PTY master) as data arrives and publishes each chunk, in the order read, to
every :class:`Subscriber` (one per open Start/Connect stream). A waiter thread reaps it
(``waitpid`` on its own pid only: the agent is not pid 1), lets the pump drain what is
left in the pipes, then publishes the end event. Nobody listening is fine: output is then
dropped, and the process runs on whether or not a client is attached.

:class:`ProcessService` implements envd's ``process.Process`` RPCs on top of that. A Start
request's ``Connect-Timeout-Ms`` is the command's deadline, as in envd: then the process (its
whole process group) is killed and the stream ends with the Connect error ``deadline_exceeded``
rather than an end event; a Connect stream's deadline ends only that stream.
"""

from __future__ import annotations

import fcntl
import logging
import os
import pty
import queue
import select
import signal
import struct
import subprocess
import termios
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from . import pbjson
from .connect import ConnectError, RpcContext, ServerStream, StreamClosed
from .state import AgentState
from .users import User, acting_as, lookup_user, resolve_path

log = logging.getLogger("trenvx_agent.process")

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
READ_CHUNK = 32 << 10
#: How long output from grandchildren that still hold the pipes is read after the
#: process itself exited, before the end event is sent.
DRAIN_AFTER_EXIT_S = 0.5
#: Queue length (chunks) per subscriber; a full queue applies backpressure.
SUBSCRIBER_QUEUE = 512

SIGNALS: dict[str, int] = {"SIGNAL_UNSPECIFIED": 0, "SIGNAL_SIGTERM": 15, "SIGNAL_SIGKILL": 9}


@dataclass(frozen=True)
class OutputEvent:
    """A chunk of output: ``kind`` is ``stdout``, ``stderr`` or ``pty``."""

    kind: str
    data: bytes


@dataclass(frozen=True)
class EndEvent:
    """How the process ended, in envd's terms (Go's ``ProcessState``)."""

    exit_code: int
    exited: bool
    status: str
    error: str | None

    def to_json(self) -> dict[str, Any]:
        return pbjson.prune(
            {"exitCode": self.exit_code, "exited": self.exited, "status": self.status, "error": self.error}
        )


Event = OutputEvent | EndEvent


class Subscriber:
    """The queue of events for one attached stream."""

    def __init__(self) -> None:
        self.queue: queue.Queue[Event] = queue.Queue(SUBSCRIBER_QUEUE)
        self.closed = False

    def put(self, event: Event) -> None:
        """Enqueue, waiting while the queue is full unless the stream went away."""
        while not self.closed:
            try:
                self.queue.put(event, timeout=0.25)
                return
            except queue.Full:
                continue


@dataclass
class ProcessSpec:
    """Everything needed to start one process."""

    cmd: str
    args: list[str]
    envs: dict[str, str]
    cwd: str | None
    user: User
    tag: str | None = None
    pty_size: tuple[int, int] | None = None  # (cols, rows)
    stdin: bool = True
    timeout_s: float | None = None
    config: dict[str, Any] = field(default_factory=dict)  # ProcessConfig as received, for List


def _set_controlling_tty() -> None:  # runs in the child between fork and exec
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _set_winsize(fd: int, cols: int, rows: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _end_event(returncode: int) -> EndEvent:
    if returncode >= 0:
        status = f"exit status {returncode}"
        return EndEvent(returncode, True, status, status if returncode else None)
    signum = -returncode
    try:
        name = (signal.strsignal(signum) or f"signal {signum}").lower()
    except ValueError:
        name = f"signal {signum}"
    status = f"signal: {name}"
    return EndEvent(-1, False, status, status)


class ManagedProcess:
    """One child process of the agent and the streams attached to it."""

    def __init__(self, spec: ProcessSpec, env: dict[str, str], cwd: str) -> None:
        self.spec = spec
        self.tag = spec.tag
        self._lock = threading.Lock()
        self._subs: list[Subscriber] = []
        self._end: EndEvent | None = None
        self._stdin_lock = threading.Lock()
        self._stdin_fd: int | None = None
        self.master_fd: int | None = None
        self._wake_r, self._wake_w = os.pipe()
        self._exited = threading.Event()
        self._on_end: list[Any] = []
        #: Set once the process was killed because its Start request's deadline passed.
        self.deadline_killed = False

        kwargs: dict[str, Any] = {}
        if os.geteuid() == 0:
            kwargs.update(user=spec.user.uid, group=spec.user.gid, extra_groups=list(spec.user.groups))
        elif spec.user.uid != os.geteuid():
            raise ConnectError("permission_denied", f"the agent cannot run processes as '{spec.user.name}'")
        argv = [spec.cmd, *spec.args]
        slave_fd: int | None = None
        try:
            if spec.pty_size is not None:
                self.master_fd, slave_fd = pty.openpty()
                cols, rows = spec.pty_size
                _set_winsize(slave_fd, cols or 80, rows or 24)
                self.popen = subprocess.Popen(
                    argv, executable=None, stdin=slave_fd, stdout=slave_fd, stderr=slave_fd,
                    cwd=cwd, env=env, close_fds=True, start_new_session=True,
                    preexec_fn=_set_controlling_tty, **kwargs,
                )
                self._out_fds = {self.master_fd: "pty"}
            else:
                self.popen = subprocess.Popen(
                    argv, stdin=subprocess.PIPE if spec.stdin else subprocess.DEVNULL,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    cwd=cwd, env=env, close_fds=True, start_new_session=True, **kwargs,
                )
                assert self.popen.stdout is not None and self.popen.stderr is not None
                self._out_fds = {self.popen.stdout.fileno(): "stdout", self.popen.stderr.fileno(): "stderr"}
                if self.popen.stdin is not None:
                    self._stdin_fd = self.popen.stdin.fileno()
        except OSError as exc:
            self._close_fd(self.master_fd)
            self._close_fd(self._wake_r)
            self._close_fd(self._wake_w)
            raise ConnectError(
                "invalid_argument", f"failed to start process '{' '.join(argv)}': {exc.strerror or exc}"
            ) from None
        finally:
            if slave_fd is not None:
                os.close(slave_fd)
        self.pid: int = self.popen.pid

    # ------------------------------------------------------------------ lifecycle
    def run(self) -> None:
        """Start the pump, waiter and (optional) timeout threads."""
        self._pump_thread = threading.Thread(target=self._pump, name=f"pump-{self.pid}", daemon=True)
        self._pump_thread.start()
        threading.Thread(target=self._wait, name=f"wait-{self.pid}", daemon=True).start()
        if self.spec.timeout_s is not None:
            # Killed at the deadline whether or not a client still follows it (as envd does).
            timer = threading.Timer(self.spec.timeout_s, self.expire)
            timer.daemon = True
            timer.start()
            self._on_end.append(timer.cancel)

    def expire(self) -> None:
        """Kill the process (and its process group) because its deadline passed; idempotent."""
        if self._exited.is_set():
            return
        if not self.deadline_killed:
            self.deadline_killed = True
            log.info("process %d reached its deadline (%.3fs), killing it", self.pid, self.spec.timeout_s or 0.0)
        self.signal(signal.SIGKILL)

    def _pump(self) -> None:
        fds = dict(self._out_fds)
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        poller.register(self._wake_r, select.POLLIN)
        drain_until: float | None = None
        try:
            while fds:
                if drain_until is None:
                    timeout_ms: int | None = None
                else:
                    remaining = drain_until - time.monotonic()
                    if remaining <= 0:
                        break
                    timeout_ms = 0
                ready = poller.poll(timeout_ms)
                if drain_until is not None and not ready:
                    # Exited and nothing more is ready: what is left belongs to
                    # grandchildren that keep the pipes open; stop reading.
                    break
                for fd, _mask in ready:
                    if fd == self._wake_r:
                        os.read(self._wake_r, 64)
                        poller.unregister(self._wake_r)
                        drain_until = time.monotonic() + DRAIN_AFTER_EXIT_S
                        continue
                    kind = fds.get(fd)
                    if kind is None:
                        continue
                    try:
                        data = os.read(fd, READ_CHUNK)
                    except OSError:  # EIO on a PTY master once the slave side is closed
                        data = b""
                    if data:
                        self._publish(OutputEvent(kind, data))
                    else:
                        poller.unregister(fd)
                        del fds[fd]
        except Exception:  # never let a pump failure hang the end event
            log.exception("output pump of process %d failed", self.pid)

    def _wait(self) -> None:
        returncode = self.popen.wait()
        self._exited.set()
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        self._pump_thread.join()
        end = _end_event(returncode)
        log.debug("process %d (%s) ended: %s", self.pid, self.spec.cmd, end.status)
        for callback in self._on_end:
            try:
                callback()
            except Exception:
                log.exception("end callback of process %d failed", self.pid)
        with self._lock:
            self._end = end
            subs = list(self._subs)
        for sub in subs:
            sub.put(end)
        self._cleanup()

    def _cleanup(self) -> None:
        for stream in (self.popen.stdout, self.popen.stderr):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        with self._stdin_lock:
            if self.popen.stdin is not None:
                try:
                    self.popen.stdin.close()
                except OSError:
                    pass
            self._stdin_fd = None
        self._close_fd(self.master_fd)
        self.master_fd = None
        self._close_fd(self._wake_r)
        self._close_fd(self._wake_w)

    @staticmethod
    def _close_fd(fd: int | None) -> None:
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    # ------------------------------------------------------------------ fan-out
    def _publish(self, event: Event) -> None:
        with self._lock:
            subs = list(self._subs)
        for sub in subs:
            sub.put(event)

    def subscribe(self) -> Subscriber:
        """Attach a stream; if the process already ended it gets just the end event."""
        sub = Subscriber()
        with self._lock:
            if self._end is not None:
                sub.queue.put(self._end)
            else:
                self._subs.append(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        sub.closed = True
        with self._lock:
            if sub in self._subs:
                self._subs.remove(sub)

    def add_end_callback(self, callback: Any) -> None:
        self._on_end.append(callback)

    @property
    def ended(self) -> bool:
        return self._end is not None

    # ------------------------------------------------------------------ control
    def signal(self, signum: int) -> None:
        """Signal the process's group (it leads its own session), else the process."""
        try:
            os.killpg(self.pid, signum)
            return
        except (ProcessLookupError, PermissionError):
            pass
        try:
            os.kill(self.pid, signum)
        except ProcessLookupError:
            pass

    def write_input(self, data: bytes) -> None:
        if self.master_fd is not None:
            self._write_all(self.master_fd, data)
            return
        with self._stdin_lock:
            if self._stdin_fd is None:
                raise ConnectError("failed_precondition",
                                   f"stdin of process {self.pid} is not enabled or already closed")
            try:
                self._write_all(self._stdin_fd, data)
            except BrokenPipeError:
                raise ConnectError("failed_precondition", f"process {self.pid} closed its stdin") from None

    @staticmethod
    def _write_all(fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                written = os.write(fd, view)
            except OSError as exc:
                if isinstance(exc, BrokenPipeError):
                    raise
                raise ConnectError("failed_precondition", f"cannot write input: {exc.strerror}") from None
            view = view[written:]

    def close_stdin(self) -> None:
        if self.master_fd is not None:
            raise ConnectError("failed_precondition", "cannot close stdin of a PTY process; send Ctrl+D (0x04) instead")
        with self._stdin_lock:
            if self.popen.stdin is not None and self._stdin_fd is not None:
                try:
                    self.popen.stdin.close()
                except OSError:
                    pass
            self._stdin_fd = None

    def resize(self, cols: int, rows: int) -> None:
        if self.master_fd is None:
            raise ConnectError("failed_precondition", f"process {self.pid} has no PTY to resize")
        _set_winsize(self.master_fd, cols, rows)


class ProcessTable:
    """The running processes, by pid, with tag lookup."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_pid: dict[int, ManagedProcess] = {}

    def add(self, proc: ManagedProcess) -> None:
        with self._lock:
            self._by_pid[proc.pid] = proc
        proc.add_end_callback(lambda: self._remove(proc))

    def _remove(self, proc: ManagedProcess) -> None:
        with self._lock:
            if self._by_pid.get(proc.pid) is proc:
                del self._by_pid[proc.pid]

    def all(self) -> list[ManagedProcess]:
        with self._lock:
            return list(self._by_pid.values())

    def select(self, selector: dict[str, Any] | None) -> ManagedProcess:
        """The process named by a ``ProcessSelector`` (``{"pid": n}`` or ``{"tag": s}``)."""
        if not selector:
            raise ConnectError("invalid_argument", "process selector (pid or tag) is required")
        if pbjson.has(selector, "pid"):
            pid = pbjson.get_int(selector, "pid")
            with self._lock:
                proc = self._by_pid.get(pid)
            if proc is None:
                raise ConnectError("not_found", f"process with pid {pid} not found")
            return proc
        if pbjson.has(selector, "tag"):
            tag = pbjson.get_str(selector, "tag")
            with self._lock:
                for proc in self._by_pid.values():
                    if proc.tag == tag:
                        return proc
            raise ConnectError("not_found", f"process with tag '{tag}' not found")
        raise ConnectError("invalid_argument", "process selector must set pid or tag")


class ProcessService:
    """envd's ``process.Process`` service."""

    def __init__(self, state: AgentState) -> None:
        self.state = state
        self.table = ProcessTable()

    def _user(self, ctx: RpcContext) -> User:
        return lookup_user(ctx.basic_user or self.state.default_user)

    # ------------------------------------------------------------------ Start
    def _spec(self, ctx: RpcContext, req: dict[str, Any]) -> ProcessSpec:
        config = pbjson.get_message(req, "process")
        if config is None:
            raise ConnectError("invalid_argument", "field 'process' (ProcessConfig) is required")
        cmd = pbjson.get_str(config, "cmd")
        if not cmd:
            raise ConnectError("invalid_argument", "field 'process.cmd' must not be empty")
        pty_msg = pbjson.get_message(req, "pty")
        pty_size: tuple[int, int] | None = None
        if pty_msg is not None:
            size = pbjson.get_message(pty_msg, "size") or {}
            pty_size = (pbjson.get_int(size, "cols", 80), pbjson.get_int(size, "rows", 24))
        cwd = pbjson.get_str(config, "cwd") if pbjson.has(config, "cwd") else None
        tag = pbjson.get_str(req, "tag") if pbjson.has(req, "tag") else None
        return ProcessSpec(
            cmd=cmd,
            args=pbjson.get_str_list(config, "args"),
            envs=pbjson.get_map(config, "envs"),
            cwd=cwd,
            user=self._user(ctx),
            tag=tag,
            pty_size=pty_size,
            stdin=pbjson.get_bool(req, "stdin", True),
            timeout_s=ctx.timeout_s,
            config=pbjson.prune({
                "cmd": cmd,
                "args": pbjson.get_str_list(config, "args"),
                "envs": pbjson.get_map(config, "envs") or None,
                "cwd": cwd,
            }),
        )

    def _environment(self, spec: ProcessSpec) -> dict[str, str]:
        env = {
            "PATH": os.environ.get("PATH") or DEFAULT_PATH,
            "HOME": spec.user.home,
            "USER": spec.user.name,
            "LOGNAME": spec.user.name,
        }
        if spec.pty_size is not None:
            env["TERM"] = "xterm-256color"
        env.update(self.state.env_snapshot())
        env.update(spec.envs)
        return env

    def _cwd(self, spec: ProcessSpec) -> str:
        if spec.cwd:
            cwd = resolve_path(spec.cwd, spec.user, self.state.default_workdir)
        else:
            cwd = resolve_path("", spec.user, self.state.default_workdir)
            if not os.path.isdir(cwd):  # e.g. nobody's /nonexistent home
                cwd = "/"
        # The child changes into cwd before it drops to the user: check, as the user, that the
        # user could enter it (resolving "cwd/." needs search permission on cwd and its parents).
        with acting_as(spec.user):
            enterable = os.path.isdir(os.path.join(cwd, "."))  # False on any error, EACCES included
        if not enterable and os.path.isdir(cwd):
            raise ConnectError("permission_denied", f"cwd '{cwd}': permission denied for user '{spec.user.name}'")
        if not enterable:
            raise ConnectError("invalid_argument", f"cwd '{cwd}' does not exist or is not a directory")
        return cwd

    def spawn(self, spec: ProcessSpec) -> tuple[ManagedProcess, Subscriber]:
        """Start a process with a subscriber attached before any output can be read."""
        proc = ManagedProcess(spec, self._environment(spec), self._cwd(spec))
        sub = proc.subscribe()
        self.table.add(proc)
        proc.run()
        log.debug("started process %d as %s: %s %s", proc.pid, spec.user.name, spec.cmd, spec.args)
        return proc, sub

    def start(self, ctx: RpcContext, req: dict[str, Any], stream: ServerStream) -> None:
        spec = self._spec(ctx, req)
        proc, sub = self.spawn(spec)
        self._follow(ctx, proc, sub, stream, owns_process=True)

    def connect(self, ctx: RpcContext, req: dict[str, Any], stream: ServerStream) -> None:
        proc = self.table.select(pbjson.get_message(req, "process"))
        self._follow(ctx, proc, proc.subscribe(), stream, owns_process=False)

    def _follow(self, ctx: RpcContext, proc: ManagedProcess, sub: Subscriber, stream: ServerStream,
                *, owns_process: bool) -> None:
        """Stream a process's events until its end event, its deadline, or until the client leaves.

        The deadline (``Connect-Timeout-Ms``) ends the stream with the Connect error
        ``deadline_exceeded`` instead of an end event, as envd does; a Start stream
        (``owns_process``) also kills its process then, a Connect stream leaves it running.
        """
        try:
            stream.send({"event": {"start": {"pid": proc.pid}}})
            last_sent = time.monotonic()
            while True:
                now = time.monotonic()
                if deadline_passed(ctx.deadline, now):
                    raise self._deadline_error(proc, owns_process)
                wait = max(0.0, min(1.0, ctx.keepalive_interval - (now - last_sent)))
                if ctx.deadline is not None:
                    wait = min(wait, ctx.deadline - now)
                try:
                    event = sub.queue.get(timeout=wait)
                except queue.Empty:
                    if ctx.client_gone():
                        log.info("client of process %d stream went away; the process keeps running", proc.pid)
                        return
                    if time.monotonic() - last_sent >= ctx.keepalive_interval:
                        stream.send({"event": {"keepalive": {}}})
                        last_sent = time.monotonic()
                    continue
                if isinstance(event, EndEvent):
                    if deadline_passed(ctx.deadline, time.monotonic()):
                        raise self._deadline_error(proc, owns_process)
                    stream.send({"event": {"end": event.to_json()}})
                    return
                stream.send({"event": {"data": {event.kind: pbjson.b64(event.data)}}})
                last_sent = time.monotonic()
        except StreamClosed:
            log.info("stream of process %d closed by the client; the process keeps running", proc.pid)
        finally:
            proc.unsubscribe(sub)

    @staticmethod
    def _deadline_error(proc: ManagedProcess, owns_process: bool) -> ConnectError:
        if owns_process:
            proc.expire()
            return ConnectError("deadline_exceeded",
                                f"process {proc.pid} ran past its deadline (Connect-Timeout-Ms) and was killed")
        return ConnectError("deadline_exceeded",
                            f"the stream of process {proc.pid} reached its deadline (Connect-Timeout-Ms); "
                            "the process keeps running")

    # ------------------------------------------------------------------ unary RPCs
    def list(self, ctx: RpcContext, req: dict[str, Any]) -> dict[str, Any]:
        processes = []
        for proc in sorted(self.table.all(), key=lambda p: p.pid):
            if proc.ended:
                continue
            processes.append(pbjson.prune({"config": proc.spec.config, "pid": proc.pid, "tag": proc.tag}))
        return pbjson.prune({"processes": processes})

    def send_input(self, ctx: RpcContext, req: dict[str, Any]) -> dict[str, Any]:
        proc = self.table.select(pbjson.get_message(req, "process"))
        proc.write_input(_input_bytes(pbjson.get_message(req, "input")))
        return {}

    def stream_input(self, ctx: RpcContext, messages: Iterator[dict[str, Any]]) -> dict[str, Any]:
        proc: ManagedProcess | None = None
        for msg in messages:
            if pbjson.has(msg, "start"):
                start = pbjson.get_message(msg, "start") or {}
                proc = self.table.select(pbjson.get_message(start, "process"))
            elif pbjson.has(msg, "data"):
                if proc is None:
                    raise ConnectError("failed_precondition", "StreamInput data sent before its start event")
                data = pbjson.get_message(msg, "data") or {}
                proc.write_input(_input_bytes(pbjson.get_message(data, "input")))
            # keepalive messages need nothing
        return {}

    def send_signal(self, ctx: RpcContext, req: dict[str, Any]) -> dict[str, Any]:
        signum = pbjson.get_enum(req, "signal", SIGNALS)
        if signum not in (signal.SIGTERM, signal.SIGKILL):
            raise ConnectError("invalid_argument",
                               f"unsupported signal {req.get('signal')!r}; use SIGNAL_SIGTERM or SIGNAL_SIGKILL")
        proc = self.table.select(pbjson.get_message(req, "process"))
        proc.signal(signum)
        return {}

    def close_stdin(self, ctx: RpcContext, req: dict[str, Any]) -> dict[str, Any]:
        proc = self.table.select(pbjson.get_message(req, "process"))
        proc.close_stdin()
        return {}

    def update(self, ctx: RpcContext, req: dict[str, Any]) -> dict[str, Any]:
        proc = self.table.select(pbjson.get_message(req, "process"))
        pty_msg = pbjson.get_message(req, "pty")
        if pty_msg is not None:
            size = pbjson.get_message(pty_msg, "size") or {}
            proc.resize(pbjson.get_int(size, "cols", 80), pbjson.get_int(size, "rows", 24))
        return {}

    def shutdown(self) -> None:
        """Kill every process (agent exit)."""
        for proc in self.table.all():
            proc.signal(signal.SIGKILL)


def deadline_passed(deadline: float | None, now: float) -> bool:
    """Whether a ``time.monotonic()`` deadline (None: no deadline) has passed at ``now``."""
    return deadline is not None and now >= deadline


def _input_bytes(msg: dict[str, Any] | None) -> bytes:
    if msg is None:
        raise ConnectError("invalid_argument", "field 'input' is required")
    if pbjson.has(msg, "pty"):
        return pbjson.get_bytes(msg, "pty")
    return pbjson.get_bytes(msg, "stdin")
