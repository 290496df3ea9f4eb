"""The VMMs the end-to-end suite can run on this host, for parametrizing tests over them.

    from tests.vmm_matrix import vmm_params

    @pytest.mark.parametrize("vmm_type", vmm_params())
    def test_something(vmm_type: VmmType) -> None: ...

Every VMM of :class:`VmmType` is listed; one that is unusable here (binary missing or too old,
no usable KVM for Firecracker/Cloud Hypervisor) is a skipped parameter whose reason says why and
what to do (the same checks as ``trenvx doctor``).
"""

from __future__ import annotations

from functools import lru_cache

import pytest

from trenvx.config import Config, VmmType
from trenvx.vmm.hostcheck import Availability, vmm_availability


@lru_cache(maxsize=None)
def _availability(config_path: str) -> tuple[Availability, ...]:
    from trenvx.config import load_config

    cfg = load_config(config_path) if config_path else Config()
    return tuple(vmm_availability(cfg))


def available_vmms(config_path: str = "") -> dict[VmmType, str | None]:
    """Each VMM -> None if usable here, else the reason it is not."""
    return {VmmType(a.name): (None if a.usable else a.detail) for a in _availability(config_path)}


def vmm_params(config_path: str = "") -> list[object]:
    """``pytest.param`` per VMM, skipped with the reason where it cannot run."""
    out: list[object] = []
    for vmm, why in available_vmms(config_path).items():
        marks = [pytest.mark.skip(reason=f"{vmm.value}: {why}")] if why else []
        out.append(pytest.param(vmm, id=vmm.value, marks=marks))
    return out


__all__ = ["available_vmms", "vmm_params"]
