"""A stand-in for Cloud Hypervisor's REST API (vmm/src/api/openapi/cloud-hypervisor.yaml,
docs/api.md, docs/snapshot_restore.md): checks method, path, VmConfig/RestoreConfig fields and
types, required fields and the VM's state machine, and answers 204 / 200 or an error with the
body recent versions send: a JSON array of the error chain.

``known_restore_modes`` simulates a version: the MemoryRestoreMode variants it deserializes
(an unknown one is a 400 "Failed to deserialize JSON").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .http_uds import UdsHttpServer, check_fields

RATE = (dict, False)
DISK = {"path": (str, False), "readonly": (bool, False), "direct": (bool, False), "iommu": (bool, False),
        "num_queues": (int, False), "queue_size": (int, False), "vhost_user": (bool, False),
        "vhost_socket": (str, False), "rate_limiter_config": RATE, "pci_segment": (int, False), "id": (str, False),
        "serial": (str, False), "image_type": (str, False), "sparse": (bool, False)}
PMEM = {"file": (str, True), "size": (int, False), "iommu": (bool, False), "discard_writes": (bool, False),
        "pci_segment": (int, False), "id": (str, False)}
CONSOLE = {"file": (str, False), "socket": (str, False), "mode": (str, True), "iommu": (bool, False)}
VM_CONFIG = {
    "cpus": ({"boot_vcpus": (int, True), "max_vcpus": (int, True), "topology": (dict, False),
              "kvm_hyperv": (bool, False), "max_phys_bits": (int, False), "affinity": (list, False),
              "features": (dict, False)}, False),
    "memory": ({"size": (int, True), "hotplug_size": (int, False), "mergeable": (bool, False),
                "shared": (bool, False), "hugepages": (bool, False), "prefault": (bool, False),
                "thp": (bool, False), "zones": (list, False)}, False),
    "payload": ({"firmware": (str, False), "kernel": (str, False), "cmdline": (str, False),
                 "initramfs": (str, False)}, True),
    "disks": ([DISK], False),
    "net": ([{"tap": (str, False), "ip": (str, False), "mask": (str, False), "mac": (str, False),
              "id": (str, False), "num_queues": (int, False)}], False),
    "rng": ({"src": (str, True), "iommu": (bool, False)}, False),
    "pmem": ([PMEM], False),
    "serial": (CONSOLE, False),
    "console": (CONSOLE, False),
    "vsock": ({"cid": (int, True), "socket": (str, True), "iommu": (bool, False), "id": (str, False),
               "pci_segment": (int, False)}, False),
}
RESTORE = {"source_url": (str, True), "prefault": (bool, False), "memory_restore_mode": (str, False),
           "resume": (bool, False)}
MODES = {"Off", "Pty", "Tty", "File", "Socket", "Null"}


class ChError(Exception):
    def __init__(self, status: int, *chain: str) -> None:
        super().__init__(": ".join(chain))
        self.status = status
        self.chain = list(chain)


class CloudHypervisorApi:
    """The state of one Cloud Hypervisor process as its API shows it."""

    def __init__(self, version: str = "v54.0.0", known_restore_modes: tuple[str, ...] = ("Copy", "OnDemand", "CopyOnWrite"),
                 pid: int = 1) -> None:
        self.version = version
        self.pid = pid
        """What ``vmm.ping`` reports as the VMM's process id."""
        self.known_restore_modes = known_restore_modes
        self.state: str | None = None  # None: no VM; Created, Running, Paused, Shutdown
        self.config: dict[str, Any] | None = None
        self.restored: dict[str, Any] | None = None
        self.journal: list[tuple[str, str, Any]] = []
        self.inject: dict[tuple[str, str], tuple[int, list[str]]] = {}
        self.server: UdsHttpServer | None = None

    async def start(self, socket_path: Path) -> None:
        self.server = UdsHttpServer(socket_path, self.handle)
        await self.server.start()

    async def close(self) -> None:
        if self.server:
            await self.server.close()

    def handle(self, method: str, path: str, raw: bytes) -> tuple[int, Any]:
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            return 400, ["Failed to deserialize JSON", "expected value"]
        self.journal.append((method, path, body))
        if (method, path) in self.inject:
            status, chain = self.inject.pop((method, path))
            return status, chain
        if not path.startswith("/api/v1/"):
            return 404, ["Not Found"]
        try:
            return self._route(method, path[len("/api/v1/"):], body)
        except ChError as e:
            return e.status, e.chain

    def _need(self, *states: str | None, action: str) -> None:
        if self.state is None and None not in states:
            raise ChError(404, "Error from API", f"The VM could not be {action}", "VM is not created")
        if self.state not in states:
            raise ChError(405 if self.state is not None else 404, "Error from API",
                          f"The VM could not be {action}", f"Invalid VM state transition: {self.state}")

    def _route(self, method: str, ep: str, body: Any) -> tuple[int, Any]:
        gets = {"vmm.ping", "vm.info", "vm.counters"}
        if (method == "GET") != (ep in gets):
            return 400, ["Bad Request"]
        if ep == "vmm.ping":
            return 200, {"build_version": self.version, "version": self.version.lstrip("v"), "pid": self.pid, "features": ["kvm"]}
        if ep == "vm.info":
            if self.config is None:
                raise ChError(404, "Error from API", "The VM information could not be retrieved", "VM is not created")
            return 200, {"config": self.config, "state": self.state}
        if ep == "vm.create":
            if self.state is not None:
                raise ChError(500, "Error from API", "The VM could not be created", "VM is already created")
            err = check_fields(body, VM_CONFIG, "VmConfig")
            if err:
                raise ChError(400, "Failed to deserialize JSON", err)
            for c in ("serial", "console"):
                if c in body and body[c]["mode"] not in MODES:
                    raise ChError(400, "Failed to deserialize JSON", f"unknown variant `{body[c]['mode']}`")
            if not Path(body["payload"].get("kernel", "/nonexistent")).is_file():
                raise ChError(500, "Error from API", "The VM could not be created", "Cannot open kernel image")
            for d in body.get("disks", []) + [{"path": p["file"]} for p in body.get("pmem", [])]:
                if not Path(d["path"]).exists():
                    raise ChError(500, "Error from API", "The VM could not be created",
                                  f"Failed to open disk image {d['path']}: No such file or directory")
            self.config, self.state = body, "Created"
            return 204, None
        if ep == "vm.boot":
            self._need("Created", action="booted")
            self.state = "Running"
            return 204, None
        if ep == "vm.pause":
            self._need("Running", action="paused")
            self.state = "Paused"
            return 204, None
        if ep == "vm.resume":
            self._need("Paused", action="resumed")
            self.state = "Running"
            return 204, None
        if ep == "vm.snapshot":
            self._need("Paused", action="snapshotted")
            err = check_fields(body, {"destination_url": (str, False)}, "VmSnapshotConfig")
            if err:
                raise ChError(400, "Failed to deserialize JSON", err)
            url = body.get("destination_url", "")
            d = Path(url.removeprefix("file://"))
            if not url.startswith("file://") or not d.is_dir():
                raise ChError(500, "Error from API", "The VM could not be snapshotted", f"Invalid snapshot destination {url}")
            (d / "config.json").write_text(json.dumps(self.config))
            (d / "state.json").write_text(json.dumps({"state": "devices"}))
            (d / "memory-ranges").write_bytes(b"\0" * 4096)
            return 204, None
        if ep == "vm.restore":
            if self.state is not None:
                raise ChError(404, "Error from API", "The VM could not be restored", "VM is already created")
            err = check_fields(body, RESTORE, "RestoreConfig")
            if err:
                raise ChError(400, "Failed to deserialize JSON", err)
            mode = body.get("memory_restore_mode", "Copy")
            if mode not in self.known_restore_modes:
                raise ChError(400, "Failed to deserialize JSON",
                              f"unknown variant `{mode}`, expected one of {', '.join(self.known_restore_modes)}")
            d = Path(body["source_url"].removeprefix("file://"))
            try:
                config = json.loads((d / "config.json").read_text())
                (d / "state.json").read_text()
            except (OSError, ValueError) as e:
                raise ChError(500, "Error from API", "The VM could not be restored", f"Cannot read snapshot: {e}") from None
            if not (d / "memory-ranges").is_file():
                raise ChError(500, "Error from API", "The VM could not be restored", "Cannot open memory-ranges")
            for disk in config.get("disks", []) + [{"path": p["file"]} for p in config.get("pmem", [])]:
                if not Path(disk["path"]).exists():
                    raise ChError(500, "Error from API", "The VM could not be restored", f"Failed to open {disk['path']}")
            self.config, self.restored = config, body
            self.state = "Running" if body.get("resume") else "Paused"
            return 204, None
        if ep == "vm.shutdown":
            self._need("Running", "Paused", action="shut down")
            self.state = "Shutdown"
            return 204, None
        if ep == "vmm.shutdown":
            return 204, None
        return 404, ["Not Found"]
