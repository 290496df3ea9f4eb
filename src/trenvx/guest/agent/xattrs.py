"""User-defined file metadata, kept as ``user.e2b.<key>`` extended attributes like envd.

E2B's SDKs send it on upload as ``X-Metadata-<key>: <value>`` headers (keys are lowercased
here) and read it back in every ``EntryInfo`` (``metadata``) and in the upload's answer.
An upload replaces a file's whole set: keys it does not name are removed, so overwriting a
file never keeps stale metadata (``O_TRUNC`` keeps xattrs). Other ``user.*`` attributes
are left alone. Values set inside the sandbox (``setfattr``) show too, unless they are not
UTF-8 (they could not travel in a protobuf string map).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable, Mapping

PREFIX = "user.e2b."
HEADER_PREFIX = "x-metadata-"
#: The kernel limits an xattr name to 255 bytes, the prefix included.
MAX_KEY_LEN = 255 - len(PREFIX)
#: ext4 keeps all of an inode's xattrs in one 4 KiB block: refuse a set that cannot fit.
MAX_TOTAL_LEN = 4096

_UNSUPPORTED = (errno.ENOTSUP, errno.EOPNOTSUPP)


class MetadataError(ValueError):
    """Metadata that cannot be stored (the message names the key and the rule)."""


def from_headers(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    """``X-Metadata-*`` request headers as metadata; the first of repeated headers wins."""
    out: dict[str, str] = {}
    for name, value in headers:
        lowered = name.lower()
        if not lowered.startswith(HEADER_PREFIX):
            continue
        key = lowered[len(HEADER_PREFIX):]
        if key and key not in out:
            out[key] = value
    return out


def _check_printable(label: str, text: str) -> None:
    for i, ch in enumerate(text):
        if not " " <= ch <= "~":
            raise MetadataError(
                f"metadata {label} holds a character that is not printable ASCII ({ch!r} at offset {i})"
            )


def validate(metadata: Mapping[str, str]) -> None:
    """Raise :class:`MetadataError` unless ``metadata`` can be stored as xattrs."""
    total = 0
    for key, value in metadata.items():
        if not key:
            raise MetadataError("metadata key must not be empty")
        if len(key) > MAX_KEY_LEN:
            raise MetadataError(f"metadata key {key[:40]!r}... is longer than {MAX_KEY_LEN} bytes")
        _check_printable("key", key)
        _check_printable(f"value of key {key!r}", value)
        total += len(PREFIX) + len(key) + len(value)
    if total > MAX_TOTAL_LEN:
        raise MetadataError(f"metadata takes {total} bytes, more than the {MAX_TOTAL_LEN} a file can hold")


def is_unsupported(exc: OSError) -> bool:
    """Whether ``exc`` says the filesystem keeps no user xattrs (/proc, /sys, old tmpfs)."""
    return exc.errno in _UNSUPPORTED


def replace(fd: int, metadata: Mapping[str, str]) -> None:
    """Make ``metadata`` the file's whole ``user.e2b.*`` set (through an open descriptor)."""
    validate(metadata)
    for name in os.listxattr(fd):
        if name.startswith(PREFIX) and name[len(PREFIX):] not in metadata:
            try:
                os.removexattr(fd, name)
            except OSError as exc:
                if exc.errno != errno.ENODATA:
                    raise
    for key, value in metadata.items():
        os.setxattr(fd, PREFIX + key, value.encode("ascii"))


def read(path: str) -> dict[str, str] | None:
    """The ``user.e2b.*`` metadata of ``path`` (following a final symlink), None when there is none."""
    try:
        names = os.listxattr(path)
    except OSError:
        return None
    out: dict[str, str] = {}
    for name in names:
        if not name.startswith(PREFIX):
            continue
        try:
            name.encode("utf-8")  # a name that is not UTF-8 carries surrogate escapes
            out[name[len(PREFIX):]] = os.getxattr(path, name).decode("utf-8")
        except (OSError, UnicodeError):
            continue
    return out or None


__all__ = ["MAX_KEY_LEN", "MAX_TOTAL_LEN", "PREFIX", "MetadataError", "from_headers", "is_unsupported",
           "read", "replace", "validate"]
