"""A copy of every key under an etcd prefix, kept current by a watch: read them all once, then
follow each change from that revision on; read again whenever the watch breaks (a member lost,
a compacted revision). While it is broken the copy is None, so readers fall back to etcd."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Generic, TypeVar

from .etcd import EtcdClient, EtcdError

log = logging.getLogger(__name__)

T = TypeVar("T")
RETRY_S = 1.0
"""Pause before reading again after the watch broke."""


class WatchedPrefix(Generic[T]):
    """``items``: key (without the prefix) -> parsed value; ``revision``: the store's revision the
    copy has seen. Values that do not parse are left out (``parse`` raises ValueError)."""

    def __init__(self, etcd: EtcdClient, prefix: str, parse: Callable[[bytes], T], what: str) -> None:
        self.etcd = etcd
        self.prefix = prefix
        self.parse = parse
        self.what = what
        self.items: dict[str, T] | None = None
        self.revision = 0

    async def run(self) -> None:
        """Keep the copy current until cancelled."""
        while True:
            try:
                kvs, rev = await self.etcd.range_with_revision(self.prefix)
                items: dict[str, T] = {}
                for kv in kvs:
                    with contextlib.suppress(ValueError):
                        items[kv.key[len(self.prefix):]] = self.parse(kv.value)
                self.items, self.revision = items, rev
                async with contextlib.aclosing(self.etcd.watch(self.prefix, start_revision=rev + 1)) as events:
                    async for ev in events:
                        key = ev.kv.key[len(self.prefix):]
                        if ev.type == "delete":
                            items.pop(key, None)
                        else:
                            with contextlib.suppress(ValueError):
                                items[key] = self.parse(ev.kv.value)
                        self.revision = max(self.revision, ev.revision)
            except asyncio.CancelledError:
                raise
            except EtcdError as e:
                log.debug("cluster: the watch of %s broke: %s", self.what, e)
            except Exception:  # noqa: BLE001 - the copy is read again
                log.exception("cluster: the watch of %s failed", self.what)
            self.items = None
            await asyncio.sleep(RETRY_S)
