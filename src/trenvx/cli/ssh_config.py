"""The caller's side of ``ssh root@<sandbox-id>``: the ssh client config, the key, the pinned host keys.

``sandbox-cli ssh-config`` writes (``--write``) or prints an ssh client config whose one
``Match`` block applies only to sandboxes of the trenvx backend:

- **What matches.** ``Match host`` takes host names of a sandbox id's shape only (20 characters,
  none of them ``.``, ``-``, ``_``, ``:`` or ``'``: no domain name, IP address or dashed host name
  qualifies), and then ``exec`` asks the backend whether such a sandbox exists
  (``python -m trenvx.cli.ssh_proxy --is-sandbox``): an ordinary host is never taken, and a name
  of that shape that the backend does not know (or a backend that does not answer) leaves ssh
  as it was. Sandbox ids are ``[a-z][a-z0-9]{19}`` (:func:`trenvx.sandbox.restore.new_sandbox_id`).
- **How it connects.** ``ProxyCommand`` runs :mod:`trenvx.cli.ssh_proxy`, which has the backend
  start sshd in the sandbox and install the public key, pins the sandbox's host key, then relays
  the connection over the backend's websocket to port 22 (:mod:`trenvx.server.routes_ssh`). The
  command is the absolute path of the Python that runs sandbox-cli with ``-m``: it works without
  PATH, virtualenv activation or pyenv shims, and it imports no CLI framework (it runs twice per
  ssh: ``Match exec`` and ``ProxyCommand``).
- **Which key.** The caller's own (``~/.ssh/id_ed25519``, ``id_ecdsa``, ``id_rsa``, or
  ``--identity``); without one, a key made for trenvx in ``~/.ssh/trenvx/id_ed25519``. Only its
  ``.pub`` is ever read by trenvx and sent to a sandbox.
- **Host keys.** Checked, never ignored: ``StrictHostKeyChecking yes`` against
  ``~/.ssh/trenvx/known_hosts``, where the ProxyCommand pins the key the backend reported for that
  sandbox id before ssh reads it. Every sandbox makes its own host key on its first ssh (sandboxes
  from one snapshot would otherwise share one), and the backend reads it through the sandbox's
  agent over the authenticated API: the pin is as trustworthy as the tunnel itself, with no
  prompt and no "Permanently added" line. The pins stay apart from ``~/.ssh/known_hosts``, and the
  oldest beyond :data:`MAX_PINNED` are dropped (ids are never reused).

With ``--write`` the config goes to ``~/.ssh/config.d/trenvx`` and ``~/.ssh/config`` gets one
``Include`` of it at its top (once; the rest of the file is kept as it is, a symlinked config is
written through its link). Paths in the config are absolute: ssh expands ``~`` from the password
database, not from ``$HOME``.
"""

from __future__ import annotations

import fcntl
import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..guest.ssh_keys import InvalidPublicKey, PublicKey, parse_public_key

SANDBOX_ID_RE = re.compile(r"^[a-z][a-z0-9]{19}$")
"""The ids sandboxes get (trenvx.sandbox.restore.new_sandbox_id)."""
HOST_PATTERN = "?" * 20 + ",!*.*,!*-*,!*_*,!*:*,!*'*"
"""ssh ``Match host`` patterns: 20 characters, none that a domain, an address or a quoting trick needs."""
IDENTITY_NAMES = ("id_ed25519", "id_ecdsa", "id_rsa")
"""The user's own keys, in the order ssh itself tries them."""
INCLUDE_NAME = "config.d/trenvx"
MAX_PINNED = 1000
"""Pinned host keys kept in trenvx's known_hosts; older ones belong to sandboxes long gone."""
PROXY_MODULE = "trenvx.cli.ssh_proxy"


class SshSetupError(Exception):
    """The ssh setup cannot be made as asked; the message says what to do."""


def ssh_dir(home: Path) -> Path:
    return home / ".ssh"


def state_dir(home: Path) -> Path:
    """trenvx's own ssh files: the generated key, the pinned host keys, the API key."""
    return ssh_dir(home) / "trenvx"


def known_hosts_path(home: Path) -> Path:
    return state_dir(home) / "known_hosts"


# -- the key ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """A key pair: ``private`` goes to ssh (IdentityFile), ``public`` into sandboxes."""

    private: Path
    public: Path
    generated: bool = False

    def public_key(self) -> PublicKey:
        try:
            return parse_public_key(self.public.read_text(errors="replace"))
        except OSError as e:
            raise SshSetupError(f"cannot read the public key {self.public}: {e.strerror or e}") from None
        except InvalidPublicKey as e:
            raise SshSetupError(f"{self.public}: {e}") from None


def find_identity(home: Path) -> Identity | None:
    """The user's own key pair (both halves present), in ssh's order; None without one."""
    for name in IDENTITY_NAMES:
        private = ssh_dir(home) / name
        public = private.with_name(name + ".pub")
        if private.is_file() and public.is_file():
            return Identity(private, public)
    return None


