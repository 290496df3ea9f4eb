"""The Firecracker driver against the in-process stand-in of Firecracker's documented API
(tests/standins/firecracker_api.py); the VMM process is a fake binary that only idles."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from tests.standins.firecracker_api import FirecrackerApi
from tests.unit.vmm_fakes import fake_binary, serve_when_spawned, vm_spec
from trenvx.vmm.base import HybridVsockEndpoint, StageTimes, VmmError, VmState
from trenvx.vmm.binaries import _cache
from trenvx.vmm.firecracker import API_SOCKET, FirecrackerDriver, describe_error


@pytest.fixture
def driver(tmp_path: Path) -> FirecrackerDriver:
    _cache.clear()
    return FirecrackerDriver(str(fake_binary(tmp_path, "firecracker", "Firecracker v1.10.1")),
                             cache_dir=tmp_path / "cache")


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    d = tmp_path / "rootfs.ext4"
    d.write_bytes(b"\0" * 4096)
    return d


async def _boot(driver: FirecrackerDriver, spec) -> tuple:  # noqa: ANN001
    api = FirecrackerApi(spec.workdir)
    task = asyncio.ensure_future(serve_when_spawned(spec.workdir, API_SOCKET, api))
    vm = await driver.boot(spec)
    await task
    return vm, api


async def test_boot_snapshot_restore_follow_the_documented_api(driver: FirecrackerDriver, disk: Path, tmp_path: Path) -> None:
    spec = vm_spec(tmp_path, "build", disk)
    vm, api = await _boot(driver, spec)
    try:
        calls = [(m, p) for m, p, _ in api.journal if p != "/"]
        assert calls == [("PUT", "/machine-config"), ("PUT", "/boot-source"), ("PUT", "/drives/rootfs"),
                         ("PUT", "/vsock"), ("PUT", "/entropy"), ("PUT", "/actions")]
        boot = next(b for m, p, b in api.journal if p == "/boot-source")
        assert "trenvx.net" not in boot["boot_args"] and "root=/dev/vda" in boot["boot_args"]  # no NIC: no eth0 wait
        assert Path(boot["kernel_image_path"]).read_bytes()[:4] == b"\x7fELF"
        assert vm.agent_endpoint == HybridVsockEndpoint(spec.workdir / "v.sock", 49983)
        snap = await driver.snapshot(vm, tmp_path / "tpl")
        assert api.state == "Paused" and snap.vmstate.is_file() and snap.memory_file == spec.memory_file
    finally:
        await vm.kill()
    assert vm.state is VmState.exited and not vm.is_alive()

    # A restore in another workdir, with its own disk: the relative 'rootfs' resolves there.
    own = tmp_path / "sandbox-disk.raw"
    own.write_bytes(b"\0" * 4096)
    rspec = vm_spec(tmp_path, "sb1", own)
    rapi = FirecrackerApi(rspec.workdir)
    task = asyncio.ensure_future(serve_when_spawned(rspec.workdir, API_SOCKET, rapi))
    rvm = await driver.prestart(rspec)
    await task
    try:
        times = StageTimes()
        await driver.restore(rvm, snap, times)
        (_, _, load), = [c for c in rapi.journal if c[1] == "/snapshot/load"]
        assert load["mem_backend"] == {"backend_type": "File", "backend_path": str(snap.memory_file.resolve())}
        assert load["resume_vm"] is True and "mem_file_path" not in load
        assert rapi.state == "Running" and "load" in times.steps
        assert (rspec.workdir / "rootfs").resolve() == own.resolve()
        await rvm.pause()
        await rvm.resume()
        with pytest.raises(VmmError, match="not a fresh Firecracker process"):
            await driver.restore(rvm, snap)
    finally:
        await rvm.kill()


async def test_errors_become_vmm_errors_with_firecrackers_message(driver: FirecrackerDriver, disk: Path, tmp_path: Path) -> None:
    spec = vm_spec(tmp_path, "e", disk)
    api = FirecrackerApi(spec.workdir)
    api.inject[("PUT", "/boot-source")] = (400, "The kernel file cannot be opened: Permission denied")
    task = asyncio.ensure_future(serve_when_spawned(spec.workdir, API_SOCKET, api))
    with pytest.raises(VmmError, match=r"refused PUT /boot-source \(HTTP 400\): The kernel file cannot be opened"):
        await driver.boot(spec)
    await task
    await api.close()
    # A load on a process that was configured is refused by Firecracker, and so reported.
    spec2 = vm_spec(tmp_path, "e2", disk)
    api2 = FirecrackerApi(spec2.workdir)
    task = asyncio.ensure_future(serve_when_spawned(spec2.workdir, API_SOCKET, api2))
    vm = await driver.prestart(spec2)
    await task
    try:
        await vm.api.request("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128})
        (tmp_path / "vs").write_bytes(b"FCSNAPSHOT{}")
        from trenvx.vmm.base import SnapshotFiles
        with pytest.raises(VmmError, match="not allowed after configuring boot-specific resources"):
            await driver.restore(vm, SnapshotFiles(tmp_path / "vs", disk))
    finally:
        await vm.kill()


async def test_refusals_before_any_process(tmp_path: Path, disk: Path) -> None:
    _cache.clear()
    old = FirecrackerDriver(str(fake_binary(tmp_path, "fc-old", "Firecracker v1.4.1")), cache_dir=tmp_path)
    with pytest.raises(VmmError, match=r"Firecracker 1\.4\.1, older than 1\.8\.0.*ACPI.*fc_binary_path"):
        await old.boot(vm_spec(tmp_path, "o", disk))
    missing = FirecrackerDriver("/nonexistent/firecracker", cache_dir=tmp_path)
    with pytest.raises(VmmError, match="fc_binary_path = '/nonexistent/firecracker' is not an executable"):
        await missing.prestart(vm_spec(tmp_path, "m", disk))
    ok = FirecrackerDriver(str(fake_binary(tmp_path, "fc", "Firecracker v1.12.0")), cache_dir=tmp_path)
    with pytest.raises(VmmError, match="only under KVM.*tcg machine"):
        await ok.prestart(vm_spec(tmp_path, "t", disk, accelerator="tcg"))
    from trenvx.vmm.base import DiskSpec
    import dataclasses
    with pytest.raises(VmmError, match="raw disk images only"):
        await ok.prestart(dataclasses.replace(vm_spec(tmp_path, "q", disk), root_disk=DiskSpec(disk, "qcow2")))


async def test_network_and_mmds_when_a_tap_is_given(driver: FirecrackerDriver, disk: Path, tmp_path: Path) -> None:
    vm, api = await _boot(driver, vm_spec(tmp_path, "n", disk, net_tap="tap7"))
    try:
        paths = [p for _, p, _ in api.journal]
        assert paths.index("/network-interfaces/eth0") < paths.index("/mmds/config") < paths.index("/actions")
        assert api.configured["/mmds/config"] == {"version": "V2", "network_interfaces": ["eth0"]}
        boot = api.configured["/boot-source"]
        assert "trenvx.net=10.0.2.15/24,10.0.2.2" in boot["boot_args"]
        await vm.set_metadata({"sandbox": "abc"})
        assert api.configured["/mmds"]["sandbox"] == "abc"
    finally:
        await vm.kill()


def test_describe_error() -> None:
    assert describe_error(400, json.dumps({"fault_message": "bad"}).encode()) == "bad"
    assert describe_error(500, b"") == "HTTP 500 without a body"
