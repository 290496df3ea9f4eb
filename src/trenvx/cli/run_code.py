"""``sandbox-cli sandbox run-code``: run code in a sandbox's code interpreter from the shell.

The sandbox's stdout and stderr are written as they stream; each result is shown as it arrives:
its text printed, its images and PDFs (png, jpeg, svg, pdf) saved in the output directory as
``<sandbox id>-<n>.<ext>`` (the path printed), its other representations (html, markdown, latex,
json, javascript, data, chart) named with their size. The code's exception is printed with its
traceback and the exit code is 1. With ``--json`` nothing streams: the whole execution is printed
as one JSON object (``results``, ``logs``, ``error``, ``execution_count``, ``files``).

It drives the code interpreter through :mod:`sandbox_sdk` (its ``run_code``), so the CLI and the
SDK speak the protocol the same way.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, TextIO

from sandbox_sdk._config import ConnectionConfig
from sandbox_sdk.e2b import AsyncSandbox, Execution, OutputMessage, Result
from sandbox_sdk.models import SandboxConnectionInfo

#: Representations saved as files, with their extension; base64 in the stream except svg (text).
FILE_FORMATS: dict[str, str] = {"png": "png", "jpeg": "jpg", "svg": "svg", "pdf": "pdf"}
#: Representations only named, with their size, when printing (the text is printed as is).
SUMMARIZED = ("html", "markdown", "latex", "json", "javascript", "data", "chart")


@dataclass
class Saver:
    """Saves results' images as ``<sandbox>-<n>.<ext>`` in ``out_dir``, never over an existing file."""

    out_dir: Path
    sandbox_id: str
    saved: list[Path] = field(default_factory=list)
    _n: int = 0

    def _next_path(self, ext: str) -> Path:
        while True:
            self._n += 1
            path = self.out_dir / f"{self.sandbox_id}-{self._n}.{ext}"
            if not path.exists():
                return path

    def save(self, fmt: str, value: str) -> Path:
        if fmt == "svg":
            data = value.encode()
        else:
            try:
                data = base64.b64decode(value, validate=False)
            except (binascii.Error, ValueError) as e:
                raise ValueError(f"the {fmt} of a result is not base64: {e}") from None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self._next_path(FILE_FORMATS[fmt])
        path.write_bytes(data)
        self.saved.append(path)
        return path


def _size(value: Any) -> str:
    n = len(value) if isinstance(value, str) else len(json.dumps(value if not hasattr(value, "to_dict")
                                                                    else value.to_dict()))
    return f"{n:,} characters"


class Printer:
    """Shows an execution as it streams (not used with --json, which prints only at the end)."""

    def __init__(self, saver: Saver, out: TextIO, err: TextIO, streaming: bool) -> None:
        self.saver = saver
        self.out = out
        self.err = err
        self.streaming = streaming

    def stdout(self, message: OutputMessage) -> None:
        if self.streaming:
            self.out.write(message.line)
            self.out.flush()

    def stderr(self, message: OutputMessage) -> None:
        if self.streaming:
            self.err.write(message.line)
            self.err.flush()

    def result(self, result: Result) -> None:
        for fmt in FILE_FORMATS:
            value = getattr(result, fmt)
            if value:
                path = self.saver.save(fmt, value)
                if self.streaming:
                    print(f"saved {fmt} to {path}", file=self.out, flush=True)
        if not self.streaming:
            return
        if result.text:
            print(result.text, file=self.out, flush=True)
        for fmt in SUMMARIZED:
            value = getattr(result, fmt)
            if value:
                print(f"[{fmt}: {_size(value)}]", file=self.out, flush=True)
        for key, value in (result.extra or {}).items():
            print(f"[{key}: {_size(value)}]", file=self.out, flush=True)


async def run(
    api_url: str,
    api_key: Optional[str],
    detail: dict[str, Any],
    code: str,
    *,
    language: Optional[str],
    context: Optional[str],
    timeout: Optional[float],
    envs: dict[str, str],
    saver: Saver,
    printer: Printer,
) -> Execution:
    """Run ``code`` in the sandbox ``detail`` describes (its ``GET /sandboxes/{id}`` answer)."""
    config = ConnectionConfig.resolve(api_url=api_url, api_key=api_key)
    sandbox = AsyncSandbox(SandboxConnectionInfo.from_json(detail), config)
    try:
        return await sandbox.run_code(code, language=language, context=context, on_stdout=printer.stdout,
                                      on_stderr=printer.stderr, on_result=printer.result, envs=envs or None,
                                      timeout=timeout)
    finally:
        await sandbox.close()


def run_blocking(api_url: str, api_key: Optional[str], detail: dict[str, Any], code: str, *, language: Optional[str],
                 context: Optional[str], timeout: Optional[float], envs: dict[str, str], out_dir: Path,
                 as_json: bool) -> tuple[Execution, list[Path]]:
    """:func:`run` in its own event loop: the execution and the files saved from it."""
    saver = Saver(out_dir, str(detail.get("sandboxID") or "sandbox"))
    printer = Printer(saver, sys.stdout, sys.stderr, streaming=not as_json)
    execution = asyncio.run(run(api_url, api_key, detail, code, language=language, context=context, timeout=timeout,
                                envs=envs, saver=saver, printer=printer))
    return execution, saver.saved