def ensure_identity(home: Path, explicit: Path | None = None) -> Identity:
    """The key to use: ``explicit`` (a private key whose ``.pub`` is beside it, or that ``.pub``),
    else the user's own, else trenvx's (made with ssh-keygen on first use)."""
    if explicit is not None:
        explicit = explicit.expanduser().absolute()
        private = explicit.with_suffix("") if explicit.suffix == ".pub" else explicit
        public = private.with_name(private.name + ".pub")
        if not private.is_file():
            raise SshSetupError(f"--identity {explicit}: no private key {private} (ssh needs it; only its .pub is sent)")
        if not public.is_file():
            raise SshSetupError(f"--identity {explicit}: no public key {public} beside it; make it with "
                                f"ssh-keygen -y -f {shlex.quote(str(private))} > {shlex.quote(str(public))}")
        identity = Identity(private, public)
        identity.public_key()
        return identity
    found = find_identity(home)
    if found is not None:
        return found
    private = state_dir(home) / "id_ed25519"
    public = private.with_name("id_ed25519.pub")
    if private.is_file() and public.is_file():
        return Identity(private, public)
    keygen = shutil.which("ssh-keygen")
    if keygen is None:
        raise SshSetupError("you have no ssh key (~/.ssh/id_ed25519) and there is no ssh-keygen to make one: install "
                            "the OpenSSH client (apt-get install openssh-client)")
    _make_private_dir(state_dir(home))
    for p in (private, public):
        p.unlink(missing_ok=True)
    done = subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-C", f"trenvx sandboxes ({os.uname().nodename})",
                           "-f", str(private)], capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise SshSetupError(f"ssh-keygen could not make {private}: {(done.stderr or done.stdout).strip()}")
    return Identity(private, public, generated=True)


