"""Keys across the trust boundaries of ``ssh root@<sandbox-id>`` (trenvx.guest.ssh_keys, trenvx.guest.sshd),
and the guest's sshd setup script's own logic (trenvx.guest.sshd_setup) on the host's files.

- a public key is parsed strictly: a private key, authorized_keys options, a second line or a blob of
  another type are refused with a message that says what is wrong;
- the host key a sandbox reports is untrusted: an answer that would write more than one key line into
  the caller's known_hosts (a pattern, a line break) is refused;
- the guest script makes a host key per sandbox id (a copy of a sandbox makes its own), adds keys to
  authorized_keys once, and says "no_sshd" where there is no OpenSSH server.
"""

from __future__ import annotations

import base64
import json
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest

from trenvx.guest import sshd_setup
from trenvx.guest.ssh_keys import InvalidPublicKey, PublicKey, parse_public_key
from trenvx.guest.sshd import SshdFailed, SshdUnavailable, parse_answer, setup_script

needs_keygen = pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen (openssh-client) is not installed")


def fake_key(key_type: str = "ssh-ed25519", body: bytes = b"\x00" * 32, comment: str = "me@host") -> str:
    name = key_type.encode()
    blob = struct.pack(">I", len(name)) + name + struct.pack(">I", len(body)) + body
    return f"{key_type} {base64.b64encode(blob).decode()} {comment}".strip()


def test_a_public_key_line_is_parsed() -> None:
    k = parse_public_key(fake_key() + "\n")
    assert (k.type, k.comment) == ("ssh-ed25519", "me@host")
    assert k.line() == fake_key()
    assert parse_public_key(fake_key(comment="")).line() == fake_key(comment="")


@needs_keygen
def test_keys_made_by_ssh_keygen_are_accepted_and_their_private_halves_refused(tmp_path: Path) -> None:
    for key_type in ("ed25519", "ecdsa", "rsa"):
        path = tmp_path / f"id_{key_type}"
        subprocess.run(["ssh-keygen", "-q", "-t", key_type, "-N", "", "-C", "t@h", "-f", str(path)], check=True,
                       timeout=60)
        assert parse_public_key(path.with_name(path.name + ".pub").read_text()).comment == "t@h"
        with pytest.raises(InvalidPublicKey, match="private key.*never leaves"):
            parse_public_key(path.read_text())


@pytest.mark.parametrize(("text", "why"), [
    ("", "empty"),
    ('command="/bin/sh" ' + fake_key(), "not an OpenSSH public key type"),
    ("ssh-dss AAAAB3NzaC1kc3MAAACBAP", "not an OpenSSH public key type"),
    ("ssh-ed25519", "without its base64"),
    ("ssh-ed25519 not*base64", "not base64"),
    ("ssh-ed25519 QUJD=", "does not decode|too short|does not match"),
    (fake_key("ssh-rsa").replace("ssh-rsa", "ssh-ed25519", 1), "type field does not match"),
    (fake_key() + "\n" + fake_key(), "more than one line"),
    (fake_key() + "\r* " + fake_key(), "more than one line"),
    ("ssh-ed25519 " + "A" * 20000, "longer than"),
])
def test_what_is_not_one_public_key_is_refused_with_the_reason(text: str, why: str) -> None:
    with pytest.raises(InvalidPublicKey, match=why):
        parse_public_key(text)


def test_a_comment_with_control_characters_is_dropped_not_kept() -> None:
    assert parse_public_key(fake_key(comment="a\x1b[31mred")).comment == ""


def test_known_hosts_lines_name_one_host_and_never_a_pattern() -> None:
    k = parse_public_key(fake_key())
    assert k.known_hosts_line("abcdefghij0123456789") == f"abcdefghij0123456789 {k.type} {k.blob}"
    for bad in ("*", "a,b", "!x", "a b", "a\nb", "", "@cert-authority"):
        with pytest.raises(ValueError):
            k.known_hosts_line(bad)


# -- the guest's answer ---------------------------------------------------------------------------


