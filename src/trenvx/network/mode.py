"""Which network mode this host runs sandboxes in: ``netns`` where it can, else ``user``."""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from pathlib import Path

from ..config import NetworkConfig, NetworkMode
from . import netns, nft

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def netns_unavailable() -> str:
    """Empty when network slots can be made here, else the reason (for logs and ``trenvx doctor``)."""
    if os.geteuid() != 0:
        return "not running as root (network namespaces, tap devices and nftables need it)"
    if not Path("/dev/net/tun").exists():
        return "/dev/net/tun is missing (modprobe tun)"
    if why := nft.available():
        return why
    if importlib.util.find_spec("pyroute2") is None:
        return "the Python package pyroute2 is not installed (pip install -e . installs it)"
    probe = f"trenvx-probe-{os.getpid()}"
    try:
        netns.delete(probe)
        netns.run_in_new(probe)
    except OSError as e:
        return f"cannot create a network namespace: {e}"
    finally:
        netns.delete(probe)
    return ""


def resolve(cfg: NetworkConfig) -> tuple[NetworkMode, str]:
    """(mode, why): the configured mode, or for ``auto`` netns where it works, else user."""
    if cfg.mode is NetworkMode.user:
        return NetworkMode.user, "[network] mode = \"user\" in the config"
    why = netns_unavailable()
    if cfg.mode is NetworkMode.netns:
        if why:
            raise RuntimeError(f"[network] mode = \"netns\" cannot run here: {why}")
        return NetworkMode.netns, "configured"
    if why:
        return NetworkMode.user, why
    return NetworkMode.netns, "root, tap and nftables available"


def warn_if_user(mode: NetworkMode, why: str) -> None:
    if mode is NetworkMode.user:
        log.warning(
            "sandboxes use QEMU user networking, restricted: they reach nothing outside (no egress, "
            "no egress rules) and nothing of the host; network namespaces are not available because %s", why,
        )
