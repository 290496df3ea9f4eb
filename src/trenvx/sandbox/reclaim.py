"""MemoryReclaim: take back host memory that running sandboxes hold but do not need.

Guests give back the memory they free on their own (virtio-balloon free page reporting, see
``vmm/qemu.py``). What they keep is their page cache and reclaimable kernel caches. Reclaiming a
sandbox asks its guest to drop them; free page reporting then returns the freed blocks to the
host within a few seconds. A guest whose page cache is small is left alone. It is TrEnv-X's "deactivate" for a sandbox
that keeps running: nothing is lost, files are read again from disk (the template's image is
shared with DAX and never cached in a guest anyway) when the sandbox needs them.

The server reclaims on demand (``POST /sandboxes/{id}/reclaim``) and before refusing a create
for lack of memory (the sandboxes not reclaimed in the last ``RECLAIM_AGAIN_S``).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Protocol

from ..guest.client import AgentClient

DROP_CACHES = ["/bin/sh", "-c", "sync; echo 1 >/proc/sys/vm/drop_caches"]
"""The guest's page cache only. Measured with code-interpreter (N=10, after numpy + pandas): the
guest had nothing worth reclaiming (its root is DAX, its freed memory already reported), and
dropping everything (``3``: slab too) and compacting cost 10 MiB more PSS per sandbox than leaving
it alone: compaction moves pages still shared with the template into new places, dropped dentries
and inodes come back as the sandbox's own pages, and the command itself costs memory. So a guest
is only asked when it reports ``WORTH_BYTES`` of page cache (its agent's ``/metrics``)."""
WORTH_BYTES = 16 << 20
COMMAND_TIMEOUT_S = 60.0
SETTLE_S = 8.0
"""At most this long to watch the VMM's memory fall: the guest reports free blocks ~2 s after freeing."""
STEADY_S = 1.5
"""After the first drop, PSS steady this long ends the wait."""
PASS_DEADLINE_S = 20.0
"""A reclaim pass before refusing a create stops after this long (creates wait for it)."""
RECLAIM_AGAIN_S = 60.0
"""Before refusing a create, sandboxes reclaimed more recently than this are skipped."""


class Reclaimable(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def agent(self) -> AgentClient: ...

    def memory(self) -> tuple[int, int]: ...

    async def run(self, cmd: str | list[str], **kwargs: Any) -> object: ...


class ReclaimFailed(RuntimeError):
    """The guest did not carry out the reclaim (its agent failed or did not answer)."""


@dataclass(frozen=True)
class Reclaimed:
    sandbox_id: str
    pss_before: int
    pss_after: int
    seconds: float

    @property
    def freed(self) -> int:
        return max(0, self.pss_before - self.pss_after)


async def reclaim(sb: Reclaimable, settle_s: float = SETTLE_S) -> Reclaimed:
    """Drop the guest's caches, then wait (at most ``settle_s``) until its VMM's PSS stops falling."""
    t0 = time.perf_counter()
    before = sb.memory()[1]
    try:
        cache = int((await sb.agent.metrics()).get("mem_cache", 0))
        if cache < WORTH_BYTES:  # nothing worth a command in the guest
            return Reclaimed(sb.id, before, sb.memory()[1], time.perf_counter() - t0)
        result = await sb.run(DROP_CACHES, timeout=COMMAND_TIMEOUT_S, user="root")
    except Exception as e:  # noqa: BLE001 - the agent's errors, timeouts, connection failures
        raise ReclaimFailed(f"the guest agent of sandbox {sb.id} did not drop its caches: {type(e).__name__}: {e}") from e
    code = getattr(result, "exit_code", 0)
    if code != 0:
        raise ReclaimFailed(f"dropping the caches in sandbox {sb.id} failed with exit code {code}: "
                            f"{getattr(result, 'stderr', b'')!r:.300}")
    # The guest reports free blocks about 2 s after freeing them, and then in batches: wait for
    # the first drop, then until PSS has been steady for a while (or ``settle_s`` has passed).
    t_cmd = time.perf_counter()
    last, steady_since, dropped = sb.memory()[1], t_cmd, False
    while time.perf_counter() - t_cmd < settle_s:
        await asyncio.sleep(0.25)
        now = sb.memory()[1]
        if now < last - (256 << 10):
            last, steady_since, dropped = now, time.perf_counter(), True
        elif dropped and time.perf_counter() - steady_since > STEADY_S:
            break
    return Reclaimed(sb.id, before, sb.memory()[1], time.perf_counter() - t0)


__all__ = ["PASS_DEADLINE_S", "RECLAIM_AGAIN_S", "ReclaimFailed", "Reclaimed", "reclaim"]
