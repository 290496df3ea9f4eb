"""TrEnv-X's ``Sandbox``: asynchronous, created with ``await Sandbox.create(...)``.

Example::

    import asyncio
    from sandbox_sdk import Sandbox

    async def main():
        sandbox = await Sandbox.create(template="default-sandbox", target_addr="127.0.0.1")
        p = await sandbox.process.start("python3 -c \\"print('Hello World')\\"")
        await p.wait()
        print(p.stdout)
        await sandbox.close()

    asyncio.run(main())
"""

from __future__ import annotations

import os
import posixpath
from typing import IO, Any, Callable, List, Mapping, Optional, Union

from .._config import ConnectionConfig
from .._dual import dual_method
from .._http import ApiClient, make_client
from .._lifecycle import SandboxLifecycle
from ..e2b._async import AsyncSandbox
from ..exceptions import SandboxError
from ..models import SandboxInfo, SandboxNetworkOpts, SandboxNetworkUpdate, TemplateInfo
from .filesystem import FilesystemManager
from .process import EnvVars, ProcessManager, ProcessMessage
from .terminal import TerminalManager

#: Default timeout of one request of this surface, in seconds (TrEnv-X's ``TIMEOUT``).
TIMEOUT = 60

#: TrEnv-X's name for a listed sandbox.
RunningSandbox = SandboxInfo


