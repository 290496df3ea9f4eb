"""Protobuf JSON mapping helpers for the envd messages, which are plain ``dict`` objects.

Proto3 JSON: lowerCamelCase field names (the original snake_case names are accepted too),
``bytes`` as base64, enums as their names (numbers accepted), 64-bit integers as strings
(numbers accepted), default values omitted, ``google.protobuf.Timestamp`` as RFC 3339.
Every accessor raises :class:`ConnectError` ``invalid_argument`` naming the field on a
value of the wrong type, so a malformed request never becomes an internal error.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
from collections.abc import Mapping
from typing import Any

from .connect import ConnectError

_CAMEL_RE = re.compile(r"_([a-z0-9])")


def snake_case(name: str) -> str:
    """``symlinkTarget`` -> ``symlink_target``."""
    return re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), name)


def camel_case(name: str) -> str:
    """``symlink_target`` -> ``symlinkTarget``."""
    return _CAMEL_RE.sub(lambda m: m.group(1).upper(), name)


def raw(msg: Mapping[str, Any], name: str) -> Any:
    """The value of field ``name`` (given in lowerCamelCase) or None when absent/null."""
    value = msg.get(name)
    if value is None:
        value = msg.get(snake_case(name))
    return value


def has(msg: Mapping[str, Any], name: str) -> bool:
    """Whether field ``name`` is present and not null."""
    return raw(msg, name) is not None


def get_str(msg: Mapping[str, Any], name: str, default: str = "") -> str:
    value = raw(msg, name)
    if value is None:
        return default
    if not isinstance(value, str):
        raise ConnectError("invalid_argument", f"field '{name}' must be a string")
    return value


def get_bool(msg: Mapping[str, Any], name: str, default: bool = False) -> bool:
    value = raw(msg, name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ConnectError("invalid_argument", f"field '{name}' must be a boolean")
    return value


def get_int(msg: Mapping[str, Any], name: str, default: int = 0) -> int:
    """An integer field; accepts JSON numbers and decimal strings (int64 mapping)."""
    value = raw(msg, name)
    if value is None:
        return default
    return to_int(value, name)


def to_int(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise ConnectError("invalid_argument", f"field '{name}' must be an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise ConnectError("invalid_argument", f"field '{name}' must be an integer")


def get_bytes(msg: Mapping[str, Any], name: str) -> bytes:
    """A ``bytes`` field: standard or URL-safe base64, padding optional."""
    value = raw(msg, name)
    if value is None:
        return b""
    if not isinstance(value, str):
        raise ConnectError("invalid_argument", f"field '{name}' must be a base64 string")
    return decode_b64(value, name)


def decode_b64(value: str, name: str = "value") -> bytes:
    text = value.strip().replace("-", "+").replace("_", "/")
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ConnectError("invalid_argument", f"field '{name}' is not valid base64") from None


def b64(data: bytes) -> str:
    """Bytes as the standard base64 text used by protobuf JSON."""
    return base64.b64encode(data).decode("ascii")


def get_enum(msg: Mapping[str, Any], name: str, values: Mapping[str, int]) -> int:
    """An enum field given as its name (``"SIGNAL_SIGKILL"``) or its number (``9``)."""
    value = raw(msg, name)
    if value is None:
        return 0
    if isinstance(value, str):
        if value in values:
            return values[value]
        try:
            return int(value)
        except ValueError:
            raise ConnectError(
                "invalid_argument",
                f"field '{name}' has unknown value '{value}' (expected one of {', '.join(values)})",
            ) from None
    return to_int(value, name)


def get_message(msg: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    value = raw(msg, name)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ConnectError("invalid_argument", f"field '{name}' must be an object")
    return value


def get_map(msg: Mapping[str, Any], name: str) -> dict[str, str]:
    """A ``map<string, string>`` field."""
    value = raw(msg, name)
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ConnectError("invalid_argument", f"field '{name}' must map strings to strings")
    return dict(value)


def get_str_list(msg: Mapping[str, Any], name: str) -> list[str]:
    """A ``repeated string`` field."""
    value = raw(msg, name)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConnectError("invalid_argument", f"field '{name}' must be a list of strings")
    return list(value)


def timestamp(ns: int) -> str:
    """A ``google.protobuf.Timestamp`` in its JSON form (RFC 3339, UTC, ``Z``)."""
    seconds, nanos = divmod(ns, 1_000_000_000)
    base = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    if nanos:
        frac = f"{nanos:09d}"
        # Protobuf JSON uses 0, 3, 6 or 9 fractional digits.
        while frac.endswith("000"):
            frac = frac[:-3]
        return f"{base}.{frac}Z"
    return base + "Z"


def prune(msg: dict[str, Any]) -> dict[str, Any]:
    """Drop proto3 default values (``0``, ``""``, ``False``, ``[]``, ``{}`` of scalars, None).

    Only top-level scalar/list/map defaults go; nested message objects are kept even when
    empty, because an empty object still selects a oneof branch (``{"keepalive": {}}``).
    """
    out: dict[str, Any] = {}
    for key, value in msg.items():
        if value is None or value is False or value == "" or value == []:
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0:
            continue
        out[key] = value
    return out
