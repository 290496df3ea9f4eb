"""``GET /files`` (download) and ``POST /files`` (upload), like envd's HTTP API.

Download streams the file with ``sendfile(2)`` under a ``Content-Length``. Upload takes
``multipart/form-data`` (what E2B's SDK sends: parts named ``file``, the destination in
``?path=`` or, for several files, in each part's filename) or a raw
``application/octet-stream`` body (optionally ``Content-Encoding: gzip``), streams it to
disk creating parent directories, stores the request's
``X-Metadata-<key>`` headers as the file's ``user.e2b.<key>`` xattrs (:mod:`.xattrs`), and
answers with the JSON list of written entries ``[{"name", "type": "file", "path",
"metadata"?}]``.

Access: the ``X-Access-Token`` header, or a signed URL (``signature`` and
``signature_expiration`` query parameters, :mod:`.signing`) for exactly this operation,
path and user. A request that sends the header is judged by the header alone, like envd.

Both run with the user's filesystem identity (:func:`.users.acting_as`): the guest kernel
refuses what the user may not read or write (``403``, "permission denied"), and what an
upload creates (the file, missing parent directories) is the user's.

Errors are JSON ``{"code": <http status>, "message": ...}`` as in envd's OpenAPI spec.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import zlib
from collections.abc import Callable
from typing import Any

from . import signing, xattrs
from .connect import ConnectError
from .httpio import Exchange
from .multipart import MultipartError, MultipartReader, parse_options
from .state import AgentState
from .users import User, acting_as, ensure_dirs, lookup_user, resolve_path

log = logging.getLogger("trenvx_agent.files")

WRITE_CHUNK = 1 << 20


class HttpError(Exception):
    """An error answered as ``{"code": status, "message": ...}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _from_connect(err: ConnectError) -> HttpError:
    return HttpError(err.http_status, err.message)


