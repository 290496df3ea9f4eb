"""One Jupyter kernel and the thread that drives it.

A :class:`Kernel` owns a ``jupyter_client`` KernelManager (the kernel process, started as the
sandbox's user in the context's directory) and a blocking client (its shell and IOPub
sockets; no heartbeat, so an idle kernel costs the guest no periodic wakeups). Everything that
touches them runs on the kernel's own worker thread, one job at a time: starting, each
execution, restarting, shutting down. That is the per-context lock (executions on one
context are served in order), and it keeps the client's sockets on one thread, which
jupyter_client 7's blocking client needs.

An :class:`Execution` is one cell: the worker puts its output lines (:mod:`.outputs`) on a
queue that the HTTP side streams, and the HTTP side may :meth:`Execution.cancel` it (the
client went away, or the context is being restarted or deleted). A cancelled or overlong
cell is interrupted (SIGINT to the kernel's process group, as Jupyter does); a kernel that
does not come back to idle within :data:`INTERRUPT_GRACE_S` after that, or that died, is
restarted, so the context stays usable (its state is then gone, and the cell's answer says so).
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jupyter_client.manager import KernelManager

from . import outputs
from .languages import Language
from .users import RunAs

log = logging.getLogger("trenvx_interpreter.kernel")

POLL_S = 0.2
"""How long the worker waits for an IOPub message before it checks the cell's bound, its
cancellation and the kernel's life."""
INTERRUPT_GRACE_S = 5.0
"""After an interrupt, how long a cell has to end before its kernel is restarted."""
REPLY_GRACE_S = 1.0
"""A cell whose execute_reply came but whose IOPub idle did not (lost while the IOPub socket
was reconnecting after a restart) ends after this much IOPub silence."""
SILENT_TIMEOUT_S = 30.0
"""Bound on each of the server's own silent cells (environment, reseed)."""

CLIENT_GONE = "the client disconnected"
RESTARTING = "the context is being restarted"
SHUTTING_DOWN = "the context is being removed"
_ABANDON = {RESTARTING, SHUTTING_DOWN}


class KernelStartError(RuntimeError):
    """The kernel could not be started (its spec is missing, it crashed, it never answered)."""


class _KernelManager(KernelManager):  # type: ignore[misc]
    """A KernelManager whose connection file belongs to the user the kernel runs as (the
    server writes it as root, mode 0600; the kernel must read it)."""

    file_owner: tuple[int, int] | None = None

    def write_connection_file(self, **kwargs: Any) -> None:
        super().write_connection_file(**kwargs)
        if self.file_owner is not None and self.connection_file:
            os.chown(self.connection_file, *self.file_owner)


@dataclass
class LaunchSettings:
    """How kernels are started: as whom, where their connection files go, their environment."""

    run_as: RunAs
    runtime_dir: Path
    base_env: dict[str, str]
    preload: bool = True
    startup_timeout_s: float = 180.0
    identity_file: str | None = None
    """The sandbox's machine id, which kernels that reseed themselves watch (see :mod:`.identity`)."""

    def environment(self) -> dict[str, str]:
        env = dict(self.base_env)
        env.update(self.run_as.environment())
        env.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # ipykernel's debugger warns on every start
        return env


@dataclass
class Execution:
    """One cell on its way through a kernel: its code, its environment, its bound, and the
    queue its output lines go to (``None`` after ``end_of_execution``: nothing more)."""

    code: str
    env: dict[str, str]
    bound_s: float | None
    silent: bool = False
    """Run it as Jupyter's silent cell: no output, no history, the execution count unchanged (a
    warm-up: the request path runs once, translated under TCG, before a user's first cell)."""
    lines: queue.SimpleQueue[outputs.Output | None] = field(default_factory=queue.SimpleQueue)
    _cancel_reason: str | None = None

    def cancel(self, reason: str) -> None:
        """Ask for the cell to stop: :data:`CLIENT_GONE` interrupts it (the kernel keeps its
        state); :data:`RESTARTING` / :data:`SHUTTING_DOWN` abandon it at once."""
        if self._cancel_reason is None:
            self._cancel_reason = reason

    @property
    def cancel_reason(self) -> str | None:
        return self._cancel_reason

    def emit(self, line: outputs.Output) -> None:
        if self._cancel_reason != CLIENT_GONE:  # nobody reads them any more
            self.lines.put(line)

    def finish(self) -> None:
        self.lines.put(outputs.END)
        self.lines.put(None)


