"""A streaming ``multipart/form-data`` reader: parts are read piece by piece, never whole.

Used by ``POST /files``, where E2B's SDK sends each file as a part named ``file`` whose
``filename`` is the destination path (httpx escapes ``"`` as ``%22`` and newlines as
``%0A``/``%0D`` in it).
"""

from __future__ import annotations

from collections.abc import Callable

READ_SIZE = 256 << 10
MAX_HEADER_BYTES = 16 << 10


class MultipartError(Exception):
    """The body is not valid multipart data."""


def parse_options(value: str) -> tuple[str, dict[str, str]]:
    """``form-data; name="file"; filename="a b"`` -> (``form-data``, {name, filename})."""
    parts = _split_params(value)
    main = parts[0].strip().lower() if parts else ""
    params: dict[str, str] = {}
    for item in parts[1:]:
        key, sep, val = item.strip().partition("=")
        if not sep:
            continue
        val = val.strip()
        if len(val) >= 2 and val[0] == val[-1] == '"':
            val = val[1:-1].replace('\\"', '"').replace("\\\\", "\\")
        params[key.strip().lower()] = val
    return main, params


def _split_params(value: str) -> list[str]:
    out: list[str] = []
    current: list[str] = []
    quoted = False
    escaped = False
    for ch in value:
        if escaped:
            current.append(ch)
            escaped = False
            continue
        if ch == "\\" and quoted:
            current.append(ch)
            escaped = True
            continue
        if ch == '"':
            quoted = not quoted
        if ch == ";" and not quoted:
            out.append("".join(current))
            current = []
            continue
        current.append(ch)
    out.append("".join(current))
    return out


def unescape_filename(name: str) -> str:
    """Undo the HTML5-style escaping that httpx and browsers apply to filenames."""
    return name.replace("%22", '"').replace("%0A", "\n").replace("%0D", "\r")


class Part:
    """One part of the body: its headers and a reader for its content."""

    def __init__(self, reader: MultipartReader, headers: dict[str, str]) -> None:
        self._reader = reader
        self.headers = headers
        _, params = parse_options(headers.get("content-disposition", ""))
        self.name: str | None = params.get("name")
        filename = params.get("filename")
        self.filename: str | None = unescape_filename(filename) if filename is not None else None
        self.done = False

    def read(self, n: int = READ_SIZE) -> bytes:
        """Up to ``n`` bytes of content; ``b""`` at the end of the part."""
        if self.done:
            return b""
        data = self._reader._read_part(n)
        if not data:
            self.done = True
        return data

    def drain(self) -> None:
        while self.read():
            pass


class MultipartReader:
    """Reads parts of a multipart body from a ``read(n) -> bytes`` source."""

    def __init__(self, read: Callable[[int], bytes], boundary: str) -> None:
        if not boundary or len(boundary) > 200:
            raise MultipartError("missing or invalid multipart boundary")
        self._read = read
        self._dash_boundary = b"--" + boundary.encode("latin-1")
        self._delimiter = b"\r\n" + self._dash_boundary
        self._buf = bytearray()
        self._eof = False
        self._started = False
        self._finished = False
        self._in_part = False
        self._current: Part | None = None

    def _fill(self) -> bool:
        if self._eof:
            return False
        data = self._read(READ_SIZE)
        if not data:
            self._eof = True
            return False
        self._buf += data
        return True

    def _skip_preamble(self) -> None:
        # The first boundary may come without the leading CRLF.
        while True:
            if self._buf.startswith(self._dash_boundary):
                del self._buf[: len(self._dash_boundary)]
                return
            idx = self._buf.find(self._delimiter)
            if idx >= 0:
                del self._buf[: idx + len(self._delimiter)]
                return
            keep = len(self._delimiter)
            if len(self._buf) > keep:
                del self._buf[: len(self._buf) - keep]
            if not self._fill():
                raise MultipartError("multipart body has no boundary")

    def _after_boundary(self) -> bool:
        """Consume what follows a boundary; True if another part follows."""
        while len(self._buf) < 2:
            if not self._fill():
                raise MultipartError("multipart body ends after a boundary")
        if self._buf[:2] == b"--":
            self._finished = True
            return False
        # Transport padding (spaces/tabs) then CRLF.
        while True:
            idx = self._buf.find(b"\n")
            if idx >= 0:
                del self._buf[: idx + 1]
                return True
            if len(self._buf) > 1024 or not self._fill():
                raise MultipartError("malformed boundary line")

    def _read_headers(self) -> dict[str, str]:
        while True:
            if self._buf.startswith(b"\r\n"):
                del self._buf[:2]
                return {}
            idx = self._buf.find(b"\r\n\r\n")
            if idx >= 0:
                raw = bytes(self._buf[:idx])
                del self._buf[: idx + 4]
                break
            if len(self._buf) > MAX_HEADER_BYTES:
                raise MultipartError("multipart part headers too large")
            if not self._fill():
                raise MultipartError("multipart body ends inside part headers")
        headers: dict[str, str] = {}
        for line in raw.decode("utf-8", "replace").split("\r\n"):
            key, sep, value = line.partition(":")
            if sep:
                headers[key.strip().lower()] = value.strip()
        return headers

    def next_part(self) -> Part | None:
        """The next part (the previous one is skipped if unread), or None at the end."""
        if self._current is not None and not self._current.done:
            self._current.drain()
        if self._finished:
            return None
        if not self._started:
            self._skip_preamble()
            self._started = True
        if not self._after_boundary():
            return None
        self._current = Part(self, self._read_headers())
        self._in_part = True
        return self._current

    def _read_part(self, n: int) -> bytes:
        if not self._in_part:
            return b""
        while True:
            idx = self._buf.find(self._delimiter)
            if idx >= 0:
                if idx == 0:
                    del self._buf[: len(self._delimiter)]
                    self._in_part = False
                    return b""
                take = min(idx, n)
                data = bytes(self._buf[:take])
                del self._buf[:take]
                return data
            safe = len(self._buf) - (len(self._delimiter) - 1)
            if safe > 0:
                take = min(safe, n)
                data = bytes(self._buf[:take])
                del self._buf[:take]
                return data
            if not self._fill():
                raise MultipartError("multipart body ends inside a part")
