"""Shared fixtures. End-to-end tests boot real VMs; the test template is built once per run.

- ``e2e_config``:   the Config of tests/e2e/e2e_config.toml (data_root shared with the demo,
                     so unchanged inputs are not rebuilt: see the input digest in the manifest)
- ``test_template``: the name of the built end-to-end template (built on first use)
- ``manager``:      a SandboxManager for the test session; kills what is left at the end
- ``vmm_managers``: SandboxManagers per VMM (``await vmm_managers.get(vmm_type)``; QEMU's is
                     ``manager``), for tests parametrized with tests/vmm_matrix.py's ``vmm_params()``
                     (a VMM unusable here is skipped with ``trenvx doctor``'s reason)
- ``backend_url``:  a real ``trenvx serve`` for the session; ``keyed_backend_url`` one with an API key
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import pytest
import pytest_asyncio

from tests.vmm_matrix import config_for_vmm
from trenvx.config import Config, VmmType, load_config

if TYPE_CHECKING:
    from trenvx.sandbox.manager import SandboxManager

E2E_CONFIG = Path(__file__).resolve().parent / "e2e" / "e2e_config.toml"
E2E_TEMPLATE = "e2e-test"
VMM_PROCESS_NAMES = ("qemu-system", "firecracker", "cloud-hyperviso")  # comm is cut at 15 characters


def qemu_pids() -> set[int]:
    """VMM processes (QEMU, Firecracker, Cloud Hypervisor) started by this process tree (other test
    runs on the machine are not ours)."""
    me = os.getpid()
    pids = set()
    for p in psutil.process_iter(["name"]):
        if (p.info["name"] or "").startswith(VMM_PROCESS_NAMES):
            try:
                if p.status() == psutil.STATUS_ZOMBIE:  # already dead, only not yet reaped by its parent
                    continue
                if me in {a.pid for a in p.parents()} or p.ppid() == 1:
                    pids.add(p.pid)
            except psutil.Error:
                continue
    return pids


def network_leftovers() -> dict[str, list[str]]:
    """Slot namespaces, host-side veths, slot claims and host nftables tables of trenvx present now."""
    import subprocess

    from trenvx.network import netns
    from trenvx.network.slot import CLAIMS_DIR, HOST_IF_PREFIX, NETNS_PREFIX

    links = [n for n in psutil.net_if_addrs() if n.startswith(HOST_IF_PREFIX) and n[len(HOST_IF_PREFIX):].isdigit()]
    claims = sorted(p.name for p in CLAIMS_DIR.iterdir()) if CLAIMS_DIR.is_dir() else []
    try:
        tables = [t for t in subprocess.run(["nft", "list", "tables"], capture_output=True, text=True,
                                            timeout=10).stdout.split() if t.startswith("trenvx_")]
    except (OSError, subprocess.SubprocessError):
        tables = []
    return {"netns": netns.names(NETNS_PREFIX), "links": links, "claims": claims, "tables": tables}


@pytest.fixture(scope="session")
def e2e_config() -> Config:
    return load_config(E2E_CONFIG)


@pytest_asyncio.fixture(scope="session")
async def test_template(e2e_config: Config) -> str:
    from trenvx.template.builder import TemplateBuilder

    result = await TemplateBuilder(e2e_config).build(E2E_TEMPLATE, force=bool(os.environ.get("TRENVX_TEST_REBUILD")))
    print(f"\ntest template {E2E_TEMPLATE}: {'reused' if result.skipped else 'built'} {result.build.build_id} "
          f"{result.build.manifest.stage_seconds}")
    return E2E_TEMPLATE


@pytest_asyncio.fixture(scope="session")
async def manager(e2e_config: Config, test_template: str) -> AsyncIterator["SandboxManager"]:  # noqa: F821
    from trenvx.sandbox.manager import SandboxManager

    async with SandboxManager(e2e_config) as m:
        yield m


class VmmManagers:
    """A SandboxManager per VMM for the session, made on first use: QEMU's is the session's
    ``manager``; another VMM's runs the test template built for it (tests/vmm_matrix.py)."""

    def __init__(self, e2e_config: Config, template: str, qemu: SandboxManager) -> None:
        self.e2e_config = e2e_config
        self.template = template
        self._managers: dict[VmmType, SandboxManager] = {VmmType.qemu: qemu}
        self._own: list[SandboxManager] = []

    async def get(self, vmm: VmmType) -> SandboxManager:
        from trenvx.sandbox.manager import SandboxManager
        from trenvx.template.builder import TemplateBuilder

        if vmm not in self._managers:
            cfg = config_for_vmm(self.e2e_config, vmm, self.template)
            result = await TemplateBuilder(cfg).build(
                cfg.default_template, force=bool(os.environ.get("TRENVX_TEST_REBUILD"))
            )
            print(f"\ntest template {cfg.default_template}: {'reused' if result.skipped else 'built'} "
                  f"{result.build.build_id} {result.build.manifest.stage_seconds}")
            m = SandboxManager(cfg)
            await m.start()
            self._own.append(m)
            self._managers[vmm] = m
        return self._managers[vmm]

    async def aclose(self) -> None:
        for m in self._own:
            await m.close()


