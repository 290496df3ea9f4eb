"""The synchronous E2B-style API: a thin facade over the asynchronous core.

Every method submits the matching :mod:`._async` coroutine to the SDK's private event loop
thread (:mod:`sandbox_sdk._loop`) and blocks until it is done, so both APIs share one
implementation. Output callbacks are not run on that loop thread: events are passed through
a thread-safe queue and the callbacks run in the thread that waits for the command (or, for
background commands started with callbacks, in a per-command dispatcher thread), where they
may call the synchronous API again.
"""

from __future__ import annotations

import datetime
import os
import queue
import threading
from typing import (
    IO,
    Any,
    Callable,
    Coroutine,
    Iterator,
    List,
    Literal,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    TypeVar,
    Union,
    overload,
)

from .. import _loop
from .._code_interpreter import CodeRunner
from .._config import DEFAULT_COMMAND_TIMEOUT, DEFAULT_SANDBOX_TIMEOUT
from .._dual import dual_method
from ..exceptions import SandboxError
from ..models import (
    CommandResult,
    EntryInfo,
    FilesystemEvent,
    ProcessInfo,
    PtySize,
    SandboxInfo,
    SandboxMetrics,
    SandboxNetworkOpts,
    SandboxNetworkUpdate,
    SnapshotInfo,
    TemplateInfo,
    WriteEntry,
    WriteInfo,
)
from .._lifecycle import SandboxLifecycle
from ._async import AsyncCommandHandle, AsyncSandbox, AsyncWatchHandle, OnResume, SnapshotMode
from ._snapshots import SnapshotPaginator

_END = "end"


T = TypeVar("T")


def _run(coro: Coroutine[Any, Any, T]) -> T:
    return _loop.runner().run(coro)


class CommandHandle:
    """A running command or PTY (synchronous).

    Example::

        h = sandbox.commands.run("sleep 1; echo done", background=True)
        print(h.wait().stdout)
    """

    def __init__(
        self,
        handle: AsyncCommandHandle,
        events: "queue.SimpleQueue[Tuple[str, Any]]",
        on_stdout: Optional[Callable[[str], Any]] = None,
        on_stderr: Optional[Callable[[str], Any]] = None,
        on_pty: Optional[Callable[[bytes], Any]] = None,
    ) -> None:
        self._h = handle
        self._events = events
        self._on_stdout = on_stdout
        self._on_stderr = on_stderr
        self._on_pty = on_pty
        self._drain_lock = threading.Lock()
        self._drained = False
        self._callback_error: Optional[BaseException] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def pid(self) -> int:
        return self._h.pid

    @property
    def stdout(self) -> str:
        return self._h.stdout

    @property
    def stderr(self) -> str:
        return self._h.stderr

    @property
    def exit_code(self) -> Optional[int]:
        return self._h.exit_code

    @property
    def error(self) -> Optional[str]:
        return self._h.error

    def _start_dispatcher(self) -> None:
        self._thread = threading.Thread(target=self._dispatch_safely, name=f"sandbox-cmd-{self.pid}", daemon=True)
        self._thread.start()

    def _dispatch_safely(self) -> None:
        try:
            self._drain(self._on_stdout, self._on_stderr, self._on_pty)
        except BaseException as e:  # surfaced by wait()
            self._callback_error = e

    def _events_iter(self) -> Iterator[Tuple[str, Any]]:
        with self._drain_lock:
            if self._drained:
                return
            while True:
                kind, value = self._events.get()
                if kind == _END:
                    self._drained = True
                    return
                yield kind, value

    def _drain(self, on_stdout: Any, on_stderr: Any, on_pty: Any) -> None:
        for kind, value in self._events_iter():
            cb = on_stdout if kind == "stdout" else on_stderr if kind == "stderr" else on_pty
            if cb is not None:
                cb(value)

    def __iter__(self) -> Iterator[Tuple[Optional[str], Optional[str], Optional[bytes]]]:
        """Iterate over the output as ``(stdout, stderr, pty)`` tuples (one field set).

        Example::

            for out, err, _ in sandbox.commands.run("ls", background=True):
                print(out or err, end="")
        """
        for kind, value in self._events_iter():
            if kind == "stdout":
                yield value, None, None
            elif kind == "stderr":
                yield None, value, None
            else:
                yield None, None, value

    def wait(
        self,
        on_pty: Optional[Callable[[bytes], Any]] = None,
        on_stdout: Optional[Callable[[str], Any]] = None,
        on_stderr: Optional[Callable[[str], Any]] = None,
    ) -> CommandResult:
        """Wait for the end; callbacks get the output not yet delivered, as it arrives.

        Raises :class:`CommandExitError` on a non-zero exit code.
        """
        if self._thread is not None:
            self._thread.join()
        else:
            self._drain(on_stdout or self._on_stdout, on_stderr or self._on_stderr, on_pty or self._on_pty)
        if self._callback_error is not None:
            raise self._callback_error
        return _run(self._h.wait())

    def kill(self) -> bool:
        """Kill the command (SIGKILL)."""
        return _run(self._h.kill())

    def send_stdin(self, data: Union[str, bytes]) -> None:
        """Write to the command's stdin (started with ``stdin=True``) or type into the PTY."""
        _run(self._h.send_stdin(data))

    def close_stdin(self) -> None:
        """Close the command's stdin."""
        _run(self._h.close_stdin())

    def disconnect(self) -> None:
        """Stop receiving output; the command keeps running."""
        _run(self._h.disconnect())


