"""trenvx's Python SDK: sandboxes (VMs restored from snapshots) over the backend's HTTP API.

Two surfaces, one implementation:

* ``sandbox_sdk.Sandbox`` (also ``sandbox_sdk.sandbox.Sandbox``): TrEnv-X's asynchronous API,
  ``await Sandbox.create(template=..., target_addr=...)``, ``sandbox.process.start(...)``,
  ``sandbox.filesystem.*``, ``sandbox.terminal.start(...)`` (a :class:`Terminal`).
* ``sandbox_sdk.e2b.Sandbox`` (synchronous) and ``sandbox_sdk.e2b.AsyncSandbox``: E2B's
  API, ``Sandbox.create()``, ``sandbox.commands.run(...)``, ``sandbox.files.*``,
  ``sandbox.pty.*``. Also exported here as ``SyncSandbox`` and ``AsyncSandbox``.

Errors are in :mod:`sandbox_sdk.exceptions` (and exported here), including TrEnv-X's names
(``ProcessException``, ``FilesystemException``, ``TerminalException``, ``RpcException``,
``CurrentWorkingDirectoryDoesntExistException``).

Code interpreter (sandboxes of the ``code-interpreter`` template): ``sandbox.run_code(...)`` and
the code contexts on the E2B-style sandboxes (E2B's ``e2b_code_interpreter`` API), and TrEnv-X's
``sandbox_sdk.code_interpreter.CodeInterpreter`` (``await CodeInterpreter.create()``,
``sandbox.notebook.exec_cell(...)``).
"""

from . import code_interpreter, exceptions
from .e2b import AsyncCommandHandle, AsyncSandbox, CommandHandle
from .e2b import Sandbox as SyncSandbox
from .exceptions import *  # noqa: F401,F403
from .exceptions import __all__ as _errors
from .models import (
    ALL_TRAFFIC,
    CommandResult,
    EntryInfo,
    FilesystemEventType,
    FileType,
    ProcessInfo,
    PtySize,
    SandboxInfo,
    SandboxNetworkInfo,
    SandboxNetworkOpts,
    SandboxNetworkUpdate,
    TemplateInfo,
    WriteEntry,
    WriteInfo,
)
from .sandbox import (
    EnvVars,
    FilesystemEvent,
    FilesystemManager,
    Process,
    ProcessManager,
    ProcessMessage,
    ProcessOutput,
    RunningSandbox,
    Sandbox,
    Terminal,
    TerminalManager,
    TerminalOutput,
)

__version__ = "0.1.0"

__all__ = [
    "Sandbox",
    "SyncSandbox",
    "AsyncSandbox",
    "CommandHandle",
    "AsyncCommandHandle",
    "RunningSandbox",
    "Process",
    "ProcessManager",
    "ProcessMessage",
    "ProcessOutput",
    "EnvVars",
    "Terminal",
    "TerminalManager",
    "TerminalOutput",
    "FilesystemEvent",
    "FilesystemManager",
    "CommandResult",
    "EntryInfo",
    "FilesystemEventType",
    "FileType",
    "ProcessInfo",
    "PtySize",
    "SandboxInfo",
    "SandboxNetworkInfo",
    "SandboxNetworkOpts",
    "SandboxNetworkUpdate",
    "ALL_TRAFFIC",
    "TemplateInfo",
    "WriteEntry",
    "WriteInfo",
    "exceptions",
    "code_interpreter",
    *_errors,
]
