"""The E2B-style surface: ``Sandbox`` (synchronous) and ``AsyncSandbox`` with one shape.

Code written for E2B's Python SDK mostly runs unchanged with
``from sandbox_sdk.e2b import Sandbox, AsyncSandbox``::

    from sandbox_sdk.e2b import Sandbox

    with Sandbox.create() as sandbox:
        result = sandbox.commands.run("echo hello")
        print(result.stdout)

and so does code written for E2B's ``e2b_code_interpreter``: every sandbox has ``run_code`` and
the code contexts, which need a sandbox of the ``code-interpreter`` template::

    with Sandbox.create("code-interpreter") as sandbox:
        print(sandbox.run_code("x = 41\nx + 1").text)  # 42
"""

from ..exceptions import *  # noqa: F401,F403 - E2B code imports errors from the same place
from ..exceptions import __all__ as _errors
from .._code_interpreter import (
    Chart,
    Context,
    Execution,
    ExecutionError,
    Logs,
    MIMEType,
    OutputMessage,
    Result,
    RunCodeLanguage,
)
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
    "Chart",
    "Context",
    "Execution",
    "ExecutionError",
    "Logs",
    "MIMEType",
    "OutputMessage",
    "Result",
    "RunCodeLanguage",
    *_errors,
]
