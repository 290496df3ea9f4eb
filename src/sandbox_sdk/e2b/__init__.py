"""The E2B-style surface: ``Sandbox`` (synchronous) and ``AsyncSandbox`` with one shape.

Code written for E2B's Python SDK mostly runs unchanged with
``from sandbox_sdk.e2b import Sandbox, AsyncSandbox``::

    from sandbox_sdk.e2b import Sandbox

    with Sandbox.create() as sandbox:
        result = sandbox.commands.run("echo hello")
        print(result.stdout)
"""

from ..exceptions import *  # noqa: F401,F403 - E2B code imports errors from the same place
from ..exceptions import __all__ as _errors
from .._lifecycle import SandboxLifecycle
from .._network import SandboxNetworkSelectorContext
from ..models import (
    ALL_TRAFFIC,
    CommandResult,
    EntryInfo,
    FilesystemEvent,
    FilesystemEventType,
    FileType,
    ProcessInfo,
    PtySize,
    SandboxInfo,
    SandboxInfoLifecycle,
    SandboxMetrics,
    SandboxNetworkInfo,
    SandboxNetworkOpts,
    SandboxNetworkUpdate,
    SnapshotInfo,
    TemplateInfo,
    WriteEntry,
    WriteInfo,
)
from ._async import AsyncCommandHandle, AsyncCommands, AsyncFilesystem, AsyncPty, AsyncSandbox, AsyncWatchHandle
from ._snapshots import AsyncSnapshotPaginator, SnapshotPaginator
from ._sync import CommandHandle, Commands, Filesystem, Pty, Sandbox, WatchHandle

__all__ = [
    "Sandbox",
    "AsyncSandbox",
    "CommandHandle",
    "AsyncCommandHandle",
    "Commands",
    "AsyncCommands",
    "Filesystem",
    "AsyncFilesystem",
    "Pty",
    "AsyncPty",
    "WatchHandle",
    "AsyncWatchHandle",
    "SandboxLifecycle",
    "SandboxInfoLifecycle",
    "CommandResult",
    "EntryInfo",
    "FilesystemEvent",
    "FilesystemEventType",
    "FileType",
    "ProcessInfo",
    "PtySize",
    "SandboxInfo",
    "SandboxMetrics",
    "SandboxNetworkInfo",
    "SandboxNetworkOpts",
    "SandboxNetworkSelectorContext",
    "SandboxNetworkUpdate",
    "SnapshotInfo",
    "SnapshotPaginator",
    "AsyncSnapshotPaginator",
    "ALL_TRAFFIC",
    "TemplateInfo",
    "WriteEntry",
    "WriteInfo",
    *_errors,
]
