"""E2B options trenvx does not implement (yet): refused with a 400 that names them, never ignored.

A caller who asks E2B for ``volumeMounts`` relies on their data being on a persistent volume;
silently dropping the option would lose their work. So every option of E2B's create body
(``NewSandbox``/``NewSandboxV2`` in E2B's OpenAPI spec and its SDKs' models) is either
implemented, or listed in :data:`UNIMPLEMENTED_OPTIONS` with the values that leave behaviour as
without it (E2B's defaults, which E2B's SDKs send, stay accepted: ``mcp: null``, empty lists and
maps). Any other value is a 400::

    body field mcp: starting an MCP gateway with the given servers in the sandbox is not
    implemented in trenvx yet; leave it out (or send it null or {})

**When an issue implements one of these, it removes its entry from the list** (and the test
over the list follows by itself).

E2B's create options and where each stands:

==========================  ===================================================================
``templateID``, ``timeout`` implemented
``metadata``, ``envVars``   implemented
``allow_internet_access``   implemented (issue 12)
``network``                 implemented (issue 12); ``rules``, ``egressProxy``, ``httpsPorts``
                            refused below
``secure``                  accepted, either value: trenvx always secures the agent with the
                            sandbox's access token (as E2B does now: E2B ignores the field)
``autoPause``,              implemented (issue 14): the sandbox's lifecycle
``autoPauseMemory``,        (:class:`trenvx.sandbox.lifecycle.LifecyclePolicy`)
``autoResume``
``mcp``, ``iam``, ``volumeMounts``: refused below
==========================  ===================================================================

**Fields E2B adds later** (unknown to this list and to the model) are ignored, so that a newer
E2B SDK sending a new field with its default keeps working; the server logs each unknown name
once. Fields that decide what a sandbox may reach are the exception: ``network`` accepts no
unknown key (see :mod:`.models`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from .errors import ApiError

log = logging.getLogger(__name__)


def _truthy(v: Any) -> bool:
    """Asks for the feature: anything but absent, null, false, or an empty list/map."""
    return v is not None and v is not False and v != {} and v != []


def _not_null(v: Any) -> bool:
    return v is not None


def _iam_tokens(v: Any) -> bool:
    """``iam``: E2B enables workload identity only for a non-empty ``tokens`` map."""
    tokens = v.get("tokens") if isinstance(v, dict) else getattr(v, "tokens", None)
    return _truthy(tokens)


@dataclass(frozen=True)
class UnimplementedOption:
    """An E2B option trenvx refuses: ``path`` in the request body (dotted), what it does in E2B
    and why trenvx refuses it, the values it still accepts (they change nothing), a test of
    whether a given value asks for the feature, and an ``example`` value that does (E2B's shape;
    the tests send it)."""

    path: str
    what: str
    accepts: str
    asks: Callable[[Any], bool]
    example: Any

    def message(self, prefix: str = "") -> str:
        shown = self.path[len(prefix):] if prefix and self.path.startswith(prefix) else self.path
        return f"body field {shown}: {self.what}; leave it out (or send it {self.accepts})"


_NOT_YET = "is not implemented in trenvx yet"

UNIMPLEMENTED_OPTIONS: tuple[UnimplementedOption, ...] = (
    UnimplementedOption(
        "mcp", f"starting an MCP gateway with the given servers in the sandbox {_NOT_YET}", "null or {}", _truthy,
        {"github/owner/repo": {"installCmd": "npm i", "runCmd": "npm start"}}),
    UnimplementedOption(
        "iam", f"workload identity tokens for the sandbox {_NOT_YET}", 'null or {"tokens": {}}', _iam_tokens,
        {"tokens": {"gcp": {"audience": "https://example.com", "tokenType": "oidc"}}}),
    UnimplementedOption(
        "volumeMounts", f"mounting persistent volumes into the sandbox {_NOT_YET}", "[]", _truthy,
        [{"name": "data", "path": "/mnt/data"}]),
    UnimplementedOption(
        "network.rules", "per-domain request transform rules are not supported by trenvx", "empty", _truthy,
        {"api.example.com": [{"transform": {"headers": {"Authorization": "Bearer x"}}}]}),
    UnimplementedOption(
        "network.egressProxy", "tunnelling egress through a SOCKS5 proxy is not supported by trenvx", "null",
        _not_null, {"address": "proxy.example.com:1080"}),
    UnimplementedOption(
        "network.httpsPorts", "ports serving HTTPS behind the proxy are not supported by trenvx (the proxy speaks "
                              "plain HTTP to the sandbox)", "empty", _truthy, [8443]),
)
"""Every E2B create option trenvx does not implement, with the values it accepts. Remove an
entry when its feature is implemented."""


def _value_at(body: Any, path: list[str]) -> Any:
    v = body
    for part in path:
        if v is None:
            return None
        v = v.get(part) if isinstance(v, dict) else getattr(v, part, None)
    return v


def refuse_unimplemented(body: Any, prefix: str = "", options: tuple[UnimplementedOption, ...] = UNIMPLEMENTED_OPTIONS,
                         ) -> None:
    """A 400 naming the first option of ``options`` under ``prefix`` (``""``: the create body;
    ``"network."``: a body of the network's fields, as PUT /network takes) that ``body`` sets
    to a value that asks for it."""
    for opt in options:
        if not opt.path.startswith(prefix):
            continue
        value = _value_at(body, opt.path[len(prefix):].split("."))
        if opt.asks(value):
            raise ApiError(400, opt.message(prefix))


_seen_unknown: set[str] = set()


def note_unknown_fields(body: BaseModel, where: str) -> list[str]:
    """Log once per name the fields of ``body`` that the model does not know (they are ignored);
    returns them. Needs a model with ``extra="allow"`` to see them."""
    extra = sorted((body.model_extra or {}).keys())
    for name in extra:
        if name not in _seen_unknown and len(_seen_unknown) < 1000:
            _seen_unknown.add(name)
            log.info("%s: ignoring the field %r, which this trenvx does not know (a newer E2B SDK's?)",
                     where, name[:80])
    return extra


__all__ = ["UNIMPLEMENTED_OPTIONS", "UnimplementedOption", "note_unknown_fields", "refuse_unimplemented"]
