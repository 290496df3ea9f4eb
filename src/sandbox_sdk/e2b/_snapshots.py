"""Paginators of ``list_snapshots`` (E2B's shape: ``has_next``, ``next_token``, ``next_items()``).

Example::

    paginator = Sandbox.list_snapshots()
    while paginator.has_next:
        for snap in paginator.next_items():
            print(snap.snapshot_id, snap.names)
"""

from __future__ import annotations

from typing import Any, List, Optional

from .._config import ConnectionConfig
from .._http import ApiClient, make_client
from ..exceptions import SandboxError
from ..models import SnapshotInfo
from .. import _loop


class AsyncSnapshotPaginator:
    """The backend's snapshots, newest first, a page at a time (``limit`` per page, at most 100)."""

    def __init__(self, sandbox_id: Optional[str] = None, limit: Optional[int] = None,
                 next_token: Optional[str] = None, name: Optional[str] = None, *,
                 config: Optional[ConnectionConfig] = None, **connection: Any) -> None:
        self.sandbox_id = sandbox_id
        self.name = name
        self.limit = limit
        self._next_token = next_token
        self._has_next = True
        self._connection = connection
        self._config = config

    @property
    def has_next(self) -> bool:
        """Whether :meth:`next_items` has a page to give."""
        return self._has_next

    @property
    def next_token(self) -> Optional[str]:
        return self._next_token

    async def next_items(self) -> List[SnapshotInfo]:
        """The next page of snapshots (of ``sandbox_id``, named ``name``, when given)."""
        if not self._has_next:
            raise SandboxError("no more snapshots to fetch (has_next is False)")
        config = self._config or ConnectionConfig.resolve(**self._connection)
        async with make_client(config) as client:
            items, token = await ApiClient(client, config).list_snapshots(
                self.sandbox_id, self.name, self.limit, self._next_token, self._connection.get("request_timeout"))
        self._next_token = token
        self._has_next = bool(token)
        return items


class SnapshotPaginator:
    """The synchronous :class:`AsyncSnapshotPaginator`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._async = AsyncSnapshotPaginator(*args, **kwargs)

    @property
    def has_next(self) -> bool:
        return self._async.has_next

    @property
    def next_token(self) -> Optional[str]:
        return self._async.next_token

    def next_items(self) -> List[SnapshotInfo]:
        items: List[SnapshotInfo] = _loop.runner().run(self._async.next_items())
        return items
