"""tests/vmm_matrix.py lists every VMM, usable or skipped with a reason, and driver_for returns each."""

from __future__ import annotations

import pytest

from tests.vmm_matrix import available_vmms, vmm_params
from trenvx.config import Config, VmmType
from trenvx.vmm import check_template_vmm, driver_for
from trenvx.vmm.base import VmmError


def test_every_vmm_is_listed_with_a_reason_when_unusable() -> None:
    found = available_vmms()
    assert set(found) == set(VmmType)
    for vmm, why in found.items():
        assert why is None or len(why) > 20, vmm
    assert [p.id for p in vmm_params()] == [v.value for v in VmmType]  # type: ignore[attr-defined]


@pytest.mark.parametrize("vmm_type", vmm_params())
def test_parametrized_over_usable_vmms(vmm_type: VmmType) -> None:
    assert driver_for(vmm_type, Config()).name == vmm_type.value


def test_driver_for_and_template_vmm_check() -> None:
    for t in VmmType:
        assert driver_for(t, Config()).name == t.value
    assert driver_for(VmmType.firecracker, Config()).disk_formats == ("raw",)
    check_template_vmm("t", "firecracker", "firecracker")
    with pytest.raises(VmmError, match="built with vmm_type 'qemu' and cannot be restored with 'cloud-hypervisor'"):
        check_template_vmm("t", "qemu", "cloud-hypervisor")


def test_config_for_vmm_derives_a_default_template_per_vmm() -> None:
    from tests.conftest import E2E_CONFIG, E2E_TEMPLATE
    from tests.vmm_matrix import config_for_vmm, template_for_vmm
    from trenvx.config import load_config

    cfg = load_config(E2E_CONFIG)
    assert config_for_vmm(cfg, VmmType.qemu, E2E_TEMPLATE) is cfg, "QEMU shares the suite's template"
    for vmm in (VmmType.firecracker, VmmType.cloud_hypervisor):
        derived = config_for_vmm(cfg, vmm, E2E_TEMPLATE)
        name = template_for_vmm(E2E_TEMPLATE, vmm)
        assert name == f"{E2E_TEMPLATE}-{vmm.value}" and derived.default_template == name
        t = derived.get_template(name)
        assert t.name == name and t.vmm_type is vmm
        original = cfg.get_template(E2E_TEMPLATE)
        assert t.model_dump(exclude={"name", "vmm_type"}) == original.model_dump(exclude={"name", "vmm_type"})
        assert derived.get_template(E2E_TEMPLATE) == original and cfg.default_template == E2E_TEMPLATE
        assert derived.data_root == cfg.data_root and derived.pool == cfg.pool
    with pytest.raises(KeyError):
        config_for_vmm(cfg, VmmType.firecracker, "no-such-template")
