"""A JSON-over-HTTP client of a VMM's API on a unix socket (Firecracker, Cloud Hypervisor).

Both VMMs serve a small REST API on a unix socket they create at start. :class:`UdsApi` sends
requests with httpx over that socket, waits for the socket to answer after a spawn, and turns
every failure (an error status, a refused or dropped connection, a timeout) into a
:class:`~trenvx.vmm.base.VmmError` whose message names the VMM, the request, the VMM's own
explanation (decoded by the driver's ``describe_error``) and, if the process died, its exit and
last output lines.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from .base import VmmError
from .process import VmmProcess

API_TIMEOUT_S = 30.0
START_TIMEOUT_S = 10.0
UNIX_PATH_MAX = 108  # sun_path, including the terminating NUL


def check_socket_path(path: Path) -> None:
    """Raise a clear VmmError if ``path`` is too long to be a unix socket."""
    n = len(str(path).encode())
    if n >= UNIX_PATH_MAX:
        raise VmmError(
            f"the VM's control socket path {path} is {n} bytes, over the {UNIX_PATH_MAX - 1}-byte limit of "
            f"UNIX sockets; choose a shorter data_root"
        )


class UdsApi:
    """Requests to one VMM process's API socket."""

    def __init__(
        self,
        socket_path: Path,
        *,
        vmm: str,
        process: VmmProcess | None,
        describe_error: Callable[[int, bytes], str],
        prefix: str = "",
    ) -> None:
        self.socket_path = socket_path
        self.vmm = vmm
        self.process = process
        self.prefix = prefix
        self._describe = describe_error
        self._http = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=str(socket_path)),
            base_url="http://localhost",
            timeout=httpx.Timeout(API_TIMEOUT_S),
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    def _where(self) -> str:
        pid = f" (pid {self.process.pid})" if self.process else ""
        return f"{self.vmm}{pid}"

    def _exit_hint(self) -> str:
        if self.process is None or self.process.is_alive():
            return ""
        return f"; {self.vmm} exited with {self.process.returncode}: {self.process.output_tail(5) or 'no output'}"

    async def request(
        self, method: str, path: str, body: dict[str, Any] | None = None, *, timeout: float = API_TIMEOUT_S,
        ok: tuple[int, ...] = (200, 204),
    ) -> Any:
        """Send one request; the decoded JSON answer (None for 204). Raises VmmError otherwise."""
        url = self.prefix + path
        try:
            response = await self._http.request(
                method, url, content=None if body is None else json.dumps(body).encode(),
                headers={"Content-Type": "application/json", "Accept": "application/json"}, timeout=timeout,
            )
        except httpx.TimeoutException:
            raise VmmError(f"{self._where()} did not answer {method} {url} within {timeout:.0f}s{self._exit_hint()}") from None
        except httpx.TransportError as e:
            raise VmmError(f"{method} {url} to {self._where()} failed: {e or type(e).__name__}{self._exit_hint()}") from None
        if response.status_code not in ok:
            raise VmmError(
                f"{self._where()} refused {method} {url} (HTTP {response.status_code}): "
                f"{self._describe(response.status_code, response.content)}{self._exit_hint()}"
            )
        if response.status_code == 204 or not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            return response.text

    async def wait_ready(self, probe: str, timeout: float = START_TIMEOUT_S) -> Any:
        """Poll ``GET probe`` until the VMM answers (its socket appears a moment after the spawn)."""
        deadline = time.monotonic() + timeout
        delay = 0.001
        last: object = "no answer"
        while True:
            if self.process is not None and not self.process.is_alive():
                raise VmmError(
                    f"{self.vmm} exited with {self.process.returncode} before its API socket {self.socket_path} "
                    f"answered: {self.process.output_tail(10) or 'no output'}"
                )
            if self.socket_path.exists():
                try:
                    response = await self._http.get(self.prefix + probe, timeout=max(0.05, deadline - time.monotonic()))
                    if response.status_code == 200:
                        return response.json()
                    last = f"HTTP {response.status_code}: {self._describe(response.status_code, response.content)}"
                except httpx.TransportError as e:
                    last = e
            if time.monotonic() > deadline:
                raise VmmError(
                    f"{self.vmm} did not answer on {self.socket_path} within {timeout:.0f}s (last: {last})"
                    f"{self._exit_hint()}"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