def answer(**fields: object) -> bytes:
    return json.dumps({"hostKeys": [fake_key(comment="root@sbx")], "sshd": "started", "users": ["root", "user"],
                       **fields}).encode()


def test_the_guests_answer_gives_the_host_keys_without_their_comments() -> None:
    ready = parse_answer(0, answer())
    assert ready.started and ready.users == ("root", "user")
    assert [(k.type, k.blob) for k in ready.host_keys] == [parse_public_key(fake_key()).same_key]
    assert not parse_answer(0, answer(sshd="running")).started


@pytest.mark.parametrize("host_keys", [
    [fake_key() + "\n* " + fake_key()],                # a second known_hosts line smuggled in
    ["@cert-authority * " + fake_key()],               # a CA for every host
    ["ssh-ed25519 AAAA"],                              # not a key
    [],
    "ssh-ed25519 AAAA",
])
def test_a_hostile_guests_host_key_is_refused(host_keys: object) -> None:
    with pytest.raises(SshdFailed):
        parse_answer(0, json.dumps({"hostKeys": host_keys, "sshd": "started"}).encode())


def test_guest_failures_are_told_apart() -> None:
    with pytest.raises(SshdUnavailable, match="no OpenSSH server"):
        parse_answer(2, b'{"error": "no OpenSSH server in this sandbox", "code": "no_sshd"}')
    with pytest.raises(SshdFailed, match="sshd did not start"):
        parse_answer(2, b'{"error": "sshd did not start (exit 255)", "code": "failed"}')
    with pytest.raises(SshdFailed, match="without an answer: Traceback"):
        parse_answer(1, b"", b"Traceback (most recent call last): ...")
    with pytest.raises(SshdFailed, match="at most"):
        parse_answer(0, b"x" * (1 << 20))


# -- the guest script's own logic -----------------------------------------------------------------


def test_the_script_sent_to_the_guest_is_standalone() -> None:
    text = setup_script()
    compile(text, "sshd_setup.py", "exec")
    assert "import trenvx" not in text and "from trenvx" not in text


def test_keys_are_added_once_and_other_lines_kept() -> None:
    a, b = fake_key(body=b"\x01" * 32), fake_key(body=b"\x02" * 32, comment="other")
    existing = f'# mine\nfrom="10.0.0.0/8" {a} old-comment\n'
    assert sshd_setup.merge_keys(existing, [a]) is None
    merged = sshd_setup.merge_keys(existing.rstrip("\n"), [a, b])
    assert merged == existing + b + "\n"
    assert sshd_setup.merge_keys("", [b]) == b + "\n"


