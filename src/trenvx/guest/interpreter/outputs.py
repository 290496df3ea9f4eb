"""Jupyter IOPub messages -> the lines of an ``/execute`` answer (E2B's output objects).

Each line of an ``/execute`` answer is one JSON object with a ``type``:

* ``stdout`` / ``stderr``: ``{"text", "timestamp"}`` (Unix time in nanoseconds, as E2B's
  ``OutputMessage.timestamp``)
* ``result``: one representation per known MIME type (``text``, ``html``, ``markdown``,
  ``svg``, ``png``, ``jpeg``, ``pdf``, ``latex``, ``json``, ``javascript``; ``data`` and
  ``chart``, E2B's, from :mod:`.kernel_charts`), other MIME types under ``extra``, and
  ``is_main_result`` (true for the cell's value, false for a ``display()`` such as a
  matplotlib figure); images stay base64 as the kernel sends them
* ``error``: ``{"name", "value", "traceback"}``, the traceback one string (ANSI colours kept)
* ``number_of_executions``: ``{"execution_count"}``
* ``end_of_execution``: always the last line

Pure functions over message dicts: no kernel, no I/O.
"""

from __future__ import annotations

import time
from typing import Any

Output = dict[str, Any]

#: MIME type -> the field of E2B's ``Result`` that carries it.
MIME_FIELDS: dict[str, str] = {
    "text/plain": "text",
    "text/html": "html",
    "text/markdown": "markdown",
    "image/svg+xml": "svg",
    "image/png": "png",
    "image/jpeg": "jpeg",
    "application/pdf": "pdf",
    "text/latex": "latex",
    "application/json": "json",
    "application/javascript": "javascript",
    "e2b/data": "data",  # a DataFrame's columns (kernel_charts, inside the kernel)
    "e2b/chart": "chart",  # what a matplotlib figure shows (kernel_charts)
}
STRUCTURED = frozenset({"json", "data", "chart"})
"""Fields whose value is a JSON object, never text split into a list of lines."""


def now_ns() -> int:
    return time.time_ns()


def stream(name: str, text: str) -> Output:
    """A ``stdout`` or ``stderr`` line."""
    return {"type": "stderr" if name == "stderr" else "stdout", "text": text, "timestamp": now_ns()}


def result(data: dict[str, Any], is_main_result: bool) -> Output:
    """A ``result`` line from a mime bundle (the ``data`` of execute_result / display_data)."""
    out: Output = {"type": "result"}
    extra: dict[str, Any] = {}
    for mime, value in data.items():
        field = MIME_FIELDS.get(mime)
        if field is None:
            extra[mime] = value
            continue
        if isinstance(value, list) and field not in STRUCTURED:  # nbformat allows multi-line strings as lists
            value = "".join(str(part) for part in value)
        out[field] = value
    if extra:
        out["extra"] = extra
    out["is_main_result"] = is_main_result
    return out


def error(name: str, value: str, traceback: list[str] | str) -> Output:
    """An ``error`` line; a list traceback (Jupyter's) is joined into one string."""
    text = traceback if isinstance(traceback, str) else "\n".join(str(line) for line in traceback)
    return {"type": "error", "name": name, "value": value, "traceback": text}


def execution_count(count: int) -> Output:
    return {"type": "number_of_executions", "execution_count": count}


END: Output = {"type": "end_of_execution"}


def from_iopub(msg: dict[str, Any]) -> Output | None:
    """The output line for one IOPub message of a cell, or None for those that give none
    (status, execute_input, clear_output, comm messages, ...)."""
    kind = msg.get("msg_type") or msg.get("header", {}).get("msg_type")
    content = msg.get("content") or {}
    if kind == "stream":
        return stream(str(content.get("name", "stdout")), str(content.get("text", "")))
    if kind == "execute_result":
        return result(content.get("data") or {}, True)
    if kind in ("display_data", "update_display_data"):
        return result(content.get("data") or {}, False)
    if kind == "error":
        return error(str(content.get("ename", "")), str(content.get("evalue", "")), content.get("traceback") or [])
    return None