def _listener() -> Tuple["queue.SimpleQueue[Tuple[str, Any]]", Callable[[str, Any], None]]:
    q: "queue.SimpleQueue[Tuple[str, Any]]" = queue.SimpleQueue()
    return q, lambda kind, value: q.put((kind, value))


class Commands:
    """Run and manage processes in the sandbox (``sandbox.commands``), synchronously."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._a = sandbox.commands

    def list(self, request_timeout: Optional[float] = None) -> List[ProcessInfo]:
        """The running processes. Example: ``[p.pid for p in sandbox.commands.list()]``"""
        return _run(self._a.list(request_timeout))

    def kill(self, pid: Union[int, str], request_timeout: Optional[float] = None) -> bool:
        """Kill a process (SIGKILL); False if there was none. Example: ``sandbox.commands.kill(h.pid)``"""
        return _run(self._a.kill(pid, request_timeout))

    def send_stdin(
        self, pid: Union[int, str], data: Union[str, bytes], request_timeout: Optional[float] = None
    ) -> None:
        """Write to a process's stdin. Example: ``sandbox.commands.send_stdin(h.pid, "y\\n")``"""
        _run(self._a.send_stdin(pid, data, request_timeout))

    def close_stdin(self, pid: Union[int, str], request_timeout: Optional[float] = None) -> None:
        """Close a process's stdin. Example: ``sandbox.commands.close_stdin(h.pid)``"""
        _run(self._a.close_stdin(pid, request_timeout))

    def stream_stdin(
        self, pid: Union[int, str], chunks: Sequence[Union[str, bytes]], request_timeout: Optional[float] = None
    ) -> None:
        """Send several inputs in order in one request. Example: ``commands.stream_stdin(pid, ["a\\n", "b\\n"])``"""
        _run(self._a.stream_stdin(pid, list(chunks), request_timeout=request_timeout))

    @overload
    def run(
        self,
        cmd: str,
        background: Literal[False] = False,
        envs: Optional[Mapping[str, str]] = None,
        user: Optional[str] = None,
        cwd: Optional[str] = None,
        on_stdout: Optional[Callable[[str], Any]] = None,
        on_stderr: Optional[Callable[[str], Any]] = None,
        stdin: bool = False,
        timeout: Optional[float] = DEFAULT_COMMAND_TIMEOUT,
        request_timeout: Optional[float] = None,
        tag: Optional[str] = None,
    ) -> CommandResult: ...

    @overload
    def run(
        self,
        cmd: str,
        background: Literal[True],
        envs: Optional[Mapping[str, str]] = None,
        user: Optional[str] = None,
        cwd: Optional[str] = None,
        on_stdout: Optional[Callable[[str], Any]] = None,
        on_stderr: Optional[Callable[[str], Any]] = None,
        stdin: bool = False,
        timeout: Optional[float] = DEFAULT_COMMAND_TIMEOUT,
        request_timeout: Optional[float] = None,
        tag: Optional[str] = None,
    ) -> CommandHandle: ...

    def run(
        self,
        cmd: str,
        background: bool = False,
        envs: Optional[Mapping[str, str]] = None,
        user: Optional[str] = None,
        cwd: Optional[str] = None,
        on_stdout: Optional[Callable[[str], Any]] = None,
        on_stderr: Optional[Callable[[str], Any]] = None,
        stdin: bool = False,
        timeout: Optional[float] = DEFAULT_COMMAND_TIMEOUT,
        request_timeout: Optional[float] = None,
        tag: Optional[str] = None,
    ) -> Union[CommandResult, CommandHandle]:
        """Run ``cmd`` with ``/bin/bash -l -c``; see :meth:`AsyncCommands.run`.

        Callbacks run as output arrives (in this thread, or in a dispatcher thread for
        background commands). Raises :class:`CommandExitError` on a non-zero exit.

        Example::

            r = sandbox.commands.run("echo hi", on_stdout=print)
            h = sandbox.commands.run("python3 -m http.server", background=True, timeout=0)
        """
        q, listener = _listener()
        ah = _run(
            self._a._start(
                cmd="/bin/bash",
                args=["-l", "-c", cmd],
                envs=envs,
                cwd=cwd,
                user=user,
                stdin=stdin,
                pty=None,
                tag=tag,
                timeout=timeout,
                request_timeout=request_timeout,
                listener=listener,
                display=cmd,
            )
        )
        handle = CommandHandle(ah, q, on_stdout, on_stderr)
        if background:
            if on_stdout is not None or on_stderr is not None:
                handle._start_dispatcher()
            return handle
        return handle.wait()

    def connect(
        self,
        pid: Union[int, str],
        timeout: Optional[float] = DEFAULT_COMMAND_TIMEOUT,
        request_timeout: Optional[float] = None,
    ) -> CommandHandle:
        """Attach to a running process. Example: ``sandbox.commands.connect(pid).wait()``"""
        q, listener = _listener()
        ah = _run(self._a._connect(pid, timeout=timeout, request_timeout=request_timeout, listener=listener))
        return CommandHandle(ah, q)