def test_keys_land_in_authorized_keys_private_and_once(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    sshd_setup.install_keys_here(str(home), [fake_key()])
    sshd_setup.install_keys_here(str(home), [fake_key()])
    auth = home / ".ssh" / "authorized_keys"
    assert auth.read_text() == fake_key() + "\n"
    assert (auth.stat().st_mode & 0o777, (home / ".ssh").stat().st_mode & 0o777) == (0o600, 0o700)
    (home / ".ssh" / "authorized_keys").unlink()
    (home / ".ssh" / "authorized_keys").symlink_to(tmp_path / "elsewhere")
    sshd_setup.install_keys_here(str(home), [fake_key()])  # the link is replaced, its target never written
    assert not (tmp_path / "elsewhere").exists() and not auth.is_symlink()


@pytest.fixture
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "trenvx-ssh"
    d.mkdir()
    for name, value in (("STATE_DIR", d), ("HOST_KEY", d / "ssh_host_ed25519_key"), ("OWNER", d / "sandbox-id"),
                        ("PIDFILE", d / "sshd.pid"), ("CONFIG", d / "sshd_config"), ("LOG", d / "sshd.log"),
                        ("LOCK", d / "lock")):
        monkeypatch.setattr(sshd_setup, name, str(value))
    return d


@needs_keygen
def test_each_sandbox_id_gets_its_own_host_key(state_dir: Path) -> None:
    keygen = shutil.which("ssh-keygen")
    assert sshd_setup.ensure_host_key("aaaaaaaaaaaaaaaaaaaa", keygen) is True
    first = (state_dir / "ssh_host_ed25519_key.pub").read_text()
    assert parse_public_key(first).comment == "root@aaaaaaaaaaaaaaaaaaaa"
    assert (state_dir / "ssh_host_ed25519_key").stat().st_mode & 0o077 == 0
    assert sshd_setup.ensure_host_key("aaaaaaaaaaaaaaaaaaaa", keygen) is False  # the same sandbox: kept
    assert (state_dir / "ssh_host_ed25519_key.pub").read_text() == first
    # a fork or a sandbox from a snapshot of it: the files are inherited, the id is not
    assert sshd_setup.ensure_host_key("bbbbbbbbbbbbbbbbbbbb", keygen) is True
    second = (state_dir / "ssh_host_ed25519_key.pub").read_text()
    assert parse_public_key(second).same_key != parse_public_key(first).same_key


def test_our_sshd_is_found_by_its_pid_file_and_retitled_command_line(state_dir: Path) -> None:
    import os

    (state_dir / "sshd.pid").write_text(f"{os.getpid()}\n")  # a live process, but not sshd with our config
    assert sshd_setup.our_sshd_pid() is None
    (state_dir / "sshd.pid").write_text("not a pid\n")
    assert sshd_setup.our_sshd_pid() is None
    # sshd's listener rewrites its command line into one title that holds the config's path
    title = f"sshd: /usr/sbin/sshd -f {sshd_setup.CONFIG} -E {sshd_setup.LOG} [listener] 0 of 10-100 startups"
    proc = subprocess.Popen(["bash", "-c", f'exec -a "{title}" sleep 30'])
    try:
        (state_dir / "sshd.pid").write_text(f"{proc.pid}\n")
        deadline = time.monotonic() + 10
        while sshd_setup.our_sshd_pid() is None and time.monotonic() < deadline:
            time.sleep(0.01)  # until bash has exec'd sleep under that title
        assert sshd_setup.our_sshd_pid() == proc.pid
    finally:
        proc.kill()
        proc.wait()


def test_without_an_openssh_server_the_script_says_no_sshd(monkeypatch: pytest.MonkeyPatch, state_dir: Path) -> None:
    monkeypatch.setattr(sshd_setup, "SSHD_PATHS", ("/nonexistent/sshd",))
    monkeypatch.setattr(sshd_setup.os, "geteuid", lambda: 0)
    monkeypatch.setattr(sshd_setup.sys, "stdin", __import__("io").StringIO('{"keys": [], "users": ["root"]}'))
    with pytest.raises(sshd_setup.Failure) as e:
        sshd_setup.main(["-c", "aaaaaaaaaaaaaaaaaaaa"])
    assert e.value.code == "no_sshd" and "/nonexistent/sshd" in e.value.message


def test_public_key_dataclass_is_what_the_server_sends() -> None:
    k = PublicKey("ssh-ed25519", "QUJD", "c")
    assert k.line() == "ssh-ed25519 QUJD c" and k.same_key == ("ssh-ed25519", "QUJD")


def test_what_the_api_documents_as_a_public_key_is_one() -> None:
    """The OpenAPI document's pattern (trenvx.guest.ssh_keys.PUBLIC_KEY_PATTERN) promises that a match is
    accepted: every generated match parses, and keys made by ssh-keygen match."""
    import re

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from trenvx.guest.ssh_keys import PUBLIC_KEY_PATTERN

    pattern = re.compile(PUBLIC_KEY_PATTERN)
    assert pattern.match(fake_key()) and pattern.match(fake_key("ssh-rsa", b"\x01\x00\x01" * 20))
    assert not pattern.match('command="x" ' + fake_key()) and not pattern.match(fake_key() + "\nmore")

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.from_regex(PUBLIC_KEY_PATTERN, fullmatch=True))
    def parses(text: str) -> None:
        if "\n" in text.rstrip("\n") or "\r" in text:  # ($ before a final newline is Python's, not the API's)
            return
        parse_public_key(text)

    parses()
