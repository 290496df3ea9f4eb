"""The Cloud Hypervisor driver against the in-process stand-in of its documented REST API
(tests/standins/cloud_hypervisor_api.py); the VMM process is a fake binary that only idles."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest

from tests.standins.cloud_hypervisor_api import CloudHypervisorApi
from tests.unit.vmm_fakes import fake_binary, serve_when_spawned, vm_spec
from trenvx.vmm.base import DiskSpec, StageTimes, VmmError, VmState
from trenvx.vmm.binaries import _cache
from trenvx.vmm.cloud_hypervisor import API_SOCKET, CloudHypervisorDriver, describe_error


def _driver(tmp: Path, version: str) -> CloudHypervisorDriver:
    _cache.clear()
    return CloudHypervisorDriver(str(fake_binary(tmp, f"ch-{version}", f"cloud-hypervisor {version}")),
                                 cache_dir=tmp / "cache")


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    d = tmp_path / "rootfs.ext4"
    d.write_bytes(b"\0" * 4096)
    return d


async def _spawned(coro, spec, api):  # noqa: ANN001, ANN202
    task = asyncio.ensure_future(serve_when_spawned(spec.workdir, API_SOCKET, api))
    vm = await coro
    await task
    return vm


async def _template(driver: CloudHypervisorDriver, tmp: Path, disk: Path, **kw):  # noqa: ANN003, ANN202
    spec = vm_spec(tmp, "build", disk, **kw)
    api = CloudHypervisorApi()
    vm = await _spawned(driver.boot(spec), spec, api)
    try:
        snap = await driver.snapshot(vm, tmp / "tpl")
    finally:
        await vm.kill()
    return spec, api, snap


async def test_pmem_root_boot_snapshot_and_copy_on_write_restore(tmp_path: Path, disk: Path) -> None:
    driver = _driver(tmp_path, "v54.0.0")
    scratch = tmp_path / "scratch.raw"
    scratch.write_bytes(b"\0" * 4096)
    spec, api, snap = await _template(driver, tmp_path, disk, root_on_pmem=True, scratch_disk=DiskSpec(scratch))
    assert [p for m, p, _ in api.journal if m == "PUT"] == [
        "/api/v1/vm.create", "/api/v1/vm.boot", "/api/v1/vm.pause", "/api/v1/vm.snapshot"]
    cfg = api.config
    assert cfg["pmem"] == [{"file": str(disk), "discard_writes": True, "id": "pmem0"}]
    assert cfg["disks"] == [{"path": str(scratch), "readonly": False, "id": "scratch"}]
    assert "root=/dev/pmem0 rootflags=dax" in cfg["payload"]["cmdline"] and "root=/dev/vda" not in cfg["payload"]["cmdline"]
    assert "trenvx.net" not in cfg["payload"]["cmdline"]
    assert cfg["memory"] == {"size": 256 << 20, "shared": False}
    assert snap.memory_file == spec.memory_file and snap.memory_file.is_file()
    assert (snap.vmstate / "config.json").is_file() and not (snap.vmstate / "memory-ranges").exists()

    own = tmp_path / "own-scratch.raw"
    own.write_bytes(b"\0" * 4096)
    rspec = vm_spec(tmp_path, "sb1", disk, root_on_pmem=True, scratch_disk=DiskSpec(own))
    rapi = CloudHypervisorApi()
    vm = await _spawned(driver.prestart(rspec), rspec, rapi)
    try:
        times = StageTimes()
        await driver.restore(vm, snap, times)
        restore = rapi.restored
        assert restore["memory_restore_mode"] == "CopyOnWrite" and restore["prefault"] is False
        d = Path(restore["source_url"].removeprefix("file://"))
        written = json.loads((d / "config.json").read_text())
        assert written["disks"][0]["path"] == str(own)
        assert written["vsock"]["socket"] == str(rspec.workdir / "v.sock")
        assert written["serial"]["file"] == str(rspec.workdir / "console.log")
        assert (d / "memory-ranges").resolve() == snap.memory_file.resolve()
        assert rapi.state == "Running" and set(times.steps) == {"load", "resume"}
        assert (await vm.info())["state"] == "Running"
        with pytest.raises(VmmError, match="not a fresh Cloud Hypervisor process"):
            await driver.restore(vm, snap)
    finally:
        await vm.kill()
    assert vm.state is VmState.exited


async def test_restore_mode_falls_back_and_is_logged(tmp_path: Path, disk: Path, caplog: pytest.LogCaptureFixture) -> None:
    driver = _driver(tmp_path, "v54.0.0")
    _, _, snap = await _template(driver, tmp_path, disk)
    rspec = vm_spec(tmp_path, "sb", disk)
    rapi = CloudHypervisorApi(known_restore_modes=("Copy", "OnDemand"))  # knows the field, not CopyOnWrite
    vm = await _spawned(driver.prestart(rspec), rspec, rapi)
    try:
        with caplog.at_level(logging.WARNING):
            await driver.restore(vm, snap)
        modes = [b.get("memory_restore_mode") for m, p, b in rapi.journal if p.endswith("vm.restore")]
        assert modes == ["CopyOnWrite", "OnDemand"]
        assert "refused memory_restore_mode CopyOnWrite" in caplog.text
    finally:
        await vm.kill()

    old = _driver(tmp_path, "v45.0.0")
    rspec = vm_spec(tmp_path, "sb-old", disk)
    rapi = CloudHypervisorApi(version="v45.0.0", known_restore_modes=("Copy",))
    vm = await _spawned(old.prestart(rspec), rspec, rapi)
    try:
        with caplog.at_level(logging.WARNING):
            await old.restore(vm, snap)
        assert "memory_restore_mode" not in rapi.restored
        assert "copies the template's whole memory" in caplog.text
    finally:
        await vm.kill()


async def test_errors_carry_cloud_hypervisors_error_chain(tmp_path: Path, disk: Path) -> None:
    driver = _driver(tmp_path, "v48.0.0")
    spec = vm_spec(tmp_path, "e", disk)
    api = CloudHypervisorApi(version="v48.0.0")
    api.inject[("PUT", "/api/v1/vm.boot")] = (500, ["Error from API", "The VM could not boot", "Cannot load kernel"])
    task = asyncio.ensure_future(serve_when_spawned(spec.workdir, API_SOCKET, api))
    with pytest.raises(VmmError, match=r"refused PUT /api/v1/vm.boot \(HTTP 500\): Error from API: The VM could not boot: Cannot load kernel"):
        await driver.boot(spec)
    await task
    spec2 = vm_spec(tmp_path, "e2", disk)
    api2 = CloudHypervisorApi(version="v48.0.0")
    vm = await _spawned(driver.prestart(spec2), spec2, api2)
    try:
        with pytest.raises(VmmError, match="HTTP 404.*could not be paused: VM is not created"):
            await vm.pause()  # no VM created: 404 as the OpenAPI document says
    finally:
        await vm.kill()
    with pytest.raises(VmmError, match="only under KVM"):
        await driver.prestart(vm_spec(tmp_path, "t", disk, accelerator="tcg"))
    with pytest.raises(VmmError, match=r"Cloud Hypervisor 39\.0\.0, older than 40\.0\.0.*ch_binary_path"):
        await _driver(tmp_path, "v39.0.0").prestart(vm_spec(tmp_path, "o", disk))


async def test_shutdown_uses_vm_and_vmm_shutdown(tmp_path: Path, disk: Path) -> None:
    driver = _driver(tmp_path, "v50.0.0")
    spec = vm_spec(tmp_path, "s", disk)
    api = CloudHypervisorApi(version="v50.0.0")
    vm = await _spawned(driver.boot(spec), spec, api)
    await vm.shutdown(timeout=1.0)
    assert [p for _, p, _ in api.journal][-2:] == ["/api/v1/vm.shutdown", "/api/v1/vmm.shutdown"]
    assert not vm.is_alive()


def test_describe_error_old_and_new_bodies() -> None:
    assert describe_error(500, b'["Error from API","VM is not created"]') == "Error from API: VM is not created"
    assert describe_error(500, b"InternalServerError") == "InternalServerError"
    assert describe_error(404, b"") == "HTTP 404 without a body"
