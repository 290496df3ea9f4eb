"""Which sandboxes get network slots, and a template built for another network mode is refused clearly."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from trenvx.config import Config, NetworkConfig, NetworkMode
from trenvx.layout import DataRoot
from trenvx.network.slot import HostNetwork
from trenvx.sandbox.restore import SnapshotRestore, TemplateNetworkMismatch


def build(vmm: str, network: str) -> SimpleNamespace:
    manifest = SimpleNamespace(name="t", vmm_type=vmm, inputs={"network": network})
    return SimpleNamespace(manifest=manifest, build_id="b1")


def restorer(tmp_path: Path, slots: bool) -> SnapshotRestore:
    cfg = Config(data_root=tmp_path, network=NetworkConfig(mode=NetworkMode.netns if slots else NetworkMode.user))
    net = HostNetwork(cfg.network, tmp_path) if slots else None
    return SnapshotRestore(cfg, DataRoot(tmp_path), net)


def test_a_template_built_for_user_networking_is_refused_by_a_netns_server(tmp_path: Path) -> None:
    r = restorer(tmp_path, slots=True)
    with pytest.raises(TemplateNetworkMismatch, match="built for user networking.*template-manager"):
        r.check_network(build("qemu", "user"))  # type: ignore[arg-type]
    r.check_network(build("qemu", "netns"))  # type: ignore[arg-type]
    with pytest.raises(TemplateNetworkMismatch, match="built for netns"):
        restorer(tmp_path, slots=False).check_network(build("qemu", "netns"))  # type: ignore[arg-type]


def test_only_qemu_guests_get_slots(tmp_path: Path) -> None:
    r = restorer(tmp_path, slots=True)
    assert r.uses_slot(build("qemu", "netns"))  # type: ignore[arg-type]
    assert not r.uses_slot(build("firecracker", "user"))  # type: ignore[arg-type]
    r.check_network(build("cloud-hypervisor", "user"))  # type: ignore[arg-type] # vsock only: no NIC to mismatch
    assert not restorer(tmp_path, slots=False).uses_slot(build("qemu", "user"))  # type: ignore[arg-type]


async def test_the_api_answers_409_naming_the_rebuild(tmp_path: Path) -> None:
    import httpx

    from tests.unit.server_fakes import fake_manager, make_config, make_template
    from trenvx.server.app import create_app

    cfg = make_config(tmp_path)
    make_template(tmp_path, "tpl")
    m = fake_manager(cfg, 1)

    def mismatch(build: object) -> None:
        raise TemplateNetworkMismatch("template tpl was built for user networking; rebuild it: template-manager ...")

    m.restorer.check_network = mismatch  # type: ignore[method-assign]
    async with m:
        transport = httpx.ASGITransport(app=create_app(cfg, manager=m))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            r = await c.post("/sandboxes", json={"templateID": "tpl"})
    assert r.status_code == 409 and "rebuild it" in r.json()["message"], r.text