class Sandbox:
    """A TrEnv-X sandbox (asynchronous API).

    Members: ``id``, ``process`` (start processes, get :class:`Process` objects with
    line-by-line output), ``terminal`` (interactive terminals, :class:`Terminal`),
    ``filesystem``, ``upload_file``/``download_file``, ``get_hostname``, ``keep_alive``,
    ``close``/``kill``. The E2B-style ``commands``, ``files`` and ``pty`` of the same sandbox
    are available too.

    Processes and file operations run as ``root`` unless ``user=`` is given to ``create``.
    Use ``async with await Sandbox.create() as sandbox:`` to close it automatically.
    """

    #: Template used by ``create()`` when none is given (None: the backend's default).
    template: Optional[str] = None

    def __init__(
        self,
        core: AsyncSandbox,
        *,
        cwd: Optional[str] = None,
        env_vars: Optional[EnvVars] = None,
        on_stdout: Optional[Callable[[ProcessMessage], Any]] = None,
        on_stderr: Optional[Callable[[ProcessMessage], Any]] = None,
        on_exit: Optional[Callable[..., Any]] = None,
        user: Optional[str] = "root",
    ) -> None:
        self._core = core
        self._cwd = cwd
        self._env_vars = dict(env_vars or {})
        self._on_stdout = on_stdout
        self._on_stderr = on_stderr
        self._on_exit = on_exit
        self._user = user
        self.process = ProcessManager(self, core.commands)
        #: TrEnv-X scripts also call it ``simple_process``.
        self.simple_process = self.process
        self.filesystem = FilesystemManager(core.files, user=None)
        #: Interactive terminals: ``await sandbox.terminal.start(on_data=..., cols=80, rows=24)``.
        self.terminal = TerminalManager(self, core.commands, core.pty)
        self.commands = core.commands
        self.files = core.files
        self.pty = core.pty
        self._closed = False

    # -- identity

    @property
    def id(self) -> str:
        """The sandbox's id."""
        return self._core.sandbox_id

    @property
    def sandbox_id(self) -> str:
        return self._core.sandbox_id

    @property
    def template_id(self) -> str:
        return self._core.template_id

    @property
    def cwd(self) -> Optional[str]:
        """Default working directory of processes started without ``cwd``."""
        return self._cwd

    @property
    def env_vars(self) -> EnvVars:
        """Environment variables added to every process."""
        return dict(self._env_vars)

    @property
    def traffic_access_token(self) -> Optional[str]:
        """Set when created with ``network={"allow_public_traffic": False}``: requests to the
        sandbox's ports must carry it in the ``e2b-traffic-access-token`` header."""
        return self._core.traffic_access_token

    @property
    def async_sandbox(self) -> AsyncSandbox:
        """The E2B-style :class:`AsyncSandbox` of the same sandbox."""
        return self._core

    def get_hostname(self, port: Optional[int] = None) -> str:
        """Host name of ``port`` of the sandbox: ``{port}-{id}.{domain}`` (``{id}.{domain}``
        without a port).

        Example::

            url = f"http://{sandbox.get_hostname(8000)}/"
        """
        if port is None:
            return f"{self.id}.{self._core.sandbox_domain}"
        return self._core.get_host(port)

    # -- lifecycle

    @classmethod
    async def create(
        cls,
        template: Optional[str] = None,
        cwd: Optional[str] = None,
        env_vars: Optional[EnvVars] = None,
        timeout: Optional[float] = TIMEOUT,
        on_stdout: Optional[Callable[[ProcessMessage], Any]] = None,
        on_stderr: Optional[Callable[[ProcessMessage], Any]] = None,
        on_exit: Optional[Callable[..., Any]] = None,
        target_addr: Optional[str] = None,
        metadata: Optional[Mapping[str, str]] = None,
        *,
        sandbox_timeout: Optional[int] = None,
        user: Optional[str] = "root",
        allow_internet_access: Optional[bool] = None,
        network: Optional[SandboxNetworkOpts] = None,
        lifecycle: Optional[SandboxLifecycle] = None,
        **connection: Any,
    ) -> "Sandbox":
        """Start a sandbox from ``template`` (else the class's ``template``, else the backend's
        default) on the backend at ``target_addr`` (else ``SANDBOX_BACKEND_ADDR``, else
        127.0.0.1; port 5000 or ``port=``).

        ``cwd``, ``env_vars``, ``on_stdout``, ``on_stderr``, ``on_exit`` become the defaults
        of every ``process.start``. ``env_vars`` are also given to the backend for the whole
        sandbox. ``timeout`` bounds the create request (seconds); ``sandbox_timeout`` is the
        sandbox's lifetime (None: the backend's default; extend it with ``keep_alive``).
        ``allow_internet_access`` and ``network`` are E2B's egress rules and public access, as in
        ``sandbox_sdk.e2b.Sandbox.create`` (``update_network`` changes the rules later);
        ``lifecycle`` too (``{"on_timeout": "pause", "auto_resume": True}``: at ``sandbox_timeout``
        it is paused to disk, not killed, and a request to it through the backend resumes it).

        Example::

            sandbox = await Sandbox.create(template="default-sandbox", target_addr="127.0.0.1",
                                           cwd="/root", env_vars={"A": "1"}, metadata={"job": "7"})
            offline = await Sandbox.create(allow_internet_access=False)
        """
        connection.setdefault("request_timeout", timeout)
        core = await AsyncSandbox.create(
            template or cls.template,
            sandbox_timeout,
            metadata,
            env_vars,
            allow_internet_access=allow_internet_access,
            network=network,
            lifecycle=lifecycle,
            user=user,
            target_addr=target_addr,
            **connection,
        )
        return cls(
            core, cwd=cwd, env_vars=env_vars, on_stdout=on_stdout, on_stderr=on_stderr, on_exit=on_exit, user=user
        )

    @classmethod
    async def connect(
        cls, sandbox_id: str, target_addr: Optional[str] = None, *, user: Optional[str] = "root", **connection: Any
    ) -> "Sandbox":
        """Attach to a running sandbox by id.

        Example::

            again = await Sandbox.connect(sandbox.id)
        """
        core = await AsyncSandbox.connect(sandbox_id, user=user, target_addr=target_addr, **connection)
        return cls(core, user=user)

    @classmethod
    async def connect_direct(
        cls,
        envd_url: str,
        *,
        user: Optional[str] = "root",
        cwd: Optional[str] = None,
        env_vars: Optional[EnvVars] = None,
        **connection: Any,
    ) -> "Sandbox":
        """Debug mode: drive a guest agent at ``envd_url`` directly, without a backend
        (``close()`` then only releases the connection).

        Example::

            sandbox = await Sandbox.connect_direct("http://127.0.0.1:49983")
        """
        core = await AsyncSandbox.connect_direct(envd_url, user=user, **connection)
        return cls(core, user=user, cwd=cwd, env_vars=env_vars)

    async def keep_alive(self, duration: int) -> None:
        """Make the sandbox live ``duration`` more seconds from now.

        Example::

            await sandbox.keep_alive(3600)
        """
        await self._core._api.refresh(self.id, int(duration))

    async def update_network(self, network: SandboxNetworkUpdate, timeout: Optional[float] = None) -> None:
        """Replace the sandbox's egress rules (options left out are cleared).

        Example::

            await sandbox.update_network({"allow_out": ["pypi.org"], "deny_out": ["0.0.0.0/0"]})
        """
        await self._core.update_network(network, timeout)

    async def get_info(self, timeout: Optional[float] = None) -> SandboxInfo:
        """The backend's description of the sandbox, with its network rules (``info.network``)."""
        info: SandboxInfo = await self._core.get_info(timeout)
        return info

    async def is_running(self) -> bool:
        """Whether the sandbox's agent answers."""
        return await self._core.is_running()

    async def pause(self, *, keep_memory: bool = True, timeout: Optional[float] = None) -> bool:
        """Pause the sandbox to disk: its state is stored, its VM ends, its timeout stops.

        ``keep_memory=False`` keeps only its files (a resume boots it: its processes are gone).
        True once paused, False if it was paused already.

        Example::

            await sandbox.pause()
            await sandbox.resume()
        """
        return await self._core.pause(keep_memory, request_timeout=timeout)

    async def resume(self, *, keep_alive: Optional[int] = None, reboot: bool = False,
                     timeout: Optional[float] = None) -> None:
        """Resume a paused sandbox (same id; with its memory, its processes go on) and make it live at
        least ``keep_alive`` more seconds; ``reboot=True``: boot it from its disk instead. A running
        sandbox only gets its ``keep_alive``.

        Example::

            await sandbox.resume(keep_alive=600)
        """
        await self._core.connect(keep_alive, on_resume="reboot" if reboot else "restore", request_timeout=timeout)

    async def close(self) -> None:
        """Kill the sandbox and release the connection (idempotent).

        Example::

            await sandbox.close()
        """
        if self._closed:
            return
        self._closed = True
        try:
            await self._core.kill()
        except SandboxError:
            pass
        finally:
            await self._core.close()

    @dual_method
    async def kill(cls, sandbox_id: str, target_addr: Optional[str] = None, **connection: Any) -> bool:
        """Kill a sandbox: ``await Sandbox.kill(id, target_addr)`` or ``await sandbox.kill()``.

        Returns False if the sandbox did not exist.
        """
        config = ConnectionConfig.resolve(target_addr=target_addr, **connection)
        async with make_client(config) as client:
            return await ApiClient(client, config).kill_sandbox(sandbox_id, connection.get("request_timeout"))

    @kill.instance
    async def _kill(self) -> bool:
        self._closed = True
        try:
            killed: bool = await self._core.kill()
            return killed
        finally:
            await self._core.close()

    @staticmethod
    async def list(target_addr: Optional[str] = None, **connection: Any) -> List[RunningSandbox]:
        """The running sandboxes of the backend.

        Example::

            for s in await Sandbox.list("127.0.0.1"):
                print(s.sandbox_id, s.template_id, s.metadata)
        """
        metadata = connection.pop("metadata", None)
        return await AsyncSandbox.list(metadata, target_addr=target_addr, **connection)

    @staticmethod
    async def list_templates(target_addr: Optional[str] = None, **connection: Any) -> List[TemplateInfo]:
        """The templates built on the backend."""
        return await AsyncSandbox.list_templates(target_addr=target_addr, **connection)

    # -- files

    async def upload_file(
        self,
        file: Union[IO[bytes], str, "os.PathLike[str]"],
        timeout: Optional[float] = None,
        remote_path: Optional[str] = None,
    ) -> str:
        """Upload a local file (a binary file object or a path; streamed, not read into
        memory) to ``remote_path`` (default ``/home/user/<its name>``); returns that path.

        Example::

            with open("data.csv", "rb") as f:
                path = await sandbox.upload_file(f)
        """
        if isinstance(file, (str, os.PathLike)):
            local = os.fspath(file)
            target = remote_path or posixpath.join("/home/user", os.path.basename(local))
            with open(local, "rb") as f:
                await self._core.files.write(target, f, request_timeout=timeout)
            return target
        name = os.path.basename(str(getattr(file, "name", "") or "")) or "upload"
        target = remote_path or posixpath.join("/home/user", name)
        await self._core.files.write(target, file, request_timeout=timeout)
        return target

    async def download_file(
        self,
        remote_path: str,
        timeout: Optional[float] = None,
        local_path: Optional[Union[str, "os.PathLike[str]"]] = None,
    ) -> Any:
        """Download a file of the sandbox: its bytes, or with ``local_path`` streamed to
        that file (any size, never held in memory) and the path returned.

        Example::

            data = await sandbox.download_file("/etc/hostname")
            await sandbox.download_file("/data/big.bin", local_path="big.bin")
        """
        if local_path is not None:
            await self._core.files.download_to(remote_path, local_path, request_timeout=timeout)
            return os.fspath(local_path)
        return bytes(await self._core.files.read(remote_path, "bytes", request_timeout=timeout))

    # -- context manager

    async def __aenter__(self) -> "Sandbox":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<Sandbox {self.id} template={self.template_id!r}>"
