"""A sandbox's network settings on disk, next to its VM: what a restarted server needs to take
its network back (its slot, its egress rules, its traffic token, what the client asked for).

Unreadable settings fail closed: the sandbox is taken back with no egress and private ports.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from ..network.policy import DEFAULT_POLICY, NO_EGRESS, EgressPolicy, PolicyError

log = logging.getLogger(__name__)

SLOT_FILE = "net-slot"
"""In a sandbox's directory: the number of its network slot (written when the slot is taken)."""
NETWORK_STATE = "network.json"


@dataclass(frozen=True)
class NetworkState:
    slot: int | None = None
    egress: EgressPolicy = DEFAULT_POLICY
    allow_public_traffic: bool = True
    traffic_access_token: str = ""
    allow_internet_access: bool | None = None
    mask_request_host: str | None = None


def write_network_state(workdir: Path, state: NetworkState) -> None:
    """Record a sandbox's egress rules and traffic token next to its VM (its slot number is in
    SLOT_FILE, written when the slot was taken), replacing the file atomically."""
    e = state.egress
    doc = {
        "allowOut": list(e.allow_out), "denyOut": list(e.deny_out), "dnsServers": list(e.dns_servers),
        "allowPublicTraffic": state.allow_public_traffic, "trafficAccessToken": state.traffic_access_token,
        "allowInternetAccess": state.allow_internet_access, "maskRequestHost": state.mask_request_host,
    }
    path = workdir / NETWORK_STATE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


def read_network_state(workdir: Path) -> NetworkState:
    slot: int | None = None
    with contextlib.suppress(OSError, ValueError):
        slot = int((workdir / SLOT_FILE).read_text().strip())
    try:
        doc = json.loads((workdir / NETWORK_STATE).read_text())
        egress = EgressPolicy.from_e2b(
            allow_out=doc.get("allowOut") or [], deny_out=doc.get("denyOut") or [], dns_servers=doc.get("dnsServers"),
        )
        aia = doc.get("allowInternetAccess")
        mask = doc.get("maskRequestHost")
        return NetworkState(
            slot, egress, bool(doc.get("allowPublicTraffic", True)), str(doc.get("trafficAccessToken", "")),
            aia if isinstance(aia, bool) else None, mask if isinstance(mask, str) else None,
        )
    except FileNotFoundError:
        return NetworkState(slot)  # a sandbox from before network rules existed: it had none
    except (OSError, ValueError, PolicyError) as e:
        # Unreadable rules: the sandbox is taken back closed (no egress, private ports), not open.
        log.warning("the network rules in %s cannot be read (%s); the sandbox gets no egress and private ports",
                    workdir / NETWORK_STATE, e)
        return NetworkState(slot, NO_EGRESS, False, secrets.token_urlsafe(24))
