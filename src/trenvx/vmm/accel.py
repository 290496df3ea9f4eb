"""Which accelerator VMs run under: KVM where the host offers it and the guest kernel boots, else TCG.

The decision is made by probing once (boot the guest kernel under KVM to an initramfs that prints
``TRENVX-PROBE-OK`` and powers off) and cached under ``data_root/cache`` keyed by the host kernel,
the kvm modules loaded and the guest kernel. Hosts whose /dev/kvm comes from ``kvm_pvm`` run only
PVM-capable guest kernels, so stock kernels go to TCG there without a probe.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import platform
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from .process import VmmProcess

log = logging.getLogger(__name__)

PROBE_MARK = "TRENVX-PROBE-OK"
PROBE_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class AcceleratorChoice:
    name: Literal["kvm", "tcg"]
    reason: str


def _kvm_modules() -> list[str]:
    """The kvm modules of the host kernel, loadable or built in (/sys/module lists both)."""
    try:
        return sorted(p.name for p in Path("/sys/module").iterdir() if p.name.startswith("kvm"))
    except OSError:
        return []


def kvm_obstacle() -> str | None:
    """Why KVM cannot run a stock guest kernel here, or None if it might."""
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm does not exist (no hardware virtualization, or the kvm module is not loaded)"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not readable and writable by this user (add the user to group kvm)"
    mods = _kvm_modules()
    if "kvm_pvm" in mods and not {"kvm_intel", "kvm_amd"} & set(mods):
        return (
            "/dev/kvm is PVM-only (module kvm_pvm): stock guest kernels triple-fault under it "
            "(a PVM-capable guest kernel would be needed; trenvx does not build one yet)"
        )
    return None


async def _probe_kvm(qemu_binary: str, kernel: Path, initrd: Path) -> tuple[bool, str]:
    with tempfile.TemporaryDirectory(prefix="trenvx-accel-") as d:
        console = Path(d) / "console.log"
        argv = [
            qemu_binary, "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-machine", "q35", "-accel", "kvm", "-cpu", "host,-arch-capabilities", "-m", "256M",
            "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", "console=ttyS0 panic=-1 trenvx.probe=1",
            "-serial", f"file:{console}",
        ]
        proc = await VmmProcess.spawn(argv, Path(d) / "vmm.log")
        try:
            await asyncio.wait_for(proc.wait(), PROBE_TIMEOUT_S)
        except asyncio.TimeoutError:
            pass
        finally:
            await proc.kill()
        text = console.read_text(errors="replace") if console.exists() else ""
        if PROBE_MARK in text:
            return True, "the guest kernel boots under KVM"
        return False, f"the guest kernel did not boot under KVM (QEMU: {proc.output_tail(3) or 'no output'})"


async def choose_accelerator(
    setting: str, qemu_binary: str, kernel: Path, initrd: Path, cache_dir: Path
) -> AcceleratorChoice:
    """Decide between KVM and TCG for ``setting`` (auto, kvm or tcg), logging the reason."""
    if setting == "tcg":
        choice = AcceleratorChoice("tcg", "TCG chosen in the config ([vmm] accelerator = \"tcg\")")
    else:
        obstacle = kvm_obstacle()
        if obstacle and setting == "kvm":
            raise RuntimeError(f"[vmm] accelerator = \"kvm\" but {obstacle}")
        if obstacle:
            choice = AcceleratorChoice("tcg", obstacle)
        else:
            key = hashlib.sha256(
                json.dumps([platform.release(), _kvm_modules(), str(kernel), kernel.stat().st_size]).encode()
            ).hexdigest()[:16]
            cached = cache_dir / f"accel-{key}.json"
            if cached.exists():
                choice = AcceleratorChoice(**json.loads(cached.read_text()))
            else:
                ok, why = await _probe_kvm(qemu_binary, kernel, initrd)
                if not ok and setting == "kvm":
                    raise RuntimeError(f"[vmm] accelerator = \"kvm\" but {why}")
                choice = AcceleratorChoice("kvm" if ok else "tcg", why)
                cache_dir.mkdir(parents=True, exist_ok=True)
                cached.write_text(json.dumps(asdict(choice)))
    if choice.name == "tcg":
        log.warning("VMs run under TCG (software emulation, slower): %s", choice.reason)
    else:
        log.info("VMs run under KVM: %s", choice.reason)
    return choice