class FilesApi:
    """The ``/files`` endpoints."""

    def __init__(self, state: AgentState) -> None:
        self.state = state

    def _user(self, ex: Exchange) -> User:
        name = ex.query_param("username") or self.state.default_user
        try:
            return lookup_user(name)
        except ConnectError as err:
            raise _from_connect(err) from None

    def _resolve(self, raw: str, user: User) -> str:
        try:
            return resolve_path(raw, user, self.state.default_workdir)
        except ConnectError as err:
            raise _from_connect(err) from None

    def authorize(self, ex: Exchange) -> None:
        """Let the request through with the access token or a valid signature, else :class:`HttpError`."""
        token = self.state.token_bytes()
        if token is None:
            return  # before /init set a token, like every other endpoint
        presented = ex.header("X-Access-Token")
        if presented:
            if not self.state.token_matches(presented):
                raise HttpError(401, "the access token in the X-Access-Token header does not match this sandbox's")
            return
        operation = signing.operation_of(ex.method)
        if operation is None:
            raise HttpError(401, f"missing or invalid access token (X-Access-Token header) for {ex.method} /files")
        try:
            signing.verify(
                ex.query_param("signature"), ex.query_param("signature_expiration"),
                path=ex.query_param("path") or "", operation=operation,
                username=ex.query_param("username") or "", token=token,
            )
        except signing.SignatureError as err:
            raise HttpError(err.status, err.message) from None

    def handle(self, ex: Exchange) -> None:
        try:
            self.authorize(ex)
            if ex.method not in ("GET", "HEAD", "POST", "PUT"):
                raise HttpError(405, f"method {ex.method} not allowed on /files")
            user = self._user(ex)
            try:
                with acting_as(user):
                    if ex.method in ("GET", "HEAD"):
                        self.download(ex, user)
                    else:
                        self.upload(ex, user)
            except ConnectError as err:
                raise _from_connect(err) from None
        except HttpError as err:
            if not ex.body.finished and not ex.body.drain():
                ex.close_after()
            if ex.headers_sent:
                ex.close_after()
                return
            ex.respond_json(err.status, {"code": err.status, "message": err.message})

    # ------------------------------------------------------------------ download
    def download(self, ex: Exchange, user: User) -> None:
        raw = ex.query_param("path")
        if not raw:
            raise HttpError(400, "query parameter 'path' is required")
        path = self._resolve(raw, user)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise HttpError(404, f"path '{path}' does not exist") from None
        except PermissionError:
            raise HttpError(403, f"permission denied: {path}") from None
        except OSError as exc:
            raise HttpError(400, f"cannot open '{path}': {exc.strerror}") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise HttpError(400, f"path '{path}' is {kind}")
        with os.fdopen(fd, "rb") as file:
            name = os.path.basename(path).replace('"', "")
            headers = {"Content-Disposition": f'attachment; filename="{name}"'}
            ex.start_stream(200, "application/octet-stream", length=st.st_size, headers=headers)
            if ex.method == "HEAD" or st.st_size == 0:
                return
            try:
                ex.sendfile(file, st.st_size)
            except OSError as exc:
                log.info("download of %s interrupted: %s", path, exc)
                ex.close_after()

    # ------------------------------------------------------------------ upload
    def upload(self, ex: Exchange, user: User) -> None:
        metadata = xattrs.from_headers(ex.headers.items())
        try:
            xattrs.validate(metadata)
        except xattrs.MetadataError as err:
            raise HttpError(400, f"invalid metadata (X-Metadata-* headers): {err}") from None
        content_type = ex.header("Content-Type") or ""
        media, params = parse_options(content_type)
        if media == "application/octet-stream":
            entries = [self._upload_raw(ex, user, metadata)]
        elif media.startswith("multipart/"):
            entries = self._upload_multipart(ex, user, params.get("boundary", ""), metadata)
        else:
            raise HttpError(
                400,
                f"unsupported content type '{content_type}', "
                "expected multipart/form-data or application/octet-stream",
            )
        ex.respond_json(200, entries)

    def _body_reader(self, ex: Exchange) -> Callable[[int], bytes]:
        encoding = (ex.header("Content-Encoding") or "identity").strip().lower()
        if encoding in ("", "identity"):
            return ex.body.read
        if encoding != "gzip":
            raise HttpError(400, f"unsupported Content-Encoding '{encoding}'")
        inflater = zlib.decompressobj(wbits=47)

        def read(n: int) -> bytes:
            while True:
                if inflater.unconsumed_tail:
                    return inflater.decompress(inflater.unconsumed_tail, n)
                data = ex.body.read(n)
                if not data:
                    return inflater.flush()
                try:
                    out = inflater.decompress(data, n)
                except zlib.error as exc:
                    raise HttpError(400, f"invalid gzip body: {exc}") from None
                if out:
                    return out

        return read

    def _upload_raw(self, ex: Exchange, user: User, metadata: dict[str, str]) -> dict[str, Any]:
        raw = ex.query_param("path")
        if not raw:
            raise HttpError(400, "query parameter 'path' is required for an application/octet-stream upload")
        path = self._resolve(raw, user)
        self._write(path, self._body_reader(ex), user, ex, metadata)
        return _written(path)

    def _upload_multipart(self, ex: Exchange, user: User, boundary: str,
                          metadata: dict[str, str]) -> list[dict[str, Any]]:
        query_path = ex.query_param("path")
        entries: list[dict[str, Any]] = []
        seen: set[str] = set()
        try:
            reader = MultipartReader(self._body_reader(ex), boundary)
            while True:
                part = reader.next_part()
                if part is None:
                    break
                if part.name != "file":
                    part.drain()
                    continue
                raw = query_path if query_path else part.filename
                if not raw:
                    raise HttpError(400, "no destination: give ?path= or a filename on the part")
                path = self._resolve(raw, user)
                if path in seen:
                    raise HttpError(400, f"cannot upload several files to the same path '{path}' in one request")
                seen.add(path)
                self._write(path, part.read, user, ex, metadata)
                entries.append(_written(path))
        except MultipartError as exc:
            raise HttpError(400, f"invalid multipart body: {exc}") from None
        if not entries:
            raise HttpError(400, "the multipart body holds no part named 'file'")
        return entries

    def _write(self, path: str, read: Callable[[int], bytes], user: User, ex: Exchange,
               metadata: dict[str, str]) -> None:
        try:
            ensure_dirs(os.path.dirname(path))
        except ConnectError as err:
            raise _from_connect(err) from None
        if os.path.isdir(path):
            raise HttpError(400, f"path is a directory: {path}")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise self._write_error(exc, path) from None
        try:
            while True:
                data = read(WRITE_CHUNK)
                if not data:
                    break
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            self._store_metadata(fd, path, metadata)
        except OSError as exc:
            if isinstance(exc, (ConnectionError, TimeoutError)):
                ex.close_after()
            raise self._write_error(exc, path) from None
        finally:
            os.close(fd)

    @staticmethod
    def _store_metadata(fd: int, path: str, metadata: dict[str, str]) -> None:
        """The upload's metadata becomes the file's whole set (none given: stale keys go)."""
        try:
            xattrs.replace(fd, metadata)
        except OSError as exc:
            if not metadata:
                log.debug("clearing metadata of %s: %s", path, exc)
            elif xattrs.is_unsupported(exc) or exc.errno == errno.EPERM:
                # /proc, /sys, special files: the body is written; the answer reads the
                # xattrs back, so it does not claim metadata that was not kept.
                log.warning("metadata of %s not kept: %s", path, exc.strerror or exc)
            else:
                raise

    @staticmethod
    def _write_error(exc: OSError, path: str) -> HttpError:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return HttpError(507, f"not enough disk space to write {path}")
        if isinstance(exc, PermissionError):
            return HttpError(403, f"permission denied: {path}")
        return HttpError(500, f"error writing {path}: {exc.strerror or exc}")


def _written(path: str) -> dict[str, Any]:
    """An entry of the upload's answer, with the metadata the file now holds."""
    entry: dict[str, Any] = {"name": os.path.basename(path), "type": "file", "path": path}
    metadata = xattrs.read(path)
    if metadata:
        entry["metadata"] = metadata
    return entry
