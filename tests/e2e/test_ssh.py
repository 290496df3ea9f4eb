"""``ssh root@<sandbox-id>`` on real VMs (issue 16 item 4), with the OpenSSH client in BatchMode.

The config is what ``sandbox-cli ssh-config`` prints for the session backend, used as it is with
``ssh -F`` (nothing of the user's own ~/.ssh is read or written: HOME is a folder of this module,
where the CLI makes the key it logs in with). Sandboxes of the shipped ``default-sandbox`` template,
which has openssh-server and runs no sshd until the first ssh:

- ``ssh root@ID hostname`` prints the sandbox's hostname (as the SDK sees it), as root; the
  template's ``user`` logs in too; the host key is pinned per id, and two sandboxes from one snapshot
  have different host keys;
- ``scp`` copies a file in (read back through the SDK) and out;
- ``ssh -L`` forwards a local port to a web server on the sandbox's loopback;
- ``sandbox-cli sandbox ssh ID -- CMD`` runs a command the same way, without a config;
- the config takes only ids the backend knows (a made-up one is left to DNS), and a template
  without sshd (the test template) is refused with a message naming openssh-server.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from sandbox_sdk.e2b import Sandbox
from tests.e2e.server_helpers import free_port

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("ssh") is None or shutil.which("scp") is None or shutil.which("ssh-keygen") is None,
                       reason="the OpenSSH client is not installed (scripts/start.sh setup installs openssh-client)"),
]

SSH_TIMEOUT_S = 300
"""One ssh command, bounded: the first one into a sandbox makes its host key and starts sshd (TCG is slow)."""
WEB_PORT = 8000
PAGE = "hello through ssh -L\n"


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """HOME of the CLI in these tests: it has no key, so ssh-config makes one in ~/.ssh/trenvx."""
    return tmp_path_factory.mktemp("ssh-home")


def env_of(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRENVX_API_KEY", "SSH_AUTH_SOCK", "TRENVX_IP", "TRENVX_PORT")}
    env["HOME"] = str(home)
    return env


def cli(home: Path, port: int, *args: str, timeout: float = SSH_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "trenvx.cli.sandbox_cli", "-i", "127.0.0.1", "-p", str(port), *args],
                          capture_output=True, text=True, timeout=timeout, env=env_of(home), stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def ssh_config(home: Path, backend_port: int) -> Path:
    """What ``sandbox-cli ssh-config`` prints for the session backend, in a file for ``ssh -F``."""
    done = cli(home, backend_port, "ssh-config", timeout=120)
    assert done.returncode == 0, done.stderr
    assert "made an ssh key" in done.stderr
    path = home / "ssh_config"
    path.write_text(done.stdout)
    return path


def ssh(home: Path, config: Path, *args: str, timeout: float = SSH_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ssh", "-F", str(config), "-o", "BatchMode=yes", *args], capture_output=True, text=True,
                          timeout=timeout, env=env_of(home), stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def sbx(sdk_backend: str, shipped_template: str) -> Iterator[Sandbox]:
    s = Sandbox.create(shipped_template, timeout=1200, metadata={"suite": "ssh"}, api_url=sdk_backend)
    try:
        yield s
    finally:
        s.kill()


def pinned(home: Path, sandbox_id: str) -> list[str]:
    known = home / ".ssh" / "trenvx" / "known_hosts"
    return [ln for ln in known.read_text().splitlines() if ln.split(" ", 1)[0] == sandbox_id]


def test_ssh_root_at_the_sandbox_id_runs_a_command(home: Path, ssh_config: Path, sbx: Sandbox) -> None:
    hostname = sbx.commands.run("hostname").stdout.strip()
    assert hostname
    done = ssh(home, ssh_config, f"root@{sbx.sandbox_id}", "hostname; id -un")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{hostname}\nroot\n"
    assert "Permanently added" not in done.stderr and "WARNING" not in done.stderr, done.stderr

    # The pin is the sandbox's own host key, as its sshd has it.
    [line] = pinned(home, sbx.sandbox_id)
    own = sbx.files.read("/etc/trenvx-ssh/ssh_host_ed25519_key.pub", user="root").split()
    assert line.split()[1:] == own[:2]

    # Again (sshd runs now), and as the template's user, whose authorized_keys got the key too.
    done = ssh(home, ssh_config, f"user@{sbx.sandbox_id}", "id -un; pwd")
    assert (done.returncode, done.stdout) == (0, "user\n/home/user\n"), done.stderr


def test_sandboxes_from_one_snapshot_have_their_own_host_keys(home: Path, ssh_config: Path, sbx: Sandbox,
                                                             sdk_backend: str, shipped_template: str) -> None:
    other = Sandbox.create(shipped_template, timeout=600, metadata={"suite": "ssh"}, api_url=sdk_backend)
    try:
        done = ssh(home, ssh_config, f"root@{other.sandbox_id}", "true")
        assert done.returncode == 0, done.stderr
        if not pinned(home, sbx.sandbox_id):
            assert ssh(home, ssh_config, f"root@{sbx.sandbox_id}", "true").returncode == 0
        [mine], [theirs] = pinned(home, sbx.sandbox_id), pinned(home, other.sandbox_id)
        assert mine.split()[1:] != theirs.split()[1:]
    finally:
        other.kill()


def test_scp_copies_a_file_in_and_out(home: Path, ssh_config: Path, sbx: Sandbox, tmp_path: Path) -> None:
    payload = os.urandom(300_000)
    src = tmp_path / "in.bin"
    src.write_bytes(payload)
    done = subprocess.run(["scp", "-F", str(ssh_config), "-o", "BatchMode=yes", str(src),
                           f"root@{sbx.sandbox_id}:/root/from-scp.bin"], capture_output=True, text=True,
                          timeout=SSH_TIMEOUT_S, env=env_of(home), stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert bytes(sbx.files.read("/root/from-scp.bin", format="bytes", user="root")) == payload

    sbx.files.write("/home/user/to-scp.txt", "written by the SDK\n")
    back = tmp_path / "out.txt"
    done = subprocess.run(["scp", "-F", str(ssh_config), "-o", "BatchMode=yes",
                           f"root@{sbx.sandbox_id}:/home/user/to-scp.txt", str(back)], capture_output=True, text=True,
                          timeout=SSH_TIMEOUT_S, env=env_of(home), stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert back.read_text() == "written by the SDK\n"


def test_ssh_L_forwards_a_local_port_to_the_sandboxs_loopback(home: Path, ssh_config: Path, sbx: Sandbox) -> None:
    sbx.files.write("/tmp/www/index.html", PAGE)
    server = sbx.commands.run(f"python3 -m http.server {WEB_PORT} --bind 127.0.0.1 --directory /tmp/www",
                              background=True, timeout=0)
    local = free_port()
    tunnel = subprocess.Popen(["ssh", "-F", str(ssh_config), "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes",
                               "-N", "-L", f"127.0.0.1:{local}:127.0.0.1:{WEB_PORT}", f"root@{sbx.sandbox_id}"],
                              env=env_of(home), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + SSH_TIMEOUT_S
        status, text = 0, ""
        while time.monotonic() < deadline and tunnel.poll() is None:
            try:
                r = httpx.get(f"http://127.0.0.1:{local}/index.html", timeout=30, trust_env=False)
                status, text = r.status_code, r.text
                if status == 200:
                    break
            except httpx.HTTPError:  # ssh not listening yet, or the server in the sandbox not yet up
                pass
            time.sleep(0.3)
        assert tunnel.poll() is None, tunnel.communicate(timeout=10)
        assert (status, text) == (200, PAGE)
    finally:
        tunnel.terminate()
        try:
            tunnel.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            tunnel.kill()
            tunnel.communicate()
        sbx.commands.kill(server.pid)


def test_sandbox_cli_ssh_runs_a_command(home: Path, backend_port: int, ssh_config: Path, sbx: Sandbox) -> None:
    done = cli(home, backend_port, "sandbox", "ssh", sbx.sandbox_id, "--", "echo", "via", "sandbox-cli")
    assert (done.returncode, done.stdout) == (0, "via sandbox-cli\n"), done.stderr
    done = cli(home, backend_port, "sandbox", "ssh", sbx.sandbox_id, "--", "exit 7")
    assert done.returncode == 7, done.stderr


def test_only_the_backends_sandboxes_are_taken(home: Path, ssh_config: Path, sdk_backend: str,
                                               test_template: str) -> None:
    # A name of an id's shape that the backend does not know: ssh treats it as a host name (DNS).
    done = ssh(home, ssh_config, "root@zzzzzzzzzzzzzzzzzzzz", "true", timeout=120)
    assert done.returncode == 255 and "trenvx.cli.ssh_proxy" not in done.stderr
    assert "resolve" in done.stderr.lower() or "not known" in done.stderr.lower(), done.stderr

    # The test template has no OpenSSH server: the refusal says what to add.
    plain = Sandbox.create(test_template, timeout=300, metadata={"suite": "ssh"}, api_url=sdk_backend)
    try:
        done = ssh(home, ssh_config, f"root@{plain.sandbox_id}", "true")
        assert done.returncode == 255 and "openssh-server" in done.stderr, done.stderr
    finally:
        plain.kill()
