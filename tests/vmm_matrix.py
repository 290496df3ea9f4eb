"""The VMMs the end-to-end suite can run on this host, for parametrizing tests over them.

    from tests.vmm_matrix import vmm_params

    @pytest.mark.parametrize("vmm_type", vmm_params())
    def test_something(vmm_type: VmmType) -> None: ...

Every VMM of :class:`VmmType` is listed; one that is unusable here (binary missing or too old,
no usable KVM for Firecracker/Cloud Hypervisor) is a skipped parameter whose reason says why and
what to do (the same checks as ``trenvx doctor``).

A template is built for one VMM (its ``vmm_type``): :func:`config_for_vmm` derives, from the
end-to-end config, one whose default template is a copy of the test template for a given VMM.
"""

from __future__ import annotations

from functools import lru_cache

import pytest

from trenvx.config import Config, TemplateManagerConfig, VmmType
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


def template_for_vmm(template: str, vmm_type: VmmType) -> str:
    """The name of ``template``'s copy for ``vmm_type``: QEMU keeps the name (the suite's template)."""
    return template if vmm_type is VmmType.qemu else f"{template}-{vmm_type.value}"


def config_for_vmm(config: Config, vmm_type: VmmType, template: str) -> Config:
    """``config`` whose default template is ``template`` built with ``vmm_type``.

    QEMU: ``config`` as it is (its template is the one the rest of the suite uses). Another VMM:
    a copy of the template's table named :func:`template_for_vmm`, with that ``vmm_type``, made
    the default (``template_manager.template_id``, so pools and ``create()`` use it too); its
    build is cached in ``data_root`` like any other template. Raises KeyError if ``config`` has no
    such template.
    """
    source = config.template[template]
    if vmm_type is VmmType.qemu and source.vmm_type is VmmType.qemu:
        return config
    name = template_for_vmm(template, vmm_type)
    copy = source.model_copy(update={"name": name, "vmm_type": vmm_type})
    return config.model_copy(update={
        "template": {**config.template, name: copy},
        "template_manager": TemplateManagerConfig(template_id=name),
    })


__all__ = ["available_vmms", "config_for_vmm", "template_for_vmm", "vmm_params"]
