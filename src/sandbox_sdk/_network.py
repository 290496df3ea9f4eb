"""Network options in E2B's Python shapes, turned into the backend's JSON (E2B's REST shapes).

``Sandbox.create(allow_internet_access=..., network={...})`` and ``sandbox.update_network({...})``
take the dictionaries of E2B's SDK (snake_case keys; ``allow_out``/``deny_out`` a list or a
callable receiving :class:`SandboxNetworkSelectorContext`); the backend gets ``allowOut``,
``denyOut``, ... Options trenvx does not enforce (``rules``, ``egress_proxy``, ``https_ports``)
are passed on as given, and the backend refuses them with a 400 that names them
(:class:`~sandbox_sdk.exceptions.InvalidArgumentError`): they are never dropped silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

from .exceptions import InvalidArgumentError
from .models import ALL_TRAFFIC


@dataclass(frozen=True)
class SandboxNetworkSelectorContext:
    """What a callable ``allow_out``/``deny_out`` receives (as in E2B's SDK).

    Example: ``network={"deny_out": lambda ctx: [ctx.all_traffic], "allow_out": ["pypi.org"]}``
    """

    all_traffic: str = ALL_TRAFFIC
    rules: Mapping[str, Any] = field(default_factory=dict)


SandboxNetworkSelector = Union[Sequence[str], Callable[[SandboxNetworkSelectorContext], Sequence[str]]]

#: option name -> the backend's field name
_CREATE_KEYS = {
    "allow_out": "allowOut",
    "deny_out": "denyOut",
    "dns_servers": "dnsServers",
    "allow_public_traffic": "allowPublicTraffic",
    "mask_request_host": "maskRequestHost",
    "https_ports": "httpsPorts",
    "rules": "rules",
    "egress_proxy": "egressProxy",
}
_UPDATE_KEYS = {
    "allow_out": "allowOut",
    "deny_out": "denyOut",
    "dns_servers": "dnsServers",
    "allow_internet_access": "allow_internet_access",
    "rules": "rules",
    "egress_proxy": "egressProxy",
}


def _strings(value: Any, option: str) -> List[str]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise InvalidArgumentError(
            f"network option {option} must be a list of strings, e.g. [\"1.1.1.1\", \"10.0.0.0/8\", \"example.com\"] "
            f"(got {type(value).__name__}{': wrap a single entry in [...]' if isinstance(value, str) else ''})"
        )
    for entry in value:
        if not isinstance(entry, str):
            raise InvalidArgumentError(f"network option {option}: {entry!r} is not a string")
    return list(value)


def _selector(value: Any, option: str, rules: Mapping[str, Any]) -> List[str]:
    if callable(value):
        value = value(SandboxNetworkSelectorContext(ALL_TRAFFIC, dict(rules)))
    return _strings(value, option)


def _body(network: Mapping[str, Any], keys: Mapping[str, str], what: str) -> Dict[str, Any]:
    if not isinstance(network, Mapping):
        raise InvalidArgumentError(f"{what} must be a dict such as {{\"allow_out\": [...], \"deny_out\": [...]}}")
    unknown = [k for k in network if k not in keys]
    if unknown:
        raise InvalidArgumentError(
            f"{what}: unknown option(s) {', '.join(map(repr, unknown))}; the options are {', '.join(keys)}"
        )
    rules = network.get("rules") or {}
    body: Dict[str, Any] = {}
    for option, name in keys.items():
        if option not in network or network[option] is None:
            continue
        value = network[option]
        if option in ("allow_out", "deny_out"):
            value = _selector(value, option, rules)
        elif option == "dns_servers":
            value = _strings(value, option)
        elif option in ("allow_public_traffic", "allow_internet_access"):
            if not isinstance(value, bool):
                raise InvalidArgumentError(f"network option {option} must be True or False, not {value!r}")
        elif option == "https_ports":
            value = list(value)
        body[name] = value
    return body


def create_network_body(network: Optional[Mapping[str, Any]]) -> Optional[Dict[str, Any]]:
    """``network`` of ``Sandbox.create`` (E2B's ``SandboxNetworkOpts``) as the create body's ``network``."""
    if network is None:
        return None
    return _body(network, _CREATE_KEYS, "network")


def update_network_body(network: Mapping[str, Any]) -> Dict[str, Any]:
    """``update_network``'s argument (E2B's ``SandboxNetworkUpdate``) as the PUT /network body.

    The update replaces the sandbox's egress rules: what is left out is cleared."""
    return _body(network, _UPDATE_KEYS, "update_network's network")
