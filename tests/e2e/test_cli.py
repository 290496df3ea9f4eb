"""sandbox-cli against a real server with real VMs: create, ls, exec, shell (through a PTY),
kill, --json, --ip/--port, errors on stderr with non-zero exit codes."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time

import pytest

from .server_helpers import running_server

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(tmp_path_factory, e2e_config, test_template):
    with running_server(tmp_path_factory.mktemp("cli"), e2e_config, template=test_template) as srv:
        yield srv


def cli(server, *args: str, stdin: bytes | None = b"", timeout: float = 120) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "trenvx.cli.sandbox_cli", "-i", "127.0.0.1", "-p", str(server.port), *args]
    return subprocess.run(argv, input=stdin, capture_output=True, timeout=timeout)


def test_create_ls_exec_kill(server, test_template) -> None:
    r = cli(server, "sandbox", "create", "-t", test_template)
    assert r.returncode == 0, r.stderr
    sid = r.stdout.decode().strip()
    assert len(sid) == 20 and sid.isalnum()

    r = cli(server, "sandbox", "ls")
    assert r.returncode == 0
    table = r.stdout.decode()
    for word in ("ID", "TEMPLATE", "STATE", "AGE", "TIMEOUT LEFT", "MEMORY", sid, test_template, "running", "MiB"):
        assert word in table, table

    r = cli(server, "--json", "sandbox", "ls")
    [item] = [s for s in json.loads(r.stdout) if s["sandboxID"] == sid]
    assert item["state"] == "running" and item["trenvx"]["pssBytes"] > 0

    r = cli(server, "sandbox", "exec", sid, "--", "python3", "-c",
            "import sys; print('Hello World'); print('to-err', file=sys.stderr); sys.exit(5)")
    assert (r.returncode, r.stdout, r.stderr) == (5, b"Hello World\n", b"to-err\n")
    r = cli(server, "sandbox", "exec", sid, "--", "sh", "-c", "cat | tr a-z A-Z", stdin=b"piped input\n")
    assert (r.returncode, r.stdout) == (0, b"PIPED INPUT\n")
    r = cli(server, "sandbox", "exec", sid, "--", "echo $((6*7)) | cat")
    assert r.stdout == b"42\n"

    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "trenvx.cli.sandbox_cli", "-p", str(server.port), "sandbox",
                             "exec", sid, "--", "sh", "-c", "echo first; sleep 2; echo second"],
                            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    first = proc.stdout.readline()
    first_at = time.monotonic() - t0
    rest = proc.stdout.read()
    proc.wait(30)
    assert (first, rest, proc.returncode) == (b"first\n", b"second\n", 0)
    assert time.monotonic() - t0 - first_at > 1.5, "output is streamed, not collected at the end"

    r = cli(server, "sandbox", "kill", sid)
    assert r.returncode == 0 and r.stdout.decode().strip() == sid
    r = cli(server, "sandbox", "ls", "-a")
    assert sid in r.stdout.decode() and "exited (killed)" in r.stdout.decode()
    # piped in a 40-column window, as `sandbox ls -a | grep ID`: its one line, every value whole
    r = subprocess.run([sys.executable, "-m", "trenvx.cli.sandbox_cli", "-p", str(server.port), "sandbox", "ls", "-a"],
                       capture_output=True, timeout=60, env={**os.environ, "COLUMNS": "40"})
    [line] = [ln for ln in r.stdout.decode().splitlines() if sid in ln]
    assert line.split()[:3] == [sid, test_template, "exited"] and "exited (killed)" in line, r.stdout
    assert sid not in cli(server, "sandbox", "ls").stdout.decode()


def test_kill_all_and_errors(server) -> None:
    ids = [cli(server, "sandbox", "create").stdout.decode().strip() for _ in range(2)]
    r = cli(server, "--json", "sandbox", "kill", "-a")
    assert r.returncode == 0 and sorted(json.loads(r.stdout)["killed"]) == sorted(ids)
    assert json.loads(cli(server, "--json", "sandbox", "ls").stdout) == []

    r = cli(server, "sandbox", "kill", "nosuchsandbox")
    assert r.returncode == 1 and b"does not exist" in r.stderr and r.stdout == b""
    r = cli(server, "sandbox", "exec", "nosuchsandbox", "--", "true")
    assert r.returncode == 1 and b"does not exist" in r.stderr
    r = cli(server, "sandbox", "create", "-t", "no-such-template")
    assert r.returncode == 1 and b"no-such-template" in r.stderr
    r = subprocess.run([sys.executable, "-m", "trenvx.cli.sandbox_cli", "-p", "1", "sandbox", "ls"],
                       capture_output=True, timeout=60)
    assert r.returncode == 1 and b"cannot reach the trenvx backend" in r.stderr


def test_shell_through_a_pty(server) -> None:
    sid = cli(server, "sandbox", "create").stdout.decode().strip()
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "trenvx.cli.sandbox_cli", "-p", str(server.port), "sandbox",
                             "shell", sid], stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    seen = b""

    def read_until(marker: bytes, timeout: float = 30) -> bytes:
        nonlocal seen
        deadline = time.monotonic() + timeout
        while marker not in seen:
            if time.monotonic() > deadline:
                raise AssertionError(f"{marker!r} not seen; got {seen[-2000:]!r}")
            r, _, _ = select.select([master], [], [], 0.2)
            if r:
                try:
                    seen += os.read(master, 65536)
                except OSError:
                    break
        return seen

    try:
        os.write(master, b"echo marker-$((20+22)); tty\n")
        out = read_until(b"marker-42")
        read_until(b"/dev/pts/")
        assert b"marker-42" in out
        os.write(master, b"stty size\n")
        read_until(b"\n")
        os.write(master, b"exit 3\n")
        proc.wait(30)
        assert proc.returncode == 3
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
        cli(server, "sandbox", "kill", sid)
    r = cli(server, "sandbox", "shell", sid, stdin=b"")
    assert r.returncode != 0 and b"terminal" in r.stderr