@pytest_asyncio.fixture(scope="session")
async def vmm_managers(e2e_config: Config, test_template: str, manager: SandboxManager) -> AsyncIterator[VmmManagers]:
    """Use with ``@pytest.mark.parametrize("vmm_type", vmm_params())``: ``await vmm_managers.get(vmm_type)``."""
    managers = VmmManagers(e2e_config, test_template, manager)
    try:
        yield managers
    finally:
        await managers.aclose()


@pytest.fixture(scope="session")
def backend(e2e_config: Config, test_template: str, tmp_path_factory: pytest.TempPathFactory) -> "Iterator[ServerProc]":  # noqa: F821
    """A real ``trenvx serve`` for the session (own data_root, sharing the built templates)."""
    from tests.e2e.server_helpers import running_server

    with running_server(tmp_path_factory.mktemp("backend"), e2e_config, template=test_template) as srv:
        yield srv


@pytest.fixture(scope="session")
def backend_url(backend: "ServerProc") -> str:  # noqa: F821
    """The session backend's base URL, e.g. ``http://127.0.0.1:40123``."""
    return backend.url


@pytest.fixture(scope="session")
def keyed_backend_url(e2e_config: Config, test_template: str, tmp_path_factory: pytest.TempPathFactory) -> "Iterator[str]":  # noqa: F821
    """A second backend that requires the API key ``right-key``."""
    from tests.e2e.server_helpers import running_server

    with running_server(tmp_path_factory.mktemp("keyed"), e2e_config, template=test_template, api_key="right-key") as srv:
        yield srv.url


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind() -> "Iterator[None]":  # noqa: F821
    """After the whole run: no VMM process, sandbox directory or build staging dir is left."""
    before = qemu_pids()
    net_before = network_leftovers()
    yield
    left = qemu_pids() - before
    net_left = {k: sorted(set(v) - set(net_before[k])) for k, v in network_leftovers().items()}
    assert not any(net_left.values()), f"network slots left behind: {net_left}"
    try:
        cfg = load_config(E2E_CONFIG)
    except Exception:  # noqa: BLE001
        return
    sandboxes = cfg.data_root / "sandboxes"
    left_dirs = sorted(p.name for p in sandboxes.iterdir()) if sandboxes.is_dir() else []
    staging = sorted(str(p) for p in (cfg.data_root / "templates").glob("*/.*.partial"))
    assert not left, f"VMM processes left running: {sorted(left)}"
    assert not left_dirs, f"sandbox directories left behind: {left_dirs}"
    assert not staging, f"build staging directories left behind: {staging}"
