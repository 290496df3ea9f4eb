"""TrEnv-X's asynchronous sandbox API: ``from sandbox_sdk.sandbox import Sandbox``.

Example::

    import asyncio
    from sandbox_sdk.sandbox import Sandbox

    async def main():
        ci = await Sandbox.create(template="default-sandbox", target_addr="127.0.0.1")
        p = await ci.process.start("python -c \\"print('Hello World')\\"")
        await p.wait()
        print(p.stdout)
        await ci.close()

    asyncio.run(main())
"""

from .exception import (
    CurrentWorkingDirectoryDoesntExistException,
    FilesystemException,
    ProcessException,
    RpcException,
    SandboxException,
    TerminalException,
)
from .filesystem import DirWatcher, FileInfo, FilesystemEvent, FilesystemManager, FilesystemOperation
from .main import TIMEOUT, RunningSandbox, Sandbox
from .process import EnvVars, Process, ProcessManager, ProcessMessage, ProcessOutput
from .terminal import Terminal, TerminalManager, TerminalOutput

__all__ = [
    "Sandbox",
    "RunningSandbox",
    "Process",
    "ProcessManager",
    "ProcessMessage",
    "ProcessOutput",
    "EnvVars",
    "Terminal",
    "TerminalManager",
    "TerminalOutput",
    "FilesystemManager",
    "FileInfo",
    "FilesystemEvent",
    "FilesystemOperation",
    "DirWatcher",
    "SandboxException",
    "ProcessException",
    "FilesystemException",
    "TerminalException",
    "RpcException",
    "CurrentWorkingDirectoryDoesntExistException",
    "TIMEOUT",
]