class Pty:
    """Pseudo-terminals (``sandbox.pty``), synchronously."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._a = sandbox.pty

    def create(
        self,
        size: Optional[PtySize] = None,
        user: Optional[str] = None,
        cwd: Optional[str] = None,
        envs: Optional[Mapping[str, str]] = None,
        timeout: Optional[float] = DEFAULT_COMMAND_TIMEOUT,
        request_timeout: Optional[float] = None,
        on_data: Optional[Callable[[bytes], Any]] = None,
    ) -> CommandHandle:
        """Start ``bash -i -l`` on a new terminal; read it with ``handle.wait(on_pty=...)``.

        Example::

            term = sandbox.pty.create(PtySize(rows=24, cols=80))
            sandbox.pty.send_stdin(term.pid, b"echo hi; exit\\n")
            term.wait(on_pty=lambda b: print(b.decode(), end=""))
        """
        q, listener = _listener()
        ah = _run(
            self._a.create(
                size,
                user=user,
                cwd=cwd,
                envs=envs,
                timeout=timeout,
                request_timeout=request_timeout,
                _listener=listener,
            )
        )
        handle = CommandHandle(ah, q, on_pty=on_data)
        if on_data is not None:
            handle._start_dispatcher()
        return handle

    def send_stdin(self, pid: int, data: Union[str, bytes], request_timeout: Optional[float] = None) -> None:
        """Type into the terminal. Example: ``sandbox.pty.send_stdin(term.pid, b"ls\\n")``"""
        _run(self._a.send_stdin(pid, data, request_timeout))

    def resize(self, pid: int, size: PtySize, request_timeout: Optional[float] = None) -> None:
        """Resize the terminal. Example: ``sandbox.pty.resize(term.pid, PtySize(rows=50, cols=120))``"""
        _run(self._a.resize(pid, size, request_timeout))

    def kill(self, pid: int, request_timeout: Optional[float] = None) -> bool:
        """Kill the terminal's shell. Example: ``sandbox.pty.kill(term.pid)``"""
        return _run(self._a.kill(pid, request_timeout))


