"""Signed ``/files`` URLs, as E2B's SDKs make them (``download_url`` / ``upload_url``).

A signed URL carries ``signature=v1_<sig>`` (and optionally ``signature_expiration=<unix
seconds>``) in place of the ``X-Access-Token`` header. ``<sig>`` is the standard base64,
without padding, of ``sha256("<path>:<operation>:<username>:<access token>[:<expiration>]")``,
where ``path`` and ``username`` are the query parameters exactly as sent (``username`` empty
when absent: the default user) and ``operation`` is ``read`` for downloads and ``write`` for
uploads. The key is the sandbox's envd access token, so a signature grants one operation on
one path as one user, until its expiration if it has one, for as long as the token lives.

The host side (the server routing a signed URL that names no sandbox) uses the same
functions, so this module must stay standard-library only and import nothing else.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time

SIGNATURE_PREFIX = "v1_"
READ = "read"
WRITE = "write"

_EXPIRATION_RE = re.compile(r"-?[0-9]{1,19}")


class SignatureError(Exception):
    """Why a signed URL is refused; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 401) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def operation_of(method: str) -> str | None:
    """The signed operation an HTTP method of ``/files`` performs, None for other methods."""
    if method in ("GET", "HEAD"):
        return READ
    if method in ("POST", "PUT"):
        return WRITE
    return None


def parse_expiration(raw: str | None) -> int | None:
    """``signature_expiration`` as an integer; :class:`SignatureError` (400) when malformed."""
    if raw is None:
        return None
    if not _EXPIRATION_RE.fullmatch(raw.strip()):
        raise SignatureError(
            f"query parameter 'signature_expiration' must be a Unix time in whole seconds, got {raw[:40]!r}",
            status=400,
        )
    return int(raw)


def sign(path: str, operation: str, username: str, token: bytes, expiration: int | None = None) -> str:
    """The ``v1_`` signature of one operation on ``path`` as ``username`` with key ``token``."""
    parts = [path.encode("utf-8", "surrogateescape"), operation.encode(), username.encode("utf-8", "surrogateescape"),
             token]
    if expiration is not None:
        parts.append(str(expiration).encode())
    digest = hashlib.sha256(b":".join(parts)).digest()
    return SIGNATURE_PREFIX + base64.b64encode(digest).rstrip(b"=").decode("ascii")


def matches(signature: str, path: str, operation: str, username: str, token: bytes,
            expiration: int | None) -> bool:
    """Whether ``signature`` is the signature of exactly this request (constant-time)."""
    expected = sign(path, operation, username, token, expiration)
    return hmac.compare_digest(expected.encode(), signature.encode("utf-8", "surrogateescape"))


def verify(signature: str | None, raw_expiration: str | None, *, path: str, operation: str,
           username: str, token: bytes, now: float | None = None) -> None:
    """Accept a signed request or raise :class:`SignatureError` saying why it is refused."""
    if not signature:
        raise SignatureError(
            "unauthorized: send the sandbox's access token in the X-Access-Token header, or use a signed URL "
            "(query parameters 'signature' and optionally 'signature_expiration', as sandbox.download_url() "
            "and upload_url() of E2B's SDK make them)"
        )
    expiration = parse_expiration(raw_expiration)
    if not signature.startswith(SIGNATURE_PREFIX):
        raise SignatureError(f"invalid signature: unknown scheme (expected a '{SIGNATURE_PREFIX}' signature)")
    if not matches(signature, path, operation, username, token, expiration):
        other = WRITE if operation == READ else READ
        if matches(signature, path, other, username, token, expiration):
            kind = "an upload" if other == WRITE else "a download"
            raise SignatureError(f"invalid signature: it was made for {kind}, not for this request")
        who = f"user '{username}'" if username else "the default user"
        raise SignatureError(
            f"invalid signature: it does not sign a {operation} of path '{path}' as {who}"
            + (f" expiring at {expiration}" if expiration is not None else " without expiration")
            + " with this sandbox's access token"
        )
    if expiration is not None and expiration < int(time.time() if now is None else now):
        raise SignatureError(f"signature is already expired (signature_expiration {expiration} has passed)")


__all__ = ["READ", "WRITE", "SignatureError", "matches", "operation_of", "parse_expiration", "sign", "verify"]
