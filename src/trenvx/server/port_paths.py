"""The path form of a sandbox's port: ``http(s)://<backend>/sandboxes/<id>/ports/<port>/<rest>``.

Where no wildcard DNS points ``*.<domain>`` at the backend, a browser cannot use the host form
``PORT-ID.<domain>``; the path form needs only the backend's own address. The proxy sends
``/<rest>`` (query included) to that port of the sandbox, so a web application in the sandbox
sees the paths it serves, as it would behind any prefix-stripping reverse proxy:

- ``/sandboxes/<id>/ports/<port>`` without the trailing slash is redirected to the prefix with it
  (``/sandboxes/<id>/ports/<port>/``), so that the relative URLs of the page served there (a web
  IDE's ``./static/...``) resolve under the prefix;
- the request carries ``X-Forwarded-Prefix: /sandboxes/<id>/ports/<port>`` (with
  ``X-Forwarded-Host`` and ``X-Forwarded-Proto``, which every form gets), for applications that
  build absolute URLs;
- the answer's ``Location`` (an absolute path, or an absolute URL on the request's own host) and
  the ``Path`` of its ``Set-Cookie`` headers get the prefix put in front (:func:`prefixed_location`,
  :func:`prefixed_set_cookie`), so that a redirect to ``/login`` stays inside the sandbox's port
  and a cookie set for ``/`` is sent back to it.

The prefix cannot meet an API route: the API has ``/sandboxes/{id}`` and its fixed sub-resources
(``timeout``, ``refreshes``, ``pause``, ``resume``, ``connect``, ``fork``, ``snapshots``, ``network``,
``metrics``, ``logs``, ``reclaim``), none of them ``ports``. Unlike the host form, the path form
puts every sandbox on the backend's one origin: a page served by one sandbox's port can script
another's pages in the same browser. Prefer the host form where wildcard DNS exists.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

PATH_RE = re.compile(rb"^/sandboxes/([a-z0-9][a-z0-9-]{0,63})/ports/(\d{1,5})(/.*)?$", re.DOTALL)
PREFIX_TEMPLATE = "/sandboxes/{sandbox_id}/ports/{port}"


class BadPortPath(ValueError):
    """A path form whose port is not a port number."""


@dataclass(frozen=True)
class PortPath:
    """Where a path-form request goes: port ``port`` of ``sandbox_id``, path ``rest`` there."""

    sandbox_id: str
    port: int
    rest: bytes
    """The raw path after the prefix, from its ``/`` on; empty when the prefix had no trailing slash."""

    @property
    def prefix(self) -> str:
        """``/sandboxes/<id>/ports/<port>``, no trailing slash (also the cookie's ``Path``)."""
        return prefix_of(self.sandbox_id, self.port)


def prefix_of(sandbox_id: str, port: int) -> str:
    return PREFIX_TEMPLATE.format(sandbox_id=sandbox_id, port=int(port))


def port_path(scope: dict[str, Any]) -> PortPath | None:
    """The path form of this request's path, None for any other path; :class:`BadPortPath` if its
    port is out of range."""
    raw = scope.get("raw_path") or scope.get("path", "").encode("utf-8")
    m = PATH_RE.match(raw)
    if m is None:
        return None
    port = int(m.group(2))
    if not 1 <= port <= 65535:
        raise BadPortPath(f"path {PREFIX_TEMPLATE.format(sandbox_id=m.group(1).decode(), port=port)}: "
                          f"{port} is not a port number (1-65535)")
    return PortPath(m.group(1).decode("ascii"), port, m.group(3) or b"")


def prefixed_location(value: bytes, prefix: str, host: bytes | None) -> bytes:
    """An upstream ``Location`` as the client must follow it: an absolute path (``/login``) or an
    absolute URL on the request's own ``host`` gets ``prefix`` in front of its path; relative
    references (``./login``, ``login``) and other hosts are left alone."""
    text = value.decode("latin-1").strip()
    pre = prefix.encode("latin-1")
    if text.startswith("/") and not text.startswith("//"):
        return value if _under(text, prefix) else pre + value.strip()
    parts = urlsplit(text)
    if (parts.scheme in ("http", "https") and host is not None
            and parts.netloc.lower() == host.decode("latin-1").strip().lower()):
        path = parts.path or "/"
        if _under(path, prefix):
            return value
        rebuilt = parts._replace(path=prefix + path)
        return rebuilt.geturl().encode("latin-1")
    return value


def _under(path: str, prefix: str) -> bool:
    """Whether ``path`` is the prefix or below it already (an application that honours
    ``X-Forwarded-Prefix`` builds its URLs with it)."""
    path = path.split("?", 1)[0]
    return path == prefix or path.startswith(prefix + "/")


_PATH_ATTR = re.compile(rb"(;\s*path\s*=\s*)([^;]*)", re.IGNORECASE)


def prefixed_set_cookie(value: bytes, prefix: str) -> bytes:
    """An upstream ``Set-Cookie`` whose ``Path`` (absolute) gets ``prefix`` in front; without a
    ``Path`` the browser scopes it to the request's directory, which is under the prefix already."""
    pre = prefix.encode("latin-1")

    def fix(m: re.Match[bytes]) -> bytes:
        path = m.group(2).strip()
        if not path.startswith(b"/") or _under(path.decode("latin-1"), prefix):
            return m.group(0)
        return m.group(1) + (pre + path if path != b"/" else pre)

    return _PATH_ATTR.sub(fix, value)


__all__ = ["BadPortPath", "PortPath", "port_path", "prefix_of", "prefixed_location", "prefixed_set_cookie"]
