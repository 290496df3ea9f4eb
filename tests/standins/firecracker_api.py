"""A stand-in for Firecracker's API (src/firecracker/swagger/firecracker.yaml, docs/snapshotting/
snapshot-support.md): checks method, path, fields and their types, required fields and the order
of calls, and answers 204 / 200 / 400 ``{"fault_message": ...}`` as Firecracker does.

Order rules from the docs: pre-boot resources only before InstanceStart; ``/snapshot/load`` only
on a fresh process (nothing configured but logger and metrics); PATCH /vm only once running;
``/snapshot/create`` only while paused. Relative paths resolve against ``cwd`` (the VMM's cwd).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .http_uds import UdsHttpServer, check_fields

RATE = (dict, False)
SCHEMAS: dict[str, dict[str, Any]] = {
    "MachineConfiguration": {"vcpu_count": (int, True), "mem_size_mib": (int, True), "smt": (bool, False),
                             "track_dirty_pages": (bool, False), "cpu_template": (str, False), "huge_pages": (str, False)},
    "BootSource": {"kernel_image_path": (str, True), "initrd_path": (str, False), "boot_args": (str, False)},
    "Drive": {"drive_id": (str, True), "is_root_device": (bool, True), "partuuid": (str, False),
              "cache_type": (str, False), "is_read_only": (bool, False), "path_on_host": (str, False),
              "rate_limiter": RATE, "io_engine": (str, False), "socket": (str, False)},
    "Vsock": {"guest_cid": (int, True), "uds_path": (str, True), "vsock_id": (str, False)},
    "EntropyDevice": {"rate_limiter": RATE},
    "NetworkInterface": {"iface_id": (str, True), "host_dev_name": (str, True), "guest_mac": (str, False),
                         "mtu": (int, False), "rx_rate_limiter": RATE, "tx_rate_limiter": RATE},
    "MmdsConfig": {"network_interfaces": (list, True), "version": (str, False), "ipv4_address": (str, False),
                   "imds_compat": (bool, False)},
    "InstanceActionInfo": {"action_type": (str, True)},
    "Vm": {"state": (str, True)},
    "SnapshotCreateParams": {"mem_file_path": (str, True), "snapshot_path": (str, True), "snapshot_type": (str, False)},
    "SnapshotLoadParams": {"snapshot_path": (str, True), "enable_diff_snapshots": (bool, False),
                           "track_dirty_pages": (bool, False), "mem_file_path": (str, False),
                           "mem_backend": ({"backend_type": (str, True), "backend_path": (str, True)}, False),
                           "resume_vm": (bool, False), "network_overrides": (list, False),
                           "vsock_override": ({"uds_path": (str, True)}, False), "clock_realtime": (bool, False)},
}
ENUMS = {("InstanceActionInfo", "action_type"): {"FlushMetrics", "InstanceStart", "SendCtrlAltDel"},
         ("Vm", "state"): {"Paused", "Resumed"}, ("SnapshotCreateParams", "snapshot_type"): {"Full", "Diff"},
         ("Drive", "cache_type"): {"Unsafe", "Writeback"}, ("MmdsConfig", "version"): {"V1", "V2"}}
PRE_BOOT = {"/machine-config", "/boot-source", "/drives", "/vsock", "/entropy", "/network-interfaces", "/mmds/config"}


class Fault(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class FirecrackerApi:
    """The state of one Firecracker process as its API shows it."""

    def __init__(self, cwd: Path, version: str = "1.10.1") -> None:
        self.cwd = cwd
        self.version = version
        self.state = "Not started"
        self.configured: dict[str, Any] = {}
        self.loaded_snapshot: dict[str, Any] | None = None
        self.journal: list[tuple[str, str, Any]] = []
        self.inject: dict[tuple[str, str], tuple[int, str]] = {}
        """(method, path) -> (status, fault_message) answered instead, once."""
        self.server: UdsHttpServer | None = None

    async def start(self, socket_path: Path) -> None:
        self.server = UdsHttpServer(socket_path, self.handle)
        await self.server.start()

    async def close(self) -> None:
        if self.server:
            await self.server.close()

    def _path(self, p: str) -> Path:
        return Path(p) if Path(p).is_absolute() else self.cwd / p

    def handle(self, method: str, path: str, raw: bytes) -> tuple[int, Any]:
        body = json.loads(raw) if raw else None
        self.journal.append((method, path, body))
        if (method, path) in self.inject:
            status, msg = self.inject.pop((method, path))
            return status, {"fault_message": msg}
        try:
            return self._route(method, path, body)
        except Fault as f:
            return f.status, {"fault_message": str(f)}

    def _validate(self, schema: str, body: Any) -> dict[str, Any]:
        err = check_fields(body, SCHEMAS[schema], schema)
        if err:
            raise Fault(f"An error occurred when deserializing the json body of a request: {err}.")
        for (s, field), allowed in ENUMS.items():
            if s == schema and field in body and body[field] not in allowed:
                raise Fault(f"unknown variant `{body[field]}` for {schema}.{field}, expected one of {sorted(allowed)}")
        return body

    def _pre_boot(self, key: str) -> None:
        if self.state != "Not started":
            raise Fault("The requested operation is not supported after starting the microVM.")
        if self.loaded_snapshot is not None:
            raise Fault("The requested operation is not supported after loading a snapshot.")
        self.configured.setdefault(key, [])

    def _route(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        base = "/" + path.strip("/").split("/")[0] if path != "/" else "/"
        if path == "/" and method == "GET":
            return 200, {"app_name": "Firecracker", "id": "anonymous-instance", "state": self.state,
                         "vmm_version": self.version}
        if path == "/version" and method == "GET":
            return 200, {"firecracker_version": self.version}
        if method == "PUT" and path == "/machine-config":
            self._pre_boot(path)
            b = self._validate("MachineConfiguration", body)
            if not 1 <= b["vcpu_count"] <= 32:
                raise Fault("The vCPU number is invalid: it can only be 1 or an even number when SMT is enabled.")
            self.configured[path] = b
            return 204, None
        if method == "PUT" and path == "/boot-source":
            self._pre_boot(path)
            b = self._validate("BootSource", body)
            for key in ("kernel_image_path", "initrd_path"):
                if key in b and not self._path(b[key]).is_file():
                    raise Fault(f"The kernel file cannot be opened: No such file or directory (os error 2): {b[key]}")
            self.configured[path] = b
            return 204, None
        if method == "PUT" and base == "/drives":
            self._pre_boot(base)
            b = self._validate("Drive", body)
            if path != f"/drives/{b['drive_id']}":
                raise Fault("The id from the path does not match the id from the body!")
            if "path_on_host" in b and not self._path(b["path_on_host"]).exists():
                raise Fault(f"Unable to create the block device: No such file or directory (os error 2): {b['path_on_host']}")
            self.configured[base].append(b)
            return 204, None
        if method == "PUT" and path == "/vsock":
            self._pre_boot(path)
            b = self._validate("Vsock", body)
            if b["guest_cid"] < 3:
                raise Fault("Invalid guest CID: must be at least 3")
            self.configured[path] = b
            return 204, None
        if method == "PUT" and path == "/entropy":
            self._pre_boot(path)
            self.configured[path] = self._validate("EntropyDevice", body)
            return 204, None
        if method == "PUT" and base == "/network-interfaces":
            self._pre_boot(base)
            b = self._validate("NetworkInterface", body)
            if path != f"/network-interfaces/{b['iface_id']}":
                raise Fault("The id from the path does not match the id from the body!")
            self.configured[base].append(b)
            return 204, None
        if method == "PUT" and path == "/mmds/config":
            self._pre_boot(path)
            b = self._validate("MmdsConfig", body)
            known = {n["iface_id"] for n in self.configured.get("/network-interfaces", [])}
            if not set(b["network_interfaces"]) <= known:
                raise Fault("The list of network interface IDs provided contains at least one ID that does not "
                            "correspond to any existing network interface.")
            self.configured[path] = b
            return 204, None
        if path == "/mmds" and method in ("PUT", "PATCH"):
            if not isinstance(body, dict):
                raise Fault("MMDS data must be a JSON object")
            self.configured.setdefault("/mmds", {}).update(body)
            return 204, None
        if method == "PUT" and path == "/actions":
            b = self._validate("InstanceActionInfo", body)
            if b["action_type"] == "InstanceStart":
                if self.state != "Not started" or self.loaded_snapshot is not None:
                    raise Fault("The requested operation is not supported after starting the microVM.")
                if "/boot-source" not in self.configured:
                    raise Fault("Cannot start microvm without kernel configuration.")
                self.state = "Running"
            return 204, None
        if method == "PATCH" and path == "/vm":
            b = self._validate("Vm", body)
            if self.state == "Not started":
                raise Fault("The requested operation is not supported before starting the microVM.")
            self.state = "Paused" if b["state"] == "Paused" else "Running"
            return 204, None
        if method == "PUT" and path == "/snapshot/create":
            b = self._validate("SnapshotCreateParams", body)
            if self.state != "Paused":
                raise Fault("Cannot create a snapshot: the microVM is not paused.")
            self._path(b["snapshot_path"]).write_bytes(b"FCSNAPSHOT" + json.dumps(self.configured).encode())
            self._path(b["mem_file_path"]).write_bytes(b"\0" * 4096)
            return 204, None
        if method == "PUT" and path == "/snapshot/load":
            b = self._validate("SnapshotLoadParams", body)
            if self.state != "Not started" or self.loaded_snapshot is not None or set(self.configured) - {"/logger", "/metrics"}:
                raise Fault("Loading a microVM snapshot not allowed after configuring boot-specific resources.")
            if ("mem_file_path" in b) == ("mem_backend" in b):
                raise Fault("Exactly one of mem_file_path or mem_backend must be present.")
            if "mem_backend" in b and b["mem_backend"]["backend_type"] not in ("File", "Uffd"):
                raise Fault(f"unknown variant `{b['mem_backend']['backend_type']}`, expected `File` or `Uffd`")
            state_file = self._path(b["snapshot_path"])
            mem = self._path(b["mem_backend"]["backend_path"] if "mem_backend" in b else b["mem_file_path"])
            if not state_file.is_file() or not state_file.read_bytes().startswith(b"FCSNAPSHOT"):
                raise Fault(f"Load snapshot error: Failed to open snapshot file: No such file or directory: {state_file}")
            if not mem.is_file():
                raise Fault(f"Load snapshot error: Failed to open memory backing file: {mem}")
            recorded = json.loads(state_file.read_bytes()[len(b"FCSNAPSHOT"):])
            for drive in recorded.get("/drives", []):  # Firecracker reopens the recorded paths
                if not self._path(drive["path_on_host"]).exists():
                    raise Fault(f"Load snapshot error: block device {drive['path_on_host']} cannot be opened")
            self.loaded_snapshot = b
            self.state = "Running" if b.get("resume_vm") else "Paused"
            return 204, None
        return 400, {"fault_message": f"Invalid request method and/or path: {method} {path}."}
