"""Which sandbox a signed ``/files`` URL is for, when the URL itself does not say.

E2B's SDKs build ``download_url()`` / ``upload_url()`` on the sandbox's envd address. Pointed
at trenvx with ``E2B_SANDBOX_URL`` (the documented way), that address is the server itself
for every sandbox, so the URL is ``<server>/files?path=...&signature=v1_...`` with neither
the ``E2b-Sandbox-Id`` header (a browser or ``curl`` sends none) nor a ``PORT-ID.<domain>``
Host. The signature still names its sandbox: it is keyed with that sandbox's envd access
token (:mod:`trenvx.guest.agent.signing`), so the server finds the one running sandbox whose
token reproduces it and sends the request to that sandbox's agent, which checks the
signature again (and its expiration) before serving it. A signature that no sandbox's token
reproduces is refused here and reaches no sandbox.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from urllib.parse import parse_qs

from ..guest.agent import signing

FILES_PATH = "/files"


class SignedUrlRefused(Exception):
    """A signed ``/files`` request that cannot be routed; ``status`` and message for the answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def signed_files_target(method: str, path: str, query_string: bytes,
                        sandboxes: Callable[[], Iterable[tuple[str, str]]]) -> str | None:
    """The id of the sandbox (among the ``(id, envd access token)`` pairs ``sandboxes()`` gives,
    asked only for a signed ``/files`` request) that signed this request.

    None when the request is not a signed ``/files`` request (it then goes to the API);
    :class:`SignedUrlRefused` when it is one but no sandbox's token signed it.
    """
    if path != FILES_PATH:
        return None
    query = parse_qs(query_string.decode("latin-1"), keep_blank_values=True)
    signature = (query.get("signature") or [""])[0]
    operation = signing.operation_of(method)
    if not signature or operation is None:
        return None
    try:
        expiration = signing.parse_expiration((query.get("signature_expiration") or [None])[0])
    except signing.SignatureError as err:
        raise SignedUrlRefused(err.status, err.message) from None
    file_path = (query.get("path") or [""])[0]
    username = (query.get("username") or [""])[0]
    for sandbox_id, token in sandboxes():
        if token and signing.matches(signature, file_path, operation, username, token.encode(), expiration):
            return sandbox_id
    raise SignedUrlRefused(
        401,
        f"invalid signature: no running sandbox signed a {operation} of path '{file_path}'"
        + (f" as user '{username}'" if username else "")
        + " (the signature is wrong, was made for another path, user or operation, or its sandbox has ended)",
    )


__all__ = ["FILES_PATH", "SignedUrlRefused", "signed_files_target"]