class WatchHandle:
    """A running directory watch (synchronous): poll with ``get_new_events()``, end with ``stop()``.

    With an ``on_event`` callback the events are delivered to it (in a dispatcher thread)
    instead of being kept for ``get_new_events()``.
    """

    def __init__(self, on_event: Optional[Callable[[FilesystemEvent], Any]] = None) -> None:
        self._queue: "queue.SimpleQueue[Optional[FilesystemEvent]]" = queue.SimpleQueue()
        self._on_event = on_event
        self._h: Optional[AsyncWatchHandle] = None
        self._thread: Optional[threading.Thread] = None
        if on_event is not None:
            self._thread = threading.Thread(target=self._dispatch, name="sandbox-watch", daemon=True)
            self._thread.start()

    def _dispatch(self) -> None:
        assert self._on_event is not None
        while True:
            ev = self._queue.get()
            if ev is None:
                return
            try:
                self._on_event(ev)
            except Exception:  # a failing callback must not stop the watch
                import logging

                logging.getLogger("sandbox_sdk").exception("watch_dir on_event callback failed")

    def _sink(self, event: FilesystemEvent) -> None:  # runs on the loop thread
        self._queue.put(event)

    def _exited(self, err: Optional[BaseException]) -> None:  # runs on the loop thread
        if self._on_event is not None:
            self._queue.put(None)

    def get_new_events(self) -> List[FilesystemEvent]:
        """The events received since the last call (empty when ``on_event`` is used).

        Example::

            w = sandbox.files.watch_dir("/tmp")
            sandbox.files.write("/tmp/x", "1")
            print(w.get_new_events())
        """
        out: List[FilesystemEvent] = []
        if self._on_event is not None:
            return out
        while True:
            try:
                ev = self._queue.get_nowait()
            except queue.Empty:
                return out
            if ev is not None:
                out.append(ev)

    def stop(self) -> None:
        """Stop watching."""
        if self._h is not None:
            _run(self._h.stop())
        if self._thread is not None:
            self._queue.put(None)
            if self._thread is not threading.current_thread():
                self._thread.join(timeout=5)