class _Job:
    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as exc:  # handed to the waiter
            self.error = exc
        finally:
            self.done.set()

    def wait(self, timeout: float | None) -> Any:
        if not self.done.wait(timeout):
            raise TimeoutError("the kernel did not finish the request in time")
        if self.error is not None:
            raise self.error
        return self.result


class Kernel:
    """A kernel of one language, in one working directory, driven by its own worker thread."""

    def __init__(self, language: Language, cwd: str, launch: LaunchSettings, kernel_id: str) -> None:
        self.language = language
        self.cwd = cwd
        self.launch = launch
        self.kernel_id = kernel_id
        self._km: _KernelManager | None = None
        self._kc: Any = None
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._current: Execution | None = None
        self._reseed_pending = False
        self._closed = False
        self._generation = 0
        """Counts kernel processes (starts and restarts)."""
        self._worker = threading.Thread(target=self._work, name=f"kernel-{language.name}-{kernel_id[:8]}",
                                         daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------ API (any thread)
    def start(self) -> None:
        """Start the kernel and wait until it runs cells (KernelStartError if it cannot)."""
        self._call(self._start, self.launch.startup_timeout_s * 2 + 30)

    def submit(self, execution: Execution) -> None:
        """Queue a cell; its lines arrive on ``execution.lines``."""
        if self._closed:
            execution.emit(outputs.error("ContextRemoved", "the context was removed", ""))
            execution.finish()
            return
        self._jobs.put(_Job(lambda: self._execute(execution)))

    def request_reseed(self) -> None:
        """Reseed the kernel's random state before its next cell (see :mod:`.identity`); a
        kernel whose language reseeds itself has noticed the change on its own."""
        if not (self.language.reseeds_itself and self.launch.identity_file):
            self._reseed_pending = True

    def restart(self) -> None:
        """Restart the kernel (its state is gone); a running cell is abandoned."""
        current = self._current
        if current is not None:
            current.cancel(RESTARTING)
        self._call(self._restart, self.launch.startup_timeout_s * 2 + 30)

    def shutdown(self, wait_s: float = 15.0) -> None:
        """Stop the kernel and the worker; a running cell is abandoned. Idempotent."""
        if self._closed:
            return
        self._closed = True
        current = self._current
        if current is not None:
            current.cancel(SHUTTING_DOWN)
        job = _Job(self._stop)
        self._jobs.put(job)
        self._jobs.put(None)
        try:
            job.wait(wait_s)
        except Exception as exc:
            # The worker is stuck (a start that hangs): kill the process group ourselves, as the
            # kernel does not watch for its parent's exit.
            log.warning("kernel %s: shutdown: %s; killing its process group", self.kernel_id, exc)
            self._kill_process_group()

    def _kill_process_group(self) -> None:
        provisioner = getattr(self._km, "provisioner", None)
        pgid = getattr(provisioner, "pgid", None) or getattr(provisioner, "pid", None)
        if pgid:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except OSError:
                pass

    @property
    def closed(self) -> bool:
        return self._closed

    def _call(self, fn: Callable[[], Any], timeout: float) -> Any:
        if self._closed:
            raise KernelStartError("the context was removed")
        job = _Job(fn)
        self._jobs.put(job)
        return job.wait(timeout)

    # ------------------------------------------------------------------ worker thread
    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            job.run()

    def _start(self) -> None:
        if self._km is not None and self._km.is_alive():
            return
        self._discard_manager()
        launch = self.launch
        launch.runtime_dir.mkdir(parents=True, exist_ok=True)
        km = _KernelManager(kernel_name=self.language.kernel_spec,
                            connection_file=str(launch.runtime_dir / f"kernel-{self.kernel_id}.json"))
        if launch.run_as.popen_kwargs():
            km.file_owner = (launch.run_as.uid, launch.run_as.gid)
        started = time.monotonic()
        try:
            # independent: no JPY_PARENT_PID, so the kernel does not poll for its parent every second
            # (the server stops its kernels itself when it exits).
            km.start_kernel(cwd=self.cwd, env=launch.environment(), independent=True,
                            extra_arguments=list(self.language.kernel_arguments), **launch.run_as.popen_kwargs())
        except Exception as exc:
            try:
                km.cleanup_resources()  # the connection file
            except Exception:
                pass
            raise KernelStartError(f"cannot start the {self.language.name} kernel "
                                   f"(kernel spec {self.language.kernel_spec!r}): {exc}") from exc
        self._km = km
        self._generation += 1
        kc = km.blocking_client()
        kc.start_channels(shell=True, iopub=True, stdin=False, hb=False, control=False)
        self._kc = kc
        try:
            kc.wait_for_ready(timeout=launch.startup_timeout_s)
        except Exception as exc:
            self._discard_manager()
            raise KernelStartError(f"the {self.language.name} kernel did not become ready: {exc}") from exc
        self._bootstrap()
        self._reseed_pending = False  # a new process drew its own seeds
        log.info("kernel %s (%s) ready in %.2f s, pid %s, cwd %s", self.kernel_id, self.language.name,
                 time.monotonic() - started, self._pid(), self.cwd)

    def _bootstrap(self) -> None:
        code = self.language.bootstrap(self.launch.preload, self.launch.identity_file)
        if not code:
            return
        reply = self._run_silent(code, self.launch.startup_timeout_s * 2)
        if reply is None or reply.get("status") != "ok":
            log.warning("kernel %s: start-up code failed: %s", self.kernel_id, _describe(reply))

    def _pid(self) -> int | None:
        provisioner = getattr(self._km, "provisioner", None)
        return getattr(provisioner, "pid", None)

    def _discard_manager(self) -> None:
        kc, km = self._kc, self._km
        self._kc = self._km = None
        if kc is not None:
            try:
                kc.stop_channels()
            except Exception:
                pass
        if km is not None:
            try:
                km.shutdown_kernel(now=True)
            except Exception as exc:
                log.debug("kernel %s: shutdown: %s", self.kernel_id, exc)

    def _restart(self) -> None:
        km = self._km
        if km is None:
            self._start()
            return
        self._generation += 1
        try:
            km.restart_kernel(now=True)
            self._kc.wait_for_ready(timeout=self.launch.startup_timeout_s)
        except Exception as exc:
            log.warning("kernel %s: restart failed (%s); starting a new one", self.kernel_id, exc)
            self._discard_manager()
            self._start()
            return
        self._bootstrap()
        self._reseed_pending = False

    def _stop(self) -> None:
        self._discard_manager()

    def _ensure_running(self) -> None:
        if self._km is None or not self._km.is_alive():
            self._discard_manager()
            self._start()

    def _execute(self, ex: Execution) -> None:
        self._current = ex
        try:
            if ex.cancel_reason is None:
                self._execute_now(ex)
        except KernelStartError as exc:
            ex.emit(outputs.error("KernelError", str(exc), ""))
        except Exception as exc:
            log.exception("kernel %s: execution failed", self.kernel_id)
            ex.emit(outputs.error("InterpreterError", f"the interpreter failed: {exc}", ""))
        finally:
            self._current = None
            ex.finish()

    def _execute_now(self, ex: Execution) -> None:
        self._ensure_running()
        if self._reseed_pending:
            self._reseed_pending = False
            reply = self._run_silent(self.language.reseed(), SILENT_TIMEOUT_S)
            if reply is None or reply.get("status") != "ok":
                log.warning("kernel %s: reseed failed: %s", self.kernel_id, _describe(reply))
        if ex.env:
            reply = self._run_silent(self.language.apply_env(ex.env), SILENT_TIMEOUT_S)
            if reply is not None and reply.get("status") != "ok":
                # The user may have removed the helper module (python): set it up again, once.
                self._bootstrap_helpers_only()
                reply = self._run_silent(self.language.apply_env(ex.env), SILENT_TIMEOUT_S)
            if reply is None or reply.get("status") != "ok":
                ex.emit(outputs.error("EnvironmentError", f"could not set env_vars in the kernel: {_describe(reply)}", ""))
                self._run_silent(self.language.restore_env(ex.env), SILENT_TIMEOUT_S)
                return
        generation = self._generation
        try:
            self._run_cell(ex)
        finally:
            # A kernel restarted during the cell has a fresh environment: nothing to restore.
            if ex.env and generation == self._generation and ex.cancel_reason not in _ABANDON:
                reply = self._run_silent(self.language.restore_env(ex.env), SILENT_TIMEOUT_S)
                if reply is None or reply.get("status") != "ok":
                    log.warning("kernel %s: restoring the environment failed: %s", self.kernel_id, _describe(reply))

    def _bootstrap_helpers_only(self) -> None:
        code = self.language.bootstrap(False, self.launch.identity_file)
        if code:
            self._run_silent(code, SILENT_TIMEOUT_S)

    def _run_cell(self, ex: Execution) -> None:
        kc, km = self._kc, self._km
        assert kc is not None and km is not None
        msg_id = kc.execute(ex.code, silent=ex.silent, store_history=not ex.silent, allow_stdin=False,
                            stop_on_error=False)
        started = time.monotonic()
        deadline = started + ex.bound_s if ex.bound_s else None
        interrupted_at: float | None = None
        interrupt_reason = ""
        count: int | None = None
        saw_error = False
        reply: dict[str, Any] | None = None
        last_message = started
        while True:
            try:
                msg = kc.get_iopub_msg(timeout=POLL_S)
            except queue.Empty:
                msg = None
            now = time.monotonic()
            if msg is not None and msg.get("parent_header", {}).get("msg_id") == msg_id:
                last_message = now
                kind = msg.get("msg_type")
                content = msg.get("content") or {}
                if kind == "status" and content.get("execution_state") == "idle":
                    break
                if kind == "execute_input" and isinstance(content.get("execution_count"), int):
                    count = content["execution_count"]
                line = outputs.from_iopub(msg)
                if line is not None:
                    saw_error = saw_error or line["type"] == "error"
                    ex.emit(line)
            reason = ex.cancel_reason
            if reason in _ABANDON:
                ex.emit(outputs.error("ContextRestarted" if reason == RESTARTING else "ContextRemoved",
                                      f"{reason}; the cell was stopped", ""))
                return
            if interrupted_at is None:
                if reason is None and deadline is not None and now > deadline:
                    reason = f"the cell ran longer than {ex.bound_s:g} s"
                    ex.emit(outputs.stream("stderr", f"trenvx: {reason}; interrupting it\n"))
                if reason is not None:
                    log.info("kernel %s: interrupting a cell: %s", self.kernel_id, reason)
                    interrupt_reason = reason
                    interrupted_at = now
                    self._interrupt()
            elif now - interrupted_at > INTERRUPT_GRACE_S:
                log.warning("kernel %s: the cell did not stop within %.0f s of its interrupt; restarting the kernel",
                            self.kernel_id, INTERRUPT_GRACE_S)
                ex.emit(outputs.error("KernelRestarted", f"{interrupt_reason}, and the cell did not stop when "
                                      "interrupted: the kernel was restarted and its state is gone", ""))
                self._restart()
                return
            if msg is None:
                if not km.is_alive():
                    ex.emit(outputs.error("KernelDied", "the kernel died while running the cell; it was "
                                          "restarted and its state is gone", ""))
                    self._restart()
                    return
                if reply is None:
                    reply = self._poll_reply(msg_id)
                if reply is not None and now - last_message > REPLY_GRACE_S:
                    break
        if reply is None:
            reply = self._wait_reply(msg_id, SILENT_TIMEOUT_S)
        if count is None and reply is not None and isinstance(reply.get("execution_count"), int):
            count = reply["execution_count"]
        if interrupted_at is not None and not saw_error:
            ex.emit(outputs.error("KeyboardInterrupt", f"interrupted: {interrupt_reason}", ""))
        if count is not None and not ex.silent:
            ex.emit(outputs.execution_count(count))

    def _interrupt(self) -> None:
        try:
            assert self._km is not None
            self._km.interrupt_kernel()
        except Exception as exc:
            log.warning("kernel %s: interrupt failed: %s", self.kernel_id, exc)

    def _run_silent(self, code: str, timeout: float) -> dict[str, Any] | None:
        """Run the server's own code in the kernel, unseen (no output, no history, no
        execution count); the execute_reply's content, None if none came in time."""
        kc = self._kc
        if kc is None:
            return None
        msg_id = kc.execute(code, silent=True, store_history=False, allow_stdin=False, stop_on_error=False)
        return self._wait_reply(msg_id, timeout)

    def _poll_reply(self, msg_id: str) -> dict[str, Any] | None:
        return self._wait_reply(msg_id, 0.0)

    def _wait_reply(self, msg_id: str, timeout: float) -> dict[str, Any] | None:
        """The content of the shell reply to ``msg_id`` (older replies are dropped)."""
        deadline = time.monotonic() + timeout
        while True:
            left = max(0.0, deadline - time.monotonic())
            try:
                msg = self._kc.get_shell_msg(timeout=left if left > 0 else 0.001)
            except queue.Empty:
                return None
            if msg.get("parent_header", {}).get("msg_id") == msg_id:
                content: dict[str, Any] = msg.get("content") or {}
                return content
            if time.monotonic() > deadline:
                return None


def _describe(reply: dict[str, Any] | None) -> str:
    if reply is None:
        return "no reply from the kernel"
    if reply.get("status") == "error":
        return f"{reply.get('ename')}: {reply.get('evalue')}"
    return str(reply.get("status"))
