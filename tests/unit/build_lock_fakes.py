"""A template build whose expensive stages are faked, run as its own process by
tests/unit/test_build_lock.py: ``python -m tests.unit.build_lock_fakes SPEC_JSON``.

Everything of :meth:`TemplateBuilder.build` is real (inputs, lock, reuse, staging, publication)
except ``_build``, which writes small stand-ins for the images and the snapshot, records its start
and end in a shared journal, and waits for a gate file before it publishes, so that the test can
hold one build in the middle while it starts another.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from trenvx.config import Config, TemplateConfig
from trenvx.template.builder import BuildResult, TemplateBuilder
from trenvx.template.store import MEMORY, ROOTFS, VMSTATE, MachineRecord, TemplateManifest


def template(name: str, variant: str) -> TemplateConfig:
    """A template whose inputs differ by ``variant`` (its ready command)."""
    return TemplateConfig(name=name, docker_img="debian:bookworm", overlay=False, ready_cmd=f"true {variant}")


def journal(path: Path, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


class FakeStagesBuilder(TemplateBuilder):
    def __init__(self, config: Config, journal_path: Path, gate: Path) -> None:
        super().__init__(config)
        self.journal_path = journal_path
        self.gate = gate

    async def _build(self, tpl: TemplateConfig, build_id: str, staging: Path, digest: str,
                     inputs: dict[str, str], *, force: bool = False) -> BuildResult:
        journal(self.journal_path, f"start {os.getpid()} {build_id}")
        for name in (ROOTFS, MEMORY, VMSTATE):
            (staging / name).write_bytes(f"{build_id} {name}".encode())
        while not self.gate.exists():
            await asyncio.sleep(0.05)
        # Nothing else touched this build's staging directory meanwhile.
        for name in (ROOTFS, MEMORY, VMSTATE):
            assert (staging / name).read_bytes() == f"{build_id} {name}".encode(), name
        manifest = TemplateManifest(
            name=tpl.name, build_id=build_id, created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            vmm_type=tpl.vmm_type.value, input_digest=digest, inputs=inputs, config=tpl.model_dump(mode="json"),
            machine=MachineRecord(vcpu=1, mem_mb=256, accelerator="tcg", kernel="/k", initrd="/i", cmdline="",
                                  tcg_tb_size_mb=64),
            accelerator_reason="fake", kernel_version="fake", versions={}, sizes={}, stage_seconds={},
            rootfs_source="fake",
        )
        build = self.store.publish(tpl.name, staging, manifest)
        journal(self.journal_path, f"end {os.getpid()} {build_id}")
        return BuildResult(build, skipped=False)


def builder(spec: dict[str, Any]) -> FakeStagesBuilder:
    cfg = Config(data_root=Path(spec["data_root"]),
                 template={spec["name"]: template(spec["name"], spec.get("variant", "a"))})
    return FakeStagesBuilder(cfg, Path(spec["journal"]), Path(spec["gate"]))


def main() -> None:
    spec = json.loads(sys.argv[1])
    logging.basicConfig(filename=spec["log"], level=logging.INFO, format="%(name)s: %(message)s")
    result = asyncio.run(builder(spec).build(spec["name"], force=spec.get("force", False)))
    print(json.dumps({"skipped": result.skipped, "build_id": result.build.build_id}))


if __name__ == "__main__":
    main()