class Filesystem:
    """Files and directories in the sandbox (``sandbox.files``), synchronously."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._a = sandbox.files

    @overload
    def read(
        self,
        path: str,
        format: Literal["text"] = "text",
        user: Optional[str] = None,
        request_timeout: Optional[float] = None,
    ) -> str: ...

    @overload
    def read(
        self, path: str, format: Literal["bytes"], user: Optional[str] = None, request_timeout: Optional[float] = None
    ) -> bytearray: ...

    @overload
    def read(
        self, path: str, format: Literal["stream"], user: Optional[str] = None, request_timeout: Optional[float] = None
    ) -> Iterator[bytes]: ...

    def read(
        self,
        path: str,
        format: Literal["text", "bytes", "stream"] = "text",
        user: Optional[str] = None,
        request_timeout: Optional[float] = None,
    ) -> Union[str, bytearray, Iterator[bytes]]:
        """Read a file as text, bytes, or an iterator of chunks (``format="stream"``).

        Example::

            with open("copy.bin", "wb") as f:
                for chunk in sandbox.files.read("/big.bin", format="stream"):
                    f.write(chunk)
        """
        if format == "stream":
            stream = _run(self._a.read(path, "stream", user, request_timeout))
            return _loop.runner().iterate(stream, close=getattr(stream, "aclose", None))
        if format == "bytes":
            return _run(self._a.read(path, "bytes", user, request_timeout))
        return _run(self._a.read(path, "text", user, request_timeout))

    def download_to(
        self,
        path: str,
        local_path: Union[str, "os.PathLike[str]"],
        user: Optional[str] = None,
        request_timeout: Optional[float] = None,
    ) -> int:
        """Stream a sandbox file to a local file. Example: ``sandbox.files.download_to("/a.bin", "a.bin")``"""
        return _run(self._a.download_to(path, local_path, user, request_timeout))

    def write(
        self,
        path: str,
        data: Union[str, bytes, IO[Any]],
        user: Optional[str] = None,
        request_timeout: Optional[float] = None,
    ) -> WriteInfo:
        """Write a file (parents created). Example: ``sandbox.files.write("/tmp/a.txt", "hi")``"""
        return _run(self._a.write(path, data, user, request_timeout))

    def write_files(
        self,
        files: Sequence[Union[WriteEntry, Mapping[str, Any]]],
        user: Optional[str] = None,
        request_timeout: Optional[float] = None,
    ) -> List[WriteInfo]:
        """Write several files. Example: ``sandbox.files.write_files([{"path": "/tmp/a", "data": "A"}])``"""
        return _run(self._a.write_files(files, user, request_timeout))

    def list(
        self, path: str, depth: Optional[int] = 1, user: Optional[str] = None, request_timeout: Optional[float] = None
    ) -> List[EntryInfo]:
        """List a directory. Example: ``[e.name for e in sandbox.files.list("/home/user")]``"""
        return _run(self._a.list(path, depth, user, request_timeout))

    def exists(self, path: str, user: Optional[str] = None, request_timeout: Optional[float] = None) -> bool:
        """Whether ``path`` exists. Example: ``sandbox.files.exists("/etc/passwd")``"""
        return _run(self._a.exists(path, user, request_timeout))

    def get_info(self, path: str, user: Optional[str] = None, request_timeout: Optional[float] = None) -> EntryInfo:
        """Stat ``path``. Example: ``sandbox.files.get_info("/etc/passwd").size``"""
        return _run(self._a.get_info(path, user, request_timeout))

    def remove(self, path: str, user: Optional[str] = None, request_timeout: Optional[float] = None) -> None:
        """Remove a file or directory. Example: ``sandbox.files.remove("/tmp/a")``"""
        _run(self._a.remove(path, user, request_timeout))

    def rename(
        self, old_path: str, new_path: str, user: Optional[str] = None, request_timeout: Optional[float] = None
    ) -> EntryInfo:
        """Move a file. Example: ``sandbox.files.rename("/tmp/a", "/tmp/b")``"""
        return _run(self._a.rename(old_path, new_path, user, request_timeout))

    def make_dir(self, path: str, user: Optional[str] = None, request_timeout: Optional[float] = None) -> bool:
        """Create a directory (and parents); False if it existed. Example: ``sandbox.files.make_dir("/tmp/d")``"""
        return _run(self._a.make_dir(path, user, request_timeout))

    def watch_dir(
        self,
        path: str,
        user: Optional[str] = None,
        request_timeout: Optional[float] = None,
        recursive: bool = False,
        on_event: Optional[Callable[[FilesystemEvent], Any]] = None,
        timeout: Optional[float] = 0,
    ) -> WatchHandle:
        """Watch a directory: poll ``get_new_events()`` or pass ``on_event`` (called in a
        dispatcher thread). ``timeout`` bounds the watch (0: until ``stop()``).

        Example::

            w = sandbox.files.watch_dir("/tmp", on_event=print)
            ...
            w.stop()
        """
        wh = WatchHandle(on_event)
        try:
            wh._h = _run(
                self._a.watch_dir(
                    path,
                    on_event=wh._sink,
                    on_exit=wh._exited,
                    user=user,
                    request_timeout=request_timeout,
                    timeout=timeout,
                    recursive=recursive,
                )
            )
        except BaseException:
            wh.stop()
            raise
        return wh


class Sandbox(CodeRunner):
    """An E2B-style sandbox, synchronous (same shape as :class:`AsyncSandbox`).

    Example::

        from sandbox_sdk.e2b import Sandbox

        with Sandbox.create() as sandbox:
            print(sandbox.commands.run("uname -a").stdout)
            sandbox.files.write("/tmp/hello.txt", "hi")

        with Sandbox.create("code-interpreter") as sandbox:
            print(sandbox.run_code("1 + 1").text)  # 2
    """

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._async = sandbox
        self.commands = Commands(sandbox)
        self.files = Filesystem(sandbox)
        self.pty = Pty(sandbox)

    @property
    def async_sandbox(self) -> AsyncSandbox:
        """The asynchronous object behind this one."""
        return self._async

    @property
    def sandbox_id(self) -> str:
        return self._async.sandbox_id

    @property
    def template_id(self) -> str:
        return self._async.template_id

    @property
    def sandbox_domain(self) -> str:
        return self._async.sandbox_domain

    @property
    def envd_api_url(self) -> str:
        return self._async.envd_api_url

    @property
    def envd_access_token(self) -> Optional[str]:
        return self._async.envd_access_token

    @property
    def traffic_access_token(self) -> Optional[str]:
        """Set when created with ``network={"allow_public_traffic": False}``; see :class:`AsyncSandbox`."""
        return self._async.traffic_access_token

    def get_host(self, port: int) -> str:
        """``{port}-{sandbox_id}.{domain}``. Example: ``sandbox.get_host(8080)``"""
        return self._async.get_host(port)

    @classmethod
    def create(
        cls,
        template: Optional[str] = None,
        timeout: Optional[int] = DEFAULT_SANDBOX_TIMEOUT,
        metadata: Optional[Mapping[str, str]] = None,
        envs: Optional[Mapping[str, str]] = None,
        secure: Optional[bool] = None,
        allow_internet_access: Optional[bool] = None,
        *,
        network: Optional[SandboxNetworkOpts] = None,
        lifecycle: Optional[SandboxLifecycle] = None,
        user: Optional[str] = None,
        **connection: Any,
    ) -> "Sandbox":
        """Start a new sandbox; see :meth:`AsyncSandbox.create` (``allow_internet_access``, ``network``,
        ``lifecycle``).

        Example::

            sandbox = Sandbox.create("default-sandbox", timeout=600, envs={"A": "1"})
            offline = Sandbox.create(allow_internet_access=False)
            sleeper = Sandbox.create(lifecycle={"on_timeout": "pause", "auto_resume": True})
        """
        return cls(_run(AsyncSandbox.create(template, timeout, metadata, envs, secure, allow_internet_access,
                                            network=network, lifecycle=lifecycle, user=user, **connection)))

    @dual_method
    def connect(cls, sandbox_id: str, timeout: Optional[int] = None, *, on_resume: OnResume = "restore",
                user: Optional[str] = None, **connection: Any) -> "Sandbox":
        """Connect to a sandbox, resuming it if it is paused; see :meth:`AsyncSandbox.connect`.
        Example: ``Sandbox.connect(sandbox_id)`` or ``sandbox.connect()``"""
        return cls(_run(AsyncSandbox.connect(sandbox_id, timeout, on_resume=on_resume, user=user, **connection)))

    @connect.instance
    def _connect(self, timeout: Optional[int] = None, *, on_resume: OnResume = "restore",
                 request_timeout: Optional[float] = None) -> "Sandbox":
        _run(self._async.connect(timeout, on_resume=on_resume, request_timeout=request_timeout))
        return self

    @dual_method
    def pause(cls, sandbox_id: str, keep_memory: Optional[bool] = None, *, mode: Optional[SnapshotMode] = None,
              strict: bool = False, **connection: Any) -> bool:
        """Pause a sandbox to disk (True; False if it was paused already); see :meth:`AsyncSandbox.pause`.
        Example: ``sandbox.pause()``, then ``sandbox.connect()``"""
        paused: bool = _run(AsyncSandbox.pause(sandbox_id, keep_memory, mode=mode, strict=strict, **connection))
        return paused

    @pause.instance
    def _pause(self, keep_memory: Optional[bool] = None, *, mode: Optional[SnapshotMode] = None,
               strict: bool = False, request_timeout: Optional[float] = None) -> bool:
        paused: bool = _run(self._async.pause(keep_memory, mode=mode, strict=strict, request_timeout=request_timeout))
        return paused

    @dual_method
    def fork(cls, sandbox_id: str, timeout: Optional[int] = None, count: Optional[int] = None,
             **connection: Any) -> List[Union["Sandbox", SandboxError]]:
        """Fork a running sandbox; one entry per child (a sandbox or its error); see :meth:`AsyncSandbox.fork`.
        Example: ``left, right = sandbox.fork(count=2)``"""
        results = _run(AsyncSandbox.fork(sandbox_id, timeout, count, **connection))
        return [r if isinstance(r, SandboxError) else cls(r) for r in results]

    @fork.instance
    def _fork(self, timeout: Optional[int] = None, count: Optional[int] = None,
              request_timeout: Optional[float] = None) -> List[Union["Sandbox", SandboxError]]:
        results = _run(self._async.fork(timeout, count, request_timeout=request_timeout))
        return [r if isinstance(r, SandboxError) else type(self)(r) for r in results]

    @dual_method
    def create_snapshot(cls, sandbox_id: str, name: Optional[str] = None, *, mode: Optional[SnapshotMode] = None,
                        **connection: Any) -> SnapshotInfo:
        """Snapshot a running sandbox (it runs on); start sandboxes from it with
        ``Sandbox.create(info.snapshot_id)``; see :meth:`AsyncSandbox.create_snapshot`."""
        info: SnapshotInfo = _run(AsyncSandbox.create_snapshot(sandbox_id, name, mode=mode, **connection))
        return info

    @create_snapshot.instance
    def _create_snapshot(self, name: Optional[str] = None, *, mode: Optional[SnapshotMode] = None,
                         request_timeout: Optional[float] = None) -> SnapshotInfo:
        info: SnapshotInfo = _run(self._async.create_snapshot(name, mode=mode, request_timeout=request_timeout))
        return info

    @dual_method
    def list_snapshots(cls, sandbox_id: Optional[str] = None, limit: Optional[int] = None,
                       next_token: Optional[str] = None, name: Optional[str] = None,
                       **connection: Any) -> SnapshotPaginator:
        """The backend's snapshots, newest first, as a paginator (``has_next``, ``next_items()``).
        Example: ``Sandbox.list_snapshots(sandbox_id=sandbox.sandbox_id).next_items()``"""
        return SnapshotPaginator(sandbox_id, limit, next_token, name, **connection)

    @list_snapshots.instance
    def _list_snapshots(self, limit: Optional[int] = None, next_token: Optional[str] = None,
                        name: Optional[str] = None, **connection: Any) -> SnapshotPaginator:
        if connection:
            return SnapshotPaginator(self.sandbox_id, limit, next_token, name, **connection)
        return SnapshotPaginator(self.sandbox_id, limit, next_token, name, config=self._async.connection_config)

    @classmethod
    def delete_snapshot(cls, snapshot_id: str, **connection: Any) -> bool:
        """Delete a snapshot (True; False if there was none). Example: ``Sandbox.delete_snapshot(info.snapshot_id)``"""
        deleted: bool = _run(AsyncSandbox.delete_snapshot(snapshot_id, **connection))
        return deleted

    @classmethod
    def connect_direct(cls, envd_url: str, **kwargs: Any) -> "Sandbox":
        """Debug mode: talk to an agent directly. Example: ``Sandbox.connect_direct("http://127.0.0.1:49983")``"""
        return cls(_run(AsyncSandbox.connect_direct(envd_url, **kwargs)))

    @dual_method
    def kill(cls, sandbox_id: str, **connection: Any) -> bool:
        """Kill a sandbox: ``Sandbox.kill(id)`` or ``sandbox.kill()``; False if it did not exist."""
        killed: bool = _run(AsyncSandbox.kill(sandbox_id, **connection))
        return killed

    @kill.instance
    def _kill(self, request_timeout: Optional[float] = None) -> bool:
        killed: bool = _run(self._async.kill(request_timeout))
        return killed

    @dual_method
    def set_timeout(cls, sandbox_id: str, timeout: int, **connection: Any) -> None:
        """Make the sandbox end ``timeout`` seconds from now. Example: ``sandbox.set_timeout(600)``"""
        _run(AsyncSandbox.set_timeout(sandbox_id, timeout, **connection))

    @set_timeout.instance
    def _set_timeout(self, timeout: int, request_timeout: Optional[float] = None) -> None:
        _run(self._async.set_timeout(timeout, request_timeout))

    @dual_method
    def update_network(cls, sandbox_id: str, network: SandboxNetworkUpdate, **connection: Any) -> None:
        """Replace the egress rules (omitted options are cleared); see :meth:`AsyncSandbox.update_network`.

        Example: ``sandbox.update_network({"allow_out": ["1.1.1.1"], "deny_out": [ALL_TRAFFIC]})``"""
        _run(AsyncSandbox.update_network(sandbox_id, network, **connection))

    @update_network.instance
    def _update_network(self, network: SandboxNetworkUpdate, request_timeout: Optional[float] = None) -> None:
        _run(self._async.update_network(network, request_timeout))

    @dual_method
    def get_info(cls, sandbox_id: str, **connection: Any) -> SandboxInfo:
        """The backend's description of the sandbox. Example: ``sandbox.get_info().end_at``"""
        info: SandboxInfo = _run(AsyncSandbox.get_info(sandbox_id, **connection))
        return info

    @get_info.instance
    def _get_info(self, request_timeout: Optional[float] = None) -> SandboxInfo:
        info: SandboxInfo = _run(self._async.get_info(request_timeout))
        return info

    @dual_method
    def get_metrics(cls, sandbox_id: str, start: Optional[datetime.datetime] = None,
                    end: Optional[datetime.datetime] = None, **connection: Any) -> List[SandboxMetrics]:
        """CPU, memory and disk samples, oldest first; see :meth:`AsyncSandbox.get_metrics`.
        Example: ``sandbox.get_metrics()[-1].cpu_used_pct``"""
        metrics: List[SandboxMetrics] = _run(AsyncSandbox.get_metrics(sandbox_id, start, end, **connection))
        return metrics

    @get_metrics.instance
    def _get_metrics(self, start: Optional[datetime.datetime] = None, end: Optional[datetime.datetime] = None,
                     request_timeout: Optional[float] = None) -> List[SandboxMetrics]:
        metrics: List[SandboxMetrics] = _run(self._async.get_metrics(start, end, request_timeout))
        return metrics

    @staticmethod
    def list(
        metadata: Optional[Mapping[str, str]] = None,
        state: Optional[Sequence[str]] = None,
        **connection: Any,
    ) -> List[SandboxInfo]:
        """The backend's sandboxes. Example: ``[s.sandbox_id for s in Sandbox.list()]``"""
        return _run(AsyncSandbox.list(metadata, state, **connection))

    @staticmethod
    def list_templates(**connection: Any) -> List[TemplateInfo]:
        """The built templates. Example: ``Sandbox.list_templates()``"""
        return _run(AsyncSandbox.list_templates(**connection))

    def is_running(self, request_timeout: Optional[float] = None) -> bool:
        """Whether the agent answers. Example: ``assert sandbox.is_running()``"""
        return _run(self._async.is_running(request_timeout))

    def close(self) -> None:
        """Release connections (the sandbox keeps running)."""
        _run(self._async.close())

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self.kill()
        except SandboxError:
            pass

    def __repr__(self) -> str:
        return f"<Sandbox {self.sandbox_id} template={self.template_id!r}>"
