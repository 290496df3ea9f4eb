"""The sandboxes of one node: create from a template, find, run commands in, kill.

This is the Python API below the HTTP server::

    async with SandboxManager(load_config("configs/example_config.toml")) as manager:
        sb = await manager.create("default-sandbox")
        result = await sb.run("python3 -c \\"print('Hello World')\\"")
        print(result.stdout)          # b'Hello World\\n'
        await manager.kill(sb.id)
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from ..config import Config
from ..guest.client import AgentClient, CommandResult
from ..layout import DataRoot
from ..template.store import TemplateBuild, TemplateStore
from ..vmm.process import memory_of
from .restore import RestoredVm, SnapshotRestore

log = logging.getLogger(__name__)


class SandboxNotFound(KeyError):
    def __str__(self) -> str:
        return f"sandbox {self.args[0]!r} does not exist (it was killed, timed out, or never existed)"


@dataclass
class Sandbox:
    """One running sandbox. ``agent`` talks to the guest agent with this sandbox's access token."""

    restored: RestoredVm
    template: str
    created_at: float = field(default_factory=time.time)
    metadata: dict[str, str] = field(default_factory=dict)
    env_vars: dict[str, str] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.restored.sandbox_id

    @property
    def agent(self) -> AgentClient:
        return self.restored.agent

    @property
    def build(self) -> TemplateBuild:
        return self.restored.build

    @property
    def pid(self) -> int:
        return self.restored.vm.pid

    @property
    def agent_url(self) -> str:
        return self.restored.vm.agent_url

    @property
    def access_token(self) -> str:
        return self.restored.access_token

    @property
    def start_times(self) -> dict[str, float]:
        return self.restored.times

    def is_alive(self) -> bool:
        return self.restored.vm.is_alive()

    def memory(self) -> tuple[int, int]:
        """(RSS, PSS) of the sandbox's VMM process in bytes."""
        return memory_of(self.pid)

    async def run(self, cmd: str | list[str], **kwargs: Any) -> CommandResult:
        return await self.agent.run(cmd, **kwargs)


class SandboxManager:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.data_root = DataRoot(config.data_root).ensure()
        self.templates = TemplateStore(self.data_root)
        self.restorer = SnapshotRestore(config, self.data_root)
        self._sandboxes: dict[str, Sandbox] = {}
        self._lock = asyncio.Lock()

    async def __aenter__(self) -> "SandboxManager":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def create(
        self,
        template: str | None = None,
        *,
        env_vars: dict[str, str] | None = None,
        metadata: dict[str, str] | None = None,
    ) -> Sandbox:
        """Restore a new sandbox from the current build of ``template`` (default: the config's)."""
        name = template or self.config.default_template
        build = self.templates.current(name)
        restored = await self.restorer.restore(build, env_vars=env_vars)
        sb = Sandbox(restored, template=name, metadata=dict(metadata or {}), env_vars=dict(env_vars or {}))
        self._sandboxes[sb.id] = sb
        log.info("sandbox %s created from %s in %.1f ms %s", sb.id, build.build_id,
                 sum(restored.times.values()) * 1000, {k: round(v * 1000, 1) for k, v in restored.times.items()})
        return sb

    def get(self, sandbox_id: str) -> Sandbox:
        try:
            return self._sandboxes[sandbox_id]
        except KeyError:
            raise SandboxNotFound(sandbox_id) from None

    def list(self) -> list[Sandbox]:
        return list(self._sandboxes.values())

    async def kill(self, sandbox_id: str) -> None:
        sb = self._sandboxes.pop(sandbox_id, None)
        if sb is None:
            raise SandboxNotFound(sandbox_id)
        await SnapshotRestore.destroy(sb.restored)
        log.info("sandbox %s killed", sandbox_id)

    async def close(self) -> None:
        """Kill every sandbox and remove its files."""
        ids = list(self._sandboxes)
        await asyncio.gather(*(self.kill(i) for i in ids), return_exceptions=True)
