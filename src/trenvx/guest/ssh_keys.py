"""OpenSSH public keys as one-line text: parsed strictly, written back in a canonical form.

Keys cross two trust boundaries in ``ssh root@<sandbox-id>`` (see :mod:`trenvx.guest.sshd`):

- the caller's public key goes into a sandbox's ``authorized_keys``: it must be a public key and
  nothing else (no ``authorized_keys`` options such as ``command=``, no second line, never a
  private key, which :func:`parse_public_key` names as such);
- the sandbox's host key comes back from the guest, which is untrusted, and is written into the
  caller's ``known_hosts``: a line break or a pattern smuggled in there could make the caller's
  ssh trust a key for other hosts, so only ``TYPE BASE64`` whose blob names the same type is
  accepted, and :meth:`PublicKey.known_hosts_line` writes the sandbox id, the type and the blob,
  never the guest's comment.

Standard library only, and no I/O: used by the server, the CLI and its ssh ProxyCommand.
"""

from __future__ import annotations

import base64
import binascii
import re
import struct
from dataclasses import dataclass

KEY_TYPES = frozenset({
    "ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com",
})
"""Key types OpenSSH 8+ accepts for users and hosts (DSA is gone from OpenSSH 9.8)."""
MAX_KEY_CHARS = 16 * 1024
"""Longest key line accepted (an RSA-16384 key is ~2.8 KB of base64)."""
MAX_COMMENT_CHARS = 256
_B64 = re.compile(r"^[A-Za-z0-9+/]+={0,2}$")
_COMMENT_OK = re.compile(r"^[\x20-\x7e]*$")
_B64_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


class InvalidPublicKey(ValueError):
    """Text that is not one OpenSSH public key; the message says what is wrong with it."""


@dataclass(frozen=True)
class PublicKey:
    """One OpenSSH public key: ``type`` (``ssh-ed25519``...), ``blob`` (its base64 text), ``comment``."""

    type: str
    blob: str
    comment: str = ""

    def line(self) -> str:
        """``TYPE BLOB [COMMENT]``, as in a ``.pub`` file or ``authorized_keys``."""
        return f"{self.type} {self.blob}" + (f" {self.comment}" if self.comment else "")

    def known_hosts_line(self, host: str) -> str:
        """The ``known_hosts`` line that pins this key for ``host`` (a name checked by the caller)."""
        if not host or any(c in host for c in " \t\r\n,*?!|[]#@"):
            raise ValueError(f"{host!r} cannot be a known_hosts host name")
        return f"{host} {self.type} {self.blob}"

    @property
    def same_key(self) -> tuple[str, str]:
        """What identifies the key (the comment does not)."""
        return self.type, self.blob


def _literal(text: str) -> str:
    """``text`` as a regular expression that ECMAScript (JSON Schema) and Python read alike (no ``\\-``)."""
    return re.sub(r"([.+*?()\[\]{}|^$\\])", r"\\\1", text)


def _blob_pattern(key_type: str) -> str:
    """A regular expression for the base64 blobs of ``key_type`` keys: canonical base64 whose decoded
    bytes start with the key's type field (a 4-byte length and the type's name), as the parser wants."""
    header = struct.pack(">I", len(key_type)) + key_type.encode()
    whole = len(header) // 3 * 3
    fixed = _literal(base64.b64encode(header[:whole]).decode())
    rest = header[whole:]
    any4 = "[A-Za-z0-9+/]"
    if len(rest) == 1:  # the 2nd character carries this byte's low 2 bits and 4 bits of the next
        b = rest[0]
        second = "".join(_B64_CHARS[((b & 3) << 4) | x] for x in range(16))
        fixed += _literal(_B64_CHARS[b >> 2]) + f"[{second}]{any4}{{2}}"
    elif len(rest) == 2:  # the 3rd carries the 2nd byte's low 4 bits and 2 bits of the next
        b1, b2 = rest
        third = "".join(_B64_CHARS[((b2 & 15) << 2) | x] for x in range(4))
        fixed += _literal(_B64_CHARS[b1 >> 2] + _B64_CHARS[((b1 & 3) << 4) | (b2 >> 4)]) + f"[{third}]{any4}"
    return f"{fixed}(?:{any4}{{4}})*(?:{any4}{{2}}==|{any4}{{3}}=)?"


PUBLIC_KEY_PATTERN = (
    "^(?:" + "|".join(f"{_literal(t)} {_blob_pattern(t)}" for t in sorted(KEY_TYPES)) + ")(?: [^\\r\\n\\x00]*)?$"
)
"""Every line this pattern matches is a public key :func:`parse_public_key` accepts (the API documents
it; the parser also takes surrounding whitespace and says what is wrong with what it refuses)."""


def parse_public_key(text: str) -> PublicKey:
    """The public key of one line of text (a ``.pub`` file's contents); :class:`InvalidPublicKey` otherwise."""
    if not isinstance(text, str):
        raise InvalidPublicKey("expected the text of an OpenSSH public key")
    if "PRIVATE KEY" in text:
        raise InvalidPublicKey("this is a private key: give the public key (the .pub file next to it); "
                               "a private key never leaves this machine")
    line = text.strip()
    if not line:
        raise InvalidPublicKey("empty: expected an OpenSSH public key such as 'ssh-ed25519 AAAA... comment'")
    if len(line) > MAX_KEY_CHARS:
        raise InvalidPublicKey(f"longer than {MAX_KEY_CHARS} characters: not one OpenSSH public key")
    if any(c in line for c in "\r\n\0"):
        raise InvalidPublicKey("more than one line: give exactly one public key")
    parts = line.split(None, 2)
    if parts[0] not in KEY_TYPES:
        raise InvalidPublicKey(f"{parts[0][:40]!r} is not an OpenSSH public key type (expected one of "
                               f"{', '.join(sorted(KEY_TYPES))}; authorized_keys options are not accepted)")
    if len(parts) < 2:
        raise InvalidPublicKey(f"{parts[0]} key without its base64 part")
    key_type, blob = parts[0], parts[1]
    comment = parts[2].strip() if len(parts) > 2 else ""
    if not _B64.match(blob):
        raise InvalidPublicKey(f"the {key_type} key's second field is not base64")
    try:
        raw = base64.b64decode(blob, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidPublicKey(f"the {key_type} key's base64 part does not decode") from None
    if len(raw) < 4:
        raise InvalidPublicKey(f"the {key_type} key's blob is too short")
    (n,) = struct.unpack(">I", raw[:4])
    if raw[4:4 + n] != key_type.encode():
        raise InvalidPublicKey(f"the key's blob is not a {key_type} key (its type field does not match)")
    if not _COMMENT_OK.match(comment):
        comment = ""  # a comment is only a label: one with control or non-ASCII characters is dropped
    return PublicKey(key_type, blob, comment[:MAX_COMMENT_CHARS])


__all__ = ["InvalidPublicKey", "KEY_TYPES", "PUBLIC_KEY_PATTERN", "PublicKey", "parse_public_key"]
