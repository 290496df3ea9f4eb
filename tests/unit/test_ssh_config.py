"""``sandbox-cli ssh-config`` and ``sandbox ssh`` (trenvx.cli.ssh_config): the config, read by the real
OpenSSH client (``ssh -G`` evaluates Match blocks, exec included, and prints the result), against a
backend with fake sandboxes.

- ``ssh <sandbox-id>`` gets the ProxyCommand, User root, the key and the pinned known_hosts; a name of
  an id's shape that the backend does not know, a domain, an IP address, a dashed host name do not
  (for those, the backend is not even asked);
- every id a sandbox can get has the shape the config matches;
- ``--write`` is idempotent and keeps the user's ~/.ssh/config as it was, plus one Include at its top
  (not again when an Include at the top already covers it; through a symlink, not over it);
- host keys are pinned per id, replacing only that id's, under a bound;
- the key: the user's own, else one made for trenvx, reused afterwards.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from trenvx.cli import ssh_config
from trenvx.cli.ssh_config import (
    Backend, Identity, SshSetupError, config_text, ensure_identity, install, pin_host_keys, proxy_argv, ssh_command,
)
from trenvx.guest.ssh_keys import parse_public_key
from trenvx.sandbox.restore import new_sandbox_id
from trenvx.server.app import create_app

from .server_fakes import ThreadedServer, UpstreamState, fake_manager, make_config, make_template, upstream_app
from .test_ssh_keys import fake_key

needs_ssh = pytest.mark.skipif(shutil.which("ssh") is None or shutil.which("ssh-keygen") is None,
                               reason="the OpenSSH client is not installed (apt-get install openssh-client)")


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    root = tmp_path_factory.mktemp("sshcfg")
    make_template(root, "tpl")
    cfg = make_config(root, api_key="cfg-key")
    with ThreadedServer(upstream_app(UpstreamState())) as upstream:
        m = fake_manager(cfg, upstream.port)
        with ThreadedServer(create_app(cfg, manager=m), lifespan="on") as s:
            r = httpx.post(f"http://127.0.0.1:{s.port}/sandboxes", json={"templateID": "tpl"},
                           headers={"X-API-Key": "cfg-key"})
            assert r.status_code == 201, r.text
            s.sid = r.json()["sandboxID"]  # type: ignore[attr-defined]
            yield s


def identity(tmp_path: Path) -> Identity:
    priv = tmp_path / "key"
    priv.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    priv.with_name("key.pub").write_text(fake_key() + "\n")
    return Identity(priv, priv.with_name("key.pub"))


def resolved(config: Path, host: str) -> dict[str, str]:
    """What ssh makes of ``host`` with this config only: option -> value (ssh -G)."""
    done = subprocess.run(["ssh", "-G", "-F", str(config), host], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "TRENVX_API_KEY": ""})
    assert done.returncode == 0, done.stderr
    out = {}
    for line in done.stdout.splitlines():
        k, _, v = line.partition(" ")
        out.setdefault(k, v)
    out["stderr"] = done.stderr
    return out


@needs_ssh
def test_ssh_takes_the_backends_sandbox_ids_and_nothing_else(backend: Any, tmp_path: Path) -> None:
    keyfile = tmp_path / "api-key"
    keyfile.write_text("cfg-key\n")
    ident = identity(tmp_path)
    cfg = tmp_path / "config"
    cfg.write_text(config_text(Backend("127.0.0.1", backend.port, keyfile), ident, tmp_path / "kh"))

    got = resolved(cfg, backend.sid)
    assert got["user"] == "root"
    assert "trenvx.cli.ssh_proxy" in got["proxycommand"] and got["proxycommand"].endswith(" '%h'")
    assert got["identityfile"] == str(ident.private)
    assert got["userknownhostsfile"] == str(tmp_path / "kh")
    assert (got["stricthostkeychecking"], got["identitiesonly"]) == ("true", "yes")

    for other in ("zzzzzzzzzzzzzzzzzzzz",              # an id's shape, but no such sandbox
                  "example.com", "10.1.2.3", "build-server-number-1", "a" * 19, "a" * 21,
                  "abcdefghij.klmnopqrs", "ABCDEFGHIJ_KLMNOPQRS"):
        assert "proxycommand" not in resolved(cfg, other), other
    # names not of an id's shape never reach the backend (no exec: nothing said on stderr)
    stopped = tmp_path / "config-dead"
    stopped.write_text(config_text(Backend("127.0.0.1", 1, keyfile), ident, tmp_path / "kh"))
    assert "does not answer" not in resolved(stopped, "example.com")["stderr"]
    dead = resolved(stopped, backend.sid)
    assert "proxycommand" not in dead and "does not answer" in dead["stderr"]


def test_every_sandbox_id_has_the_shape_the_config_matches() -> None:
    import fnmatch

    positive, *negatives = ssh_config.HOST_PATTERN.split(",")
    for _ in range(2000):
        sid = new_sandbox_id()
        assert ssh_config.SANDBOX_ID_RE.match(sid)
        assert fnmatch.fnmatchcase(sid, positive) and not any(fnmatch.fnmatchcase(sid, n[1:]) for n in negatives)


def test_commands_are_quoted_for_the_shell_and_ssh_tokens(tmp_path: Path) -> None:
    argv = proxy_argv(Backend("127.0.0.1", 5000), public_key=Path("/h/my keys/100%.pub"),
                      known_hosts=Path("/h/kh"), python="/opt/py thon/bin/python3")
    line = ssh_command(argv)
    assert line.startswith("'/opt/py thon/bin/python3' -m trenvx.cli.ssh_proxy ")
    assert "'/h/my keys/100%%.pub'" in line and line.endswith(" '%h'")
    with pytest.raises(SshSetupError, match="quote, backslash or line break"):
        ssh_command(["/x/a\"b"])
    with pytest.raises(SshSetupError):
        config_text(Backend("127.0.0.1", 5000), Identity(Path('/a"b'), Path('/a"b.pub')), tmp_path / "kh")


def test_write_is_idempotent_and_keeps_the_users_config(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    mine = "Host work\n    HostName work.example.com\n    User me\n"
    (home / ".ssh" / "config").write_text(mine)
    os.chmod(home / ".ssh" / "config", 0o644)
    text = "Match host x\n    User root\n"
    first = install(home, text)
    assert first.include_added and first.changed
    after = (home / ".ssh" / "config").read_text()
    assert after.endswith("\n\n" + mine)
    assert after.splitlines()[1] == f'Include "{home}/.ssh/config.d/trenvx"'
    assert stat.S_IMODE((home / ".ssh" / "config").stat().st_mode) == 0o644  # its mode kept
    assert (home / ".ssh" / "config.d" / "trenvx").read_text() == text
    assert stat.S_IMODE((home / ".ssh" / "config.d" / "trenvx").stat().st_mode) == 0o600
    again = install(home, text)
    assert not again.include_added and not again.changed
    assert (home / ".ssh" / "config").read_text() == after
    install(home, text + "# v2\n")
    assert (home / ".ssh" / "config").read_text() == after  # the config.d file changes, the Include stays one


def test_an_include_at_the_top_already_covering_it_is_enough_one_inside_a_host_is_not(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "config").write_text("Include config.d/*\nHost a\n    User b\n")
    assert not install(home, "x\n").include_added
    (home / ".ssh" / "config").write_text("Host a\n    Include config.d/*\n")
    assert install(home, "x\n").include_added


def test_a_missing_config_is_made_private_and_a_symlinked_one_written_through_its_link(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert install(home, "x\n").include_added
    assert stat.S_IMODE((home / ".ssh").stat().st_mode) == 0o700
    assert stat.S_IMODE((home / ".ssh" / "config").stat().st_mode) == 0o600
    dotfiles = tmp_path / "dotfiles-ssh-config"
    dotfiles.write_text("Host a\n")
    (home / ".ssh" / "config").unlink()
    (home / ".ssh" / "config").symlink_to(dotfiles)
    install(home, "x\n")
    assert (home / ".ssh" / "config").is_symlink() and "Include" in dotfiles.read_text()


def test_host_keys_are_pinned_per_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kh = tmp_path / "trenvx" / "known_hosts"
    a, b = "a" * 20, "b" * 20
    k1, k2 = parse_public_key(fake_key()), parse_public_key(fake_key("ssh-rsa"))
    pin_host_keys(kh, a, [k1])
    pin_host_keys(kh, b, [k1])
    pin_host_keys(kh, a, [k2])  # a's key changed (the backend says so): a's line replaced, b's kept
    assert kh.read_text().splitlines() == [f"{b} {k1.type} {k1.blob}", f"{a} {k2.type} {k2.blob}"]
    assert stat.S_IMODE(kh.stat().st_mode) == 0o600
    with pytest.raises(SshSetupError):
        pin_host_keys(kh, "*", [k1])
    monkeypatch.setattr(ssh_config, "MAX_PINNED", 3)
    for c in "cdefg":
        pin_host_keys(kh, c * 20, [k1])
    assert [ln.split()[0][0] for ln in kh.read_text().splitlines()] == ["e", "f", "g"]


@needs_ssh
def test_the_users_key_is_used_else_one_is_made_once(tmp_path: Path) -> None:
    home = tmp_path / "home"
    made = ensure_identity(home)
    assert made.generated and made.private == home / ".ssh" / "trenvx" / "id_ed25519"
    assert parse_public_key(made.public.read_text()).type == "ssh-ed25519"
    assert stat.S_IMODE(made.private.stat().st_mode) == 0o600
    assert ensure_identity(home) == Identity(made.private, made.public)  # reused, not made again
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(home / ".ssh" / "id_ed25519")],
                   check=True, timeout=60)
    assert ensure_identity(home).private == home / ".ssh" / "id_ed25519"
    assert ensure_identity(home, made.public).private == made.private  # --identity, given as its .pub
    with pytest.raises(SshSetupError, match="no public key"):
        (home / "lonely").write_text("x")
        ensure_identity(home, home / "lonely")


def cli(*args: str, home: Path, port: int, path_prefix: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HOME": str(home), "TRENVX_API_KEY": "cfg-key"}
    if path_prefix is not None:
        env["PATH"] = f"{path_prefix}{os.pathsep}{env['PATH']}"
    return subprocess.run([sys.executable, "-m", "trenvx.cli.sandbox_cli", "-p", str(port), *args],
                          capture_output=True, text=True, timeout=120, env=env)


@needs_ssh
def test_sandbox_cli_ssh_config_prints_and_writes(backend: Any, tmp_path: Path) -> None:
    home = tmp_path / "home"
    printed = cli("ssh-config", home=home, port=backend.port)
    assert printed.returncode == 0, printed.stderr
    assert "made an ssh key" in printed.stderr and printed.stdout.startswith("# trenvx sandboxes")
    assert f"--port {backend.port}" in printed.stdout and "cfg-key" not in printed.stdout  # the key is in a file
    assert (home / ".ssh" / "trenvx" / "api-key").read_text() == "cfg-key\n"
    cfg = tmp_path / "printed"
    cfg.write_text(printed.stdout)
    assert "proxycommand" in resolved(cfg, backend.sid)
    wrote = cli("ssh-config", "--write", home=home, port=backend.port)
    assert wrote.returncode == 0 and "included from" in wrote.stderr
    assert (home / ".ssh" / "config.d" / "trenvx").read_text() == printed.stdout
    again = cli("ssh-config", "--write", home=home, port=backend.port)
    assert "unchanged" in again.stderr and "included from" not in again.stderr


def test_sandbox_cli_ssh_runs_openssh_through_the_proxy(backend: Any, tmp_path: Path) -> None:
    """``sandbox ssh`` execs ssh (here a stand-in that prints its argv) with the proxy, the key and the pins."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_ssh = bin_dir / "ssh"
    fake_ssh.write_text("#!/bin/sh\nfor a in \"$@\"; do printf '%s\\n' \"$a\"; done\n")
    fake_ssh.chmod(0o755)
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    ident = identity(home / ".ssh")
    os.rename(ident.private, home / ".ssh" / "id_ed25519")
    os.rename(ident.public, home / ".ssh" / "id_ed25519.pub")
    done = cli("sandbox", "ssh", "-u", "user", backend.sid, "-L", "8080:localhost:80", "--", "ls", "-l",
               home=home, port=backend.port, path_prefix=bin_dir)
    assert done.returncode == 0, done.stderr
    argv = done.stdout.splitlines()
    assert argv[-4:] == ["--", backend.sid, "ls", "-l"]
    assert ["-l", "user"] == argv[argv.index("-l"):argv.index("-l") + 2]
    assert argv[argv.index("-L") + 1] == "8080:localhost:80"
    proxy = next(a for a in argv if a.startswith("ProxyCommand="))
    assert "trenvx.cli.ssh_proxy" in proxy and str(home / ".ssh" / "id_ed25519.pub") in proxy
    assert f"IdentityFile={home / '.ssh' / 'id_ed25519'}" in argv and "StrictHostKeyChecking=yes" in argv
    unknown = cli("sandbox", "ssh", "zzzzzzzzzzzzzzzzzzzz", home=home, port=backend.port, path_prefix=bin_dir)
    assert unknown.returncode == 1 and "does not exist" in unknown.stderr
    bad = cli("sandbox", "ssh", "not.an.id", home=home, port=backend.port, path_prefix=bin_dir)
    assert bad.returncode == 2 and "not a sandbox id" in bad.stderr
