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
