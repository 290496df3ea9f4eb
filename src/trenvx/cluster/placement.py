"""Where a create goes: the best of K candidate nodes.

K nodes are sampled from those with room for the sandbox (power of K choices: no node is asked,
and no global order is kept, so placement costs the same at 3 nodes and at 1,000), then ranked:

0. a snapshot's sandboxes go only to the nodes that hold it (snapshots are not copied);
1. nodes with a hot or warm VM of the template in a pool (a create there is the fastest);
2. nodes that hold the template's current build (no copy before the start);
3. more memory headroom first (in steps of :data:`HEADROOM_STEP_MB`);
4. fewer sandboxes first; the remaining ties keep the sample's random order.

The ranked candidates are tried in order: a node that refuses (full, failing) hands the create to
the next one.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from .records import NodeRecord


HEADROOM_STEP_MB = 1024
"""Headroom is compared in steps of this: nodes within a step are equals, and the random sample
orders them (a node 10 MiB ahead would otherwise take every create of a burst)."""


class NoNodeAvailable(RuntimeError):
    """No live node has room for the sandbox; the message says what was looked at."""


def candidates(nodes: Sequence[NodeRecord], template: str, mem_mb: int, k: int,
               rng: random.Random | None = None, digest: str | None = None) -> list[NodeRecord]:
    """Up to ``k`` nodes with room for a sandbox of ``template`` (``mem_mb`` of RAM), best first.
    ``digest``: the template's build wanted (a node with another build of it counts as without).
    Raises :class:`NoNodeAvailable`."""
    if k < 1:
        raise ValueError(f"k must be at least 1 (got {k})")
    holders = [n for n in nodes if template in n.snapshots]
    if holders:  # a snapshot is not copied: its sandboxes start where it is
        nodes = holders
    roomy = [n for n in nodes if n.has_room(mem_mb)]
    if not roomy:
        if not nodes:
            raise NoNodeAvailable("no node of the cluster is alive (none renewed its lease)")
        full = ", ".join(f"{n.name} ({n.capacity.mem_headroom_mb} MiB free, "
                         f"{n.capacity.sandboxes}/{n.capacity.max_sandboxes or '-'} sandboxes"
                         f"{'' if n.accepting else ', stopping'})" for n in list(nodes)[:10])
        raise NoNodeAvailable(f"no node has room for a sandbox of {template} ({mem_mb} MiB): {full}")
    sample = roomy if len(roomy) <= k else (rng or random).sample(roomy, k)

    def score(n: NodeRecord) -> tuple[int, int, int, int]:
        has_build = template in n.templates and (digest is None or n.templates[template] == digest)
        return (1 if n.pools.get(template, 0) > 0 and has_build else 0, 1 if has_build else 0,
                n.capacity.mem_headroom_mb // HEADROOM_STEP_MB, -n.capacity.sandboxes)

    return sorted(sample, key=score, reverse=True)
