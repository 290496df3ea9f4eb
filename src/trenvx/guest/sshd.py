"""Host side of ``ssh root@<sandbox-id>``: have a sandbox's agent start sshd and let the caller's key in.

:func:`prepare_sshd` sends the guest script :mod:`trenvx.guest.sshd_setup` (its source text, run by
the guest's own ``python3`` as root through the agent's process API), so it needs nothing of the
template but an OpenSSH server: no agent endpoint of its own, and templates built before it work.
The script answers with the sandbox's host key, which is checked here as untrusted input (one
OpenSSH public key, nothing else) before anyone pins it.

Only public keys go in (checked by :func:`~trenvx.guest.ssh_keys.parse_public_key`); nothing
here reads or sends a private key.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from .client import AgentClient, AgentError
from .ssh_keys import InvalidPublicKey, PublicKey, parse_public_key

SETUP_TIMEOUT_S = 60.0
"""How long the guest may take to make a host key and start sshd (TCG is slow, ssh-keygen is not)."""
MAX_ANSWER_BYTES = 64 * 1024
"""Largest answer read from the guest script (a real one is ~300 bytes)."""
NO_SSHD_CODE = "no_sshd"
OPENSSH_HINT = ("add the Debian package openssh-server to the template's Dockerfile (RUN apt-get install -y "
                "--no-install-recommends openssh-server) and rebuild it (template-manager -t NAME); "
                "configs/default-sandbox/Dockerfile has it")


class SshdUnavailable(Exception):
    """The sandbox has no OpenSSH server (its template lacks openssh-server)."""


class SshdFailed(Exception):
    """The guest could not start sshd or install the key; the message says what the guest reported."""


@dataclass(frozen=True)
class SshdReady:
    """sshd listens on the sandbox's port 22 and the keys are in the users' ``authorized_keys``."""

    host_keys: tuple[PublicKey, ...]
    started: bool
    """True when this call started sshd, False when it was running already."""
    users: tuple[str, ...]
    """The accounts the keys can log in as (those of the ones asked for that the image has)."""


@cache
def setup_script() -> str:
    """The guest script's source text (sent as ``python3 -c``)."""
    return (Path(__file__).with_name("sshd_setup.py")).read_text()


async def prepare_sshd(agent: AgentClient, sandbox_id: str, keys: Sequence[PublicKey], users: Sequence[str],
                       *, timeout: float = SETUP_TIMEOUT_S) -> SshdReady:
    """Start sshd in the sandbox of ``agent`` (if it is not running there) and add ``keys`` for ``users``.

    Raises :class:`SshdUnavailable` when the sandbox has no sshd, :class:`SshdFailed` when the guest
    reported a failure or answered nonsense, :class:`TimeoutError` after ``timeout`` seconds, and
    the agent client's errors (``AgentError``, ``httpx`` errors) when the agent cannot be reached.
    """
    request = {"keys": [k.line() for k in keys], "users": list(users)}
    try:
        result = await agent.run(["python3", "-I", "-c", setup_script(), sandbox_id], user="root",
                                 stdin=json.dumps(request).encode(), timeout=timeout)
    except AgentError as e:
        if "failed to start process" in e.message:
            raise SshdFailed("the sandbox has no python3 to set up sshd with (the guest agent could not start it)") from None
        raise
    return parse_answer(result.exit_code, result.stdout, result.stderr)


def parse_answer(exit_code: int, stdout: bytes, stderr: bytes = b"") -> SshdReady:
    """The guest script's answer, checked: every host key must be one OpenSSH public key."""
    if len(stdout) > MAX_ANSWER_BYTES:
        raise SshdFailed(f"the guest's sshd setup answered {len(stdout)} bytes (at most {MAX_ANSWER_BYTES} expected)")
    try:
        answer = json.loads(stdout.decode("utf-8", "replace").strip().splitlines()[-1]) if stdout.strip() else None
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise SshdFailed(f"the guest's sshd setup exited with {exit_code} without an answer: "
                         f"{stderr.decode('utf-8', 'replace').strip()[-800:] or 'no output'}")
    if exit_code != 0 or "error" in answer:
        message = str(answer.get("error") or f"exit code {exit_code}")[:2000]
        if answer.get("code") == NO_SSHD_CODE:
            raise SshdUnavailable(message)
        raise SshdFailed(message)
    raw_keys = answer.get("hostKeys")
    if not isinstance(raw_keys, list) or not raw_keys:
        raise SshdFailed("the guest's sshd setup named no host key")
    try:
        host_keys = tuple(parse_public_key(k) for k in raw_keys[:8])
    except InvalidPublicKey as e:
        raise SshdFailed(f"the sandbox's host key is not an OpenSSH public key: {e}") from None
    users = answer.get("users")
    return SshdReady(
        host_keys=host_keys, started=answer.get("sshd") == "started",
        users=tuple(str(u)[:64] for u in users[:16]) if isinstance(users, list) else (),
    )


__all__ = ["OPENSSH_HINT", "SshdFailed", "SshdReady", "SshdUnavailable", "parse_answer", "prepare_sshd", "setup_script"]
