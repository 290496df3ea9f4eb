"""What the cluster keeps in etcd, as typed records, and where (the key layout).

::

    <prefix>/nodes/<node>          NodeRecord, under the node's lease: gone when the node is
    <prefix>/sandboxes/<id>        SandboxEntry, no lease: outlives its node, so a dead node's
                                   sandboxes can be reported lost (and a returning node told
                                   which of them the cluster ended meanwhile)

A node writes its own records only: its node record, and the entries of the sandboxes it owns,
except an entry the cluster ended while its owner was away (``ended_by_cluster``), which any node
may mark so.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel, Field

LOST_REASON = "node_lost"
"""The end reason of a sandbox whose node stopped renewing its lease."""


class NodeCapacity(BaseModel):
    """What placement weighs."""

    cpus: int = 1
    mem_total_mb: int = 0
    mem_headroom_mb: int = 0
    """Memory a create may still take: available memory minus the node's configured headroom and
    the RAM of sandboxes it is starting."""
    sandboxes: int = 0
    max_sandboxes: int = 0


class NodeRecord(BaseModel):
    """One node, as the others see it."""

    name: str
    url: str
    """The node's API (``http://HOST:PORT``)."""
    started_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)
    capacity: NodeCapacity = NodeCapacity()
    templates: dict[str, str] = {}
    """Template name -> input digest of its current build on this node."""
    builds: dict[str, str] = {}
    """Template name -> build id of its current build here (build ids sort by time: a node with an
    older one copies the newer)."""
    aliases: dict[str, str] = {}
    """Alias -> template name, from the builds held here (a node lacking the template still knows
    what a create naming an alias wants)."""
    snapshots: list[str] = []
    """Names of the snapshots held here (their creates are placed only on nodes that hold them)."""
    pools: dict[str, int] = {}
    """Template name -> VMs ready in its pools (warm + hot)."""
    accepting: bool = True
    """False while the node stops: no new creates are placed on it."""

    def has_room(self, mem_mb: int) -> bool:
        cap = self.capacity
        return self.accepting and cap.mem_headroom_mb >= mem_mb and (
            cap.max_sandboxes <= 0 or cap.sandboxes < cap.max_sandboxes)


class SandboxEntry(BaseModel):
    """One sandbox of the cluster: where it runs and what a list shows of it."""

    id: str
    node: str
    template: str
    state: str
    """``running``, ``paused`` or ``exited``."""
    created_at: float
    metadata: dict[str, str] = {}
    info: dict[str, Any] = {}
    """The sandbox as its node's own list shows it (E2B's ListedSandbox, JSON)."""
    end_reason: str | None = None
    ended_at: float | None = None
    ended_by_cluster: bool = False
    """Ended by the cluster while its node was away (killed through another node, or reported lost):
    the node kills it when it comes back."""
    updated_at: float = Field(default_factory=time.time)


class KeyLayout:
    """The etcd keys of one cluster (``prefix``)."""

    def __init__(self, prefix: str = "/trenvx") -> None:
        self.prefix = "/" + prefix.strip("/")

    @property
    def nodes(self) -> str:
        return f"{self.prefix}/nodes/"

    def node(self, name: str) -> str:
        return f"{self.nodes}{name}"

    @property
    def sandboxes(self) -> str:
        return f"{self.prefix}/sandboxes/"

    def sandbox(self, sandbox_id: str) -> str:
        return f"{self.sandboxes}{sandbox_id}"