def _make_private_dir(path: Path) -> None:
    """``path`` and its missing parents, each made 0700 (ssh wants ~/.ssh private); existing ones are left as they are."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        d.mkdir(mode=0o700)
        os.chmod(d, 0o700)  # (mkdir's mode is cut by the umask)


# -- the commands ssh runs ------------------------------------------------------------------------


@dataclass(frozen=True)
class Backend:
    """Where the ProxyCommand finds the backend: address, port, and the file holding its API key, if any."""

    ip: str
    port: int
    api_key_file: Path | None = None

    @property
    def url(self) -> str:
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"http://{host}:{self.port}"


def write_api_key(home: Path, key: str) -> Path:
    """The API key in a file only its owner reads (ssh's ProxyCommand needs it; a command line would show it to ps)."""
    _make_private_dir(state_dir(home))
    path = state_dir(home) / "api-key"
    _write_atomic(path, key.strip() + "\n", 0o600)
    return path


def _config_safe(path: Path | str, what: str) -> str:
    text = str(path)
    if any(c in text for c in '"\\\n\r\0'):
        raise SshSetupError(f"{what} {text!r} holds a quote, backslash or line break, which an ssh config cannot "
                            "carry; use a path without them")
    return text


def proxy_argv(backend: Backend, *, check: bool = False, public_key: Path | None = None,
               known_hosts: Path | None = None, python: str | None = None) -> list[str]:
    """The ProxyCommand (``check``: the ``Match exec`` test) as argv, without the host name."""
    argv = [python or sys.executable, "-m", PROXY_MODULE, "--ip", backend.ip, "--port", str(backend.port)]
    if backend.api_key_file is not None:
        argv += ["--api-key-file", str(backend.api_key_file)]
    if check:
        return argv + ["--is-sandbox"]
    if public_key is not None:
        argv += ["--public-key", str(public_key)]
    if known_hosts is not None:
        argv += ["--known-hosts", str(known_hosts)]
    return argv


def ssh_command(argv: Sequence[str]) -> str:
    """``argv`` plus the host as one shell command line for ssh: each word quoted, ``%`` doubled
    (ssh expands ``%`` tokens), and the host as ssh's ``%h`` token in single quotes (the host
    pattern excludes ``'``, so a host name cannot break out)."""
    for word in argv:
        _config_safe(word, "path")
    return " ".join(shlex.quote(w).replace("%", "%%") for w in argv) + " '%h'"


def _config_path(path: Path) -> str:
    return '"' + _config_safe(path, "path").replace("%", "%%") + '"'


def config_text(backend: Backend, identity: Identity, known_hosts: Path, *, python: str | None = None) -> str:
    """The ssh client config for this backend's sandboxes (see the module's docstring)."""
    check = ssh_command(proxy_argv(backend, check=True, python=python))
    proxy = ssh_command(proxy_argv(backend, public_key=identity.public, known_hosts=known_hosts, python=python))
    return (
        "# trenvx sandboxes: ssh root@<sandbox-id>, scp FILE root@<sandbox-id>:, ssh -L 8080:localhost:80 root@<sandbox-id>\n"
        f"# Written by `sandbox-cli ssh-config` for the trenvx backend at {backend.url}; run it again to update it\n"
        "# (edits here are replaced). Only host names shaped like a sandbox id (20 letters and digits) that the\n"
        "# backend knows match: other hosts are not affected.\n"
        f'Match host "{HOST_PATTERN}" exec "{check}"\n'
        "    User root\n"
        f"    ProxyCommand {proxy}\n"
        f"    IdentityFile {_config_path(identity.private)}\n"
        "    IdentitiesOnly yes\n"
        f"    UserKnownHostsFile {_config_path(known_hosts)}\n"
        "    StrictHostKeyChecking yes\n"
        "    CheckHostIP no\n"
        "    HashKnownHosts no\n"
        "    UpdateHostKeys no\n"
        "    ServerAliveInterval 30\n"
    )


# -- writing it -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Installed:
    """What ``--write`` did: the config file, the user's config, whether the Include was added now."""

    path: Path
    user_config: Path
    include_added: bool
    changed: bool


def _write_atomic(path: Path, text: str, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_KEYWORD = re.compile(r"^(\S+?)(?:\s*=\s*|\s+)(.*)$")


def _top_level_includes(text: str, base: Path) -> list[str]:
    """The Include patterns before the first Host or Match block (later ones apply only inside it),
    as absolute paths (relative ones are relative to ``base``, ~/.ssh)."""
    patterns: list[str] = []
    for raw in text.splitlines():
        m = _KEYWORD.match(raw.strip())
        if not m or m.group(1).startswith("#"):
            continue
        keyword = m.group(1).lower()
        if keyword in ("host", "match"):
            break
        if keyword != "include":
            continue
        try:
            words = shlex.split(m.group(2))
        except ValueError:
            continue
        for w in words:
            p = Path(os.path.expanduser(w))
            patterns.append(str(p if p.is_absolute() else base / p))
    return patterns


def install(home: Path, text: str) -> Installed:
    """Write ``text`` to ``~/.ssh/config.d/trenvx`` and include it at the top of ``~/.ssh/config``,
    both idempotently; nothing else in the user's config changes."""
    ssh = ssh_dir(home)
    _make_private_dir(ssh / "config.d")
    path = ssh / INCLUDE_NAME
    old = path.read_text() if path.is_file() else None
    if old != text:
        _write_atomic(path, text, 0o600)
    user_config = ssh / "config"
    target = user_config.resolve() if user_config.is_symlink() else user_config
    current = target.read_text() if target.is_file() else ""
    if any(fnmatch.fnmatchcase(str(path), pat) for pat in _top_level_includes(current, ssh)):
        return Installed(path, user_config, include_added=False, changed=old != text)
    header = ("# Added by `sandbox-cli ssh-config --write`: ssh root@<sandbox-id> for trenvx sandboxes\n"
              f"Include {_config_path(path)}\n\n")
    mode = (target.stat().st_mode & 0o777) if target.is_file() else 0o600
    _write_atomic(target, header + current, mode)
    return Installed(path, user_config, include_added=True, changed=True)


# -- pinned host keys -----------------------------------------------------------------------------


def pin_host_keys(known_hosts: Path, sandbox_id: str, keys: Sequence[PublicKey]) -> None:
    """Make ``keys`` the only known host keys of ``sandbox_id`` in ``known_hosts`` (under a lock:
    concurrent ssh sessions rewrite the file one at a time); keeps the newest :data:`MAX_PINNED`."""
    if not SANDBOX_ID_RE.match(sandbox_id):
        raise SshSetupError(f"{sandbox_id!r} is not a sandbox id")
    new = [k.known_hosts_line(sandbox_id) for k in keys]
    _make_private_dir(known_hosts.parent)
    with open(known_hosts.with_name(known_hosts.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        lines = known_hosts.read_text().splitlines() if known_hosts.is_file() else []
        if [ln for ln in lines if ln.split(" ", 1)[0] == sandbox_id] == new:
            return
        kept = [ln for ln in lines if ln.strip() and ln.split(" ", 1)[0] != sandbox_id]
        kept = kept[-max(0, MAX_PINNED - len(new)):] if MAX_PINNED > len(new) else []
        _write_atomic(known_hosts, "".join(ln + "\n" for ln in kept + new), 0o600)


__all__ = [
    "Backend", "HOST_PATTERN", "Identity", "Installed", "SANDBOX_ID_RE", "SshSetupError", "config_text",
    "ensure_identity", "find_identity", "install", "known_hosts_path", "pin_host_keys", "proxy_argv", "ssh_command",
    "state_dir", "write_api_key",
]
