"""TrEnv-X's exception names, mapped onto the SDK's typed errors (:mod:`sandbox_sdk.exceptions`)."""

from ..exceptions import *  # noqa: F401,F403
from ..exceptions import (  # noqa: F401 - TrEnv-X's names, the same classes as sandbox_sdk.exceptions
    CurrentWorkingDirectoryDoesntExistException,
    FilesystemException,
    PathNotFoundError,
    ProcessException,
    RpcError,
    RpcException,
    SandboxError,
    SandboxException,
    TerminalException,
)
