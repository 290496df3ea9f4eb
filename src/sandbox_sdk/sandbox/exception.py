"""TrEnv-X's exception names, mapped onto the SDK's typed errors (:mod:`sandbox_sdk.exceptions`)."""

from ..exceptions import *  # noqa: F401,F403
from ..exceptions import PathNotFoundError, RpcError, SandboxError, SandboxException  # noqa: F401

ProcessException = SandboxError
FilesystemException = SandboxError
TerminalException = SandboxError
RpcException = RpcError
CurrentWorkingDirectoryDoesntExistException = PathNotFoundError
