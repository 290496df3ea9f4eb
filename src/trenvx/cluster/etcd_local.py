"""A real N-member etcd cluster on this machine's loopback: for the cluster's tests, its
benchmarks and the one-command local cluster (``python -m trenvx.cluster.etcd_local``).

Each member is the system's ``etcd`` (Debian's etcd-server) with its own data directory and
log file under ``base_dir``, a client and a peer port, started in its own process group so that
a signal reaches the member and nothing it may start. Members die with the thread that started
them (PR_SET_PDEATHSIG), so a test runner killed outright leaves no etcd behind; start the
cluster from a long-lived thread (the main one, or the event loop's), not a short-lived worker.
``stop()`` terminates, waits, kills what did not exit, reaps every process and removes the data
directories (the logs stay, for reading after a failure).

This is synchronous (subprocess.Popen, urllib): starting a cluster is not on any hot path.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from types import TracebackType

ETCD_BIN = "etcd"
STOP_GRACE_S = 5.0
LOG_TAIL_LINES = 30
_PR_SET_PDEATHSIG = 1


class LocalEtcdError(RuntimeError):
    """A local etcd member could not be started (the message carries its log's tail)."""


def _die_with_parent() -> None:
    """Run in the child between fork and exec: SIGKILL it when the thread that started it dies."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: stop() still cleans up
        pass


def free_ports(host: str, n: int) -> list[int]:
    """``n`` distinct TCP ports free on ``host`` now (held together while chosen, so no repeats).
    Another process may still take one before etcd binds it; start() then fails with the log."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


class LocalEtcdCluster:
    """``members`` etcd processes on ``host`` forming one cluster. Ports: member ``i`` has client
    port ``first_port + 2*i`` and peer port ``first_port + 2*i + 1``, or free ports picked at
    construction when ``first_port`` is None. Use as a context manager, or start()/stop()."""

    def __init__(self, base_dir: Path, members: int = 3, *, host: str = "127.0.0.1",
                 first_port: int | None = None) -> None:
        if members < 1:
            raise ValueError(f"members must be at least 1, got {members}")
        if first_port is not None and not 0 < first_port <= 65535 - 2 * members:
            raise ValueError(f"first_port {first_port} leaves no room for {2 * members} ports below 65536")
        self.base_dir = Path(base_dir)
        self.members = members
        self.host = host
        ports = (list(range(first_port, first_port + 2 * members)) if first_port is not None
                 else free_ports(host, 2 * members))
        self.client_ports = ports[0::2]
        self.peer_ports = ports[1::2]
        self.token = f"trenvx-{uuid.uuid4().hex[:12]}"
        self._procs: list[subprocess.Popen[bytes] | None] = [None] * members

    # --- addresses ---------------------------------------------------------------------------

    def name(self, i: int) -> str:
        return f"m{i}"

    def client_url(self, i: int) -> str:
        return f"http://{_url_host(self.host)}:{self.client_ports[i]}"

    def peer_url(self, i: int) -> str:
        return f"http://{_url_host(self.host)}:{self.peer_ports[i]}"

    def data_dir(self, i: int) -> Path:
        return self.base_dir / f"{self.name(i)}.etcd"

    def log_path(self, i: int) -> Path:
        return self.base_dir / f"{self.name(i)}.log"

    @property
    def endpoints(self) -> list[str]:
        """The members' client URLs (``http://h:p``), member 0 first."""
        return [self.client_url(i) for i in range(self.members)]

    @property
    def url(self) -> str:
        """The cluster as ``trenvx serve --cluster`` takes it: ``etcd://h:p,h:p,h:p``."""
        return "etcd://" + ",".join(f"{_url_host(self.host)}:{p}" for p in self.client_ports)

    def pid(self, i: int) -> int | None:
        """Member ``i``'s pid while it runs, else None."""
        proc = self._procs[i]
        return proc.pid if proc is not None and proc.poll() is None else None

    # --- lifecycle ---------------------------------------------------------------------------

    def _argv(self, i: int, state: str) -> list[str]:
        initial = ",".join(f"{self.name(j)}={self.peer_url(j)}" for j in range(self.members))
        return [
            shutil.which(ETCD_BIN) or ETCD_BIN,
            "--name", self.name(i),
            "--data-dir", str(self.data_dir(i)),
            "--listen-client-urls", self.client_url(i),
            "--advertise-client-urls", self.client_url(i),
            "--listen-peer-urls", self.peer_url(i),
            "--initial-advertise-peer-urls", self.peer_url(i),
            "--initial-cluster", initial,
            "--initial-cluster-state", state,
            "--initial-cluster-token", self.token,
            "--logger", "zap", "--log-outputs", "stderr",
        ]

    def _spawn(self, i: int, state: str) -> None:
        if self.pid(i) is not None:
            raise LocalEtcdError(f"etcd member {self.name(i)} is already running (pid {self.pid(i)})")
        if shutil.which(ETCD_BIN) is None:
            raise LocalEtcdError(f"{ETCD_BIN} not found on PATH: install Debian's etcd-server "
                                 "(scripts/start.sh setup installs it)")
        self.base_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path(i), "ab") as log:
            log.write(f"--- {time.strftime('%H:%M:%S')} starting {self.name(i)} ({state})\n".encode())
            log.flush()
            self._procs[i] = subprocess.Popen(
                self._argv(i, state), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_die_with_parent, close_fds=True,
            )

    def healthy(self, i: int, timeout_s: float = 1.0) -> bool:
        """Whether member ``i`` answers ``/health`` with true (it is up and the cluster has a leader)."""
        try:
            with urllib.request.urlopen(self.client_url(i) + "/health", timeout=timeout_s) as resp:
                return json.loads(resp.read()).get("health") == "true"
        except (OSError, ValueError, urllib.error.URLError):
            return False

    def _wait_healthy(self, which: list[int], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        pending = list(which)
        while pending:
            for i in list(pending):
                proc = self._procs[i]
                if proc is None or proc.poll() is not None:
                    code = None if proc is None else proc.returncode
                    raise LocalEtcdError(f"etcd member {self.name(i)} exited (code {code}) while starting; "
                                         f"{self.log_path(i)} ends:\n{_log_tail(self.log_path(i))}")
                if self.healthy(i):
                    pending.remove(i)
            if pending and time.monotonic() > deadline:
                tails = "\n".join(f"--- {self.log_path(i)}:\n{_log_tail(self.log_path(i))}" for i in pending)
                raise LocalEtcdError(f"etcd members {[self.name(i) for i in pending]} not healthy after "
                                     f"{timeout_s:.0f} s (client URLs {[self.client_url(i) for i in pending]}):\n{tails}")
            if pending:
                time.sleep(0.05)

    def start(self, timeout_s: float = 30) -> "LocalEtcdCluster":
        """Start every member as a new cluster and wait until each answers /health. On failure
        everything started is stopped and LocalEtcdError carries the log tails."""
        try:
            for i in range(self.members):
                self._spawn(i, "new")
            self._wait_healthy(list(range(self.members)), timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _end(self, i: int, sig: int) -> None:
        """Signal member ``i``'s process group and reap it (SIGKILL after STOP_GRACE_S)."""
        proc = self._procs[i]
        if proc is None:
            return
        try:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(timeout=STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    proc.wait(timeout=STOP_GRACE_S)
        finally:
            self._procs[i] = None

    def kill_member(self, i: int) -> None:
        """SIGKILL member ``i`` (a crash: no clean shutdown); its data directory stays for restart_member."""
        self._end(i, signal.SIGKILL)

    def restart_member(self, i: int, timeout_s: float = 30) -> None:
        """Start member ``i`` again from its data directory (``--initial-cluster-state existing``)
        and wait until it answers /health. Raises LocalEtcdError with its log tail if it does not."""
        self._end(i, signal.SIGTERM)
        self._spawn(i, "existing")
        try:
            self._wait_healthy([i], timeout_s)
        except BaseException:
            self._end(i, signal.SIGKILL)
            raise

    def restart_members(self, which: list[int], timeout_s: float = 30) -> None:
        """Start the members ``which`` again together and wait until each answers /health: after
        a loss of quorum no member is healthy alone, so they cannot be restarted one by one."""
        for i in which:
            self._end(i, signal.SIGTERM)
        for i in which:
            self._spawn(i, "existing")
        try:
            self._wait_healthy(list(which), timeout_s)
        except BaseException:
            for i in which:
                self._end(i, signal.SIGKILL)
            raise

    def stop(self) -> None:
        """Terminate every member (SIGTERM, then SIGKILL after STOP_GRACE_S), reap them all and
        remove the data directories. Safe to call more than once.

        One member at a time: a leader told to stop hands its leadership to a follower first,
        which is quick while the others run, but waits out STOP_GRACE_S when they all stop at once."""
        for i in range(self.members):
            self._end(i, signal.SIGTERM)
        for i in range(self.members):
            shutil.rmtree(self.data_dir(i), ignore_errors=True)

    def __enter__(self) -> "LocalEtcdCluster":
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """Start a local cluster, print its ``etcd://`` URL on stdout, run until SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m trenvx.cluster.etcd_local",
                                     description="Run an N-member etcd cluster on loopback until interrupted.")
    parser.add_argument("--dir", required=True, type=Path, help="directory for the members' data and logs")
    parser.add_argument("--members", type=int, default=3, help="number of members (default 3)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--first-port", type=int, default=None,
                        help="client port of member 0; member i uses first+2i (client) and first+2i+1 (peer); "
                             "free ports are picked when omitted")
    args = parser.parse_args(argv)

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        cluster = LocalEtcdCluster(args.dir, args.members, host=args.host, first_port=args.first_port)
        cluster.start()
    except (LocalEtcdError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        print(cluster.url, flush=True)
        print(f"etcd: {args.members} members, data and logs in {args.dir}; Ctrl-C stops them", file=sys.stderr)
        reported: set[int] = set()
        while not stop.wait(1.0):
            for i in range(cluster.members):
                if cluster.pid(i) is None and i not in reported:
                    reported.add(i)
                    print(f"etcd member {cluster.name(i)} exited; {cluster.log_path(i)} ends:\n"
                          f"{_log_tail(cluster.log_path(i), 10)}", file=sys.stderr)
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
