"""What one execution of code in a sandbox's code interpreter produced, and how its stream is read.

The code interpreter (a server on port 49999 of sandboxes made from the ``code-interpreter``
template) answers ``POST /execute`` with one JSON object per line (NDJSON), in the order things
happened in the cell::

    {"type": "stdout", "text": "hi\\n", "timestamp": ...}
    {"type": "stderr", "text": "warning\\n", "timestamp": ...}
    {"type": "result", "text": "2", "png": "<base64>", "is_main_result": true, ...}
    {"type": "error", "name": "ZeroDivisionError", "value": "division by zero", "traceback": "..."}
    {"type": "number_of_executions", "execution_count": 3}
    {"type": "end_of_execution"}

:func:`apply_line` folds one such line into an :class:`Execution` and says which callback it is
for. The classes have the names, fields and helpers of E2B's ``e2b_code_interpreter`` models
(``Execution.text``, ``Result.formats()``, the ``_repr_*_`` methods that let notebooks display a
result), so code written for E2B reads them unchanged; unknown line types and result keys are
ignored, as E2B's client ignores them, so a newer server does not break an older client.
"""

from __future__ import annotations

import datetime
import json
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Literal, Mapping, Optional, Tuple, Union

from ..exceptions import StreamError

RunCodeLanguage = Union[Literal["python", "javascript", "typescript", "r", "java", "bash"], str]
"""A language the code interpreter may run (it answers 400 to one it does not have)."""

MIMEType = str

#: Result fields holding one representation each, in the order :meth:`Result.formats` lists them.
FORMATS: Tuple[str, ...] = (
    "text", "html", "markdown", "svg", "png", "jpeg", "pdf", "latex", "json", "javascript", "data", "chart",
)
#: The MIME type each representation has in Jupyter's display data (:attr:`Result.raw`).
MIME_TYPES: Dict[str, str] = {
    "text": "text/plain", "html": "text/html", "markdown": "text/markdown", "svg": "image/svg+xml",
    "png": "image/png", "jpeg": "image/jpeg", "pdf": "application/pdf", "latex": "text/latex",
    "json": "application/json", "javascript": "application/javascript", "data": "e2b/data", "chart": "e2b/chart",
}


@dataclass
class OutputMessage:
    """One piece of stdout or stderr, as the cell wrote it (``line`` may hold several lines or part
    of one). ``timestamp`` is what the server sent (E2B's server: an ISO 8601 time); ``error`` is
    True for stderr. ``str(message)`` is its text."""

    line: str
    timestamp: Any = None
    error: bool = False

    def __str__(self) -> str:
        return self.line

    @property
    def timestamp_ns(self) -> int:
        """``timestamp`` as Unix nanoseconds (now, when the server sent none or an unreadable one)."""
        return timestamp_ns(self.timestamp)


def timestamp_ns(value: Any) -> int:
    """Unix nanoseconds of a stream timestamp: an integer (already ns), a float (seconds) or ISO 8601."""
    if isinstance(value, bool):
        return time.time_ns()
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value * 1e9)
    if isinstance(value, str) and value:
        try:
            t = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return time.time_ns()
        if t.tzinfo is None:
            t = t.replace(tzinfo=datetime.timezone.utc)
        return int(t.timestamp()) * 1_000_000_000 + t.microsecond * 1000
    return time.time_ns()


@dataclass
class ExecutionError:
    """The exception a cell raised: its class ``name`` (``"ZeroDivisionError"``), ``value`` (its
    message) and ``traceback`` (the whole traceback as the kernel formatted it, one string)."""

    name: str
    value: str
    traceback: str

    @property
    def traceback_raw(self) -> List[str]:
        """The traceback's lines (TrEnv-X's ``Error.traceback_raw``)."""
        return self.traceback.splitlines()

    def to_dict(self) -> Dict[str, str]:
        return {"name": self.name, "value": self.value, "traceback": self.traceback}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def __str__(self) -> str:
        return f"{self.name}: {self.value}"


class Chart:
    """Data the code interpreter extracted from a chart the cell drew (matplotlib): ``type``
    (``"line"``, ``"bar"``, ``"scatter"``, ``"pie"``, ``"box_and_whisker"``, ``"superchart"``,
    ``"unknown"``), ``title``, ``elements`` and whatever else the server sent (``x_label``,
    ``y_ticks``...), readable as attributes. ``to_dict()`` gives it back as sent."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        self._data = dict(data)

    @property
    def type(self) -> str:
        return str(self._data.get("type") or "unknown")

    @property
    def title(self) -> Optional[str]:
        return self._data.get("title")

    @property
    def elements(self) -> List[Any]:
        elements = self._data.get("elements")
        return list(elements) if isinstance(elements, list) else []

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self._data[name]
        except KeyError:
            raise AttributeError(f"this {self.type} chart has no {name!r} (it has {', '.join(self._data)})") from None

    def to_dict(self) -> Dict[str, Any]:
        return dict(self._data)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Chart) and other._data == self._data

    def __repr__(self) -> str:
        return f"Chart(type={self.type!r}, title={self.title!r})"


class Result:
    """Something a cell displayed: its last expression's value (``is_main_result``) or a display
    call's output (a matplotlib figure, ``display(df)``), in every representation the kernel gave:
    ``text``, ``html``, ``markdown``, ``svg``, ``png`` and ``jpeg`` (base64), ``pdf``, ``latex``,
    ``json``, ``javascript``, ``data`` (a DataFrame's data), ``chart`` (a :class:`Chart`), and
    ``extra`` (other MIME types, by name).

    Example::

        for result in execution.results:
            if result.png:
                open("chart.png", "wb").write(base64.b64decode(result.png))
    """

    text: Optional[str]
    html: Optional[str]
    markdown: Optional[str]
    svg: Optional[str]
    png: Optional[str]
    jpeg: Optional[str]
    pdf: Optional[str]
    latex: Optional[str]
    json: Optional[Dict[str, Any]]
    javascript: Optional[str]
    data: Optional[Dict[str, Any]]
    chart: Optional[Chart]
    is_main_result: bool
    extra: Optional[Dict[str, Any]]

    def __init__(
        self,
        text: Optional[str] = None,
        html: Optional[str] = None,
        markdown: Optional[str] = None,
        svg: Optional[str] = None,
        png: Optional[str] = None,
        jpeg: Optional[str] = None,
        pdf: Optional[str] = None,
        latex: Optional[str] = None,
        json: Optional[Dict[str, Any]] = None,
        javascript: Optional[str] = None,
        data: Optional[Dict[str, Any]] = None,
        chart: Union[Chart, Mapping[str, Any], None] = None,
        is_main_result: bool = False,
        extra: Optional[Dict[str, Any]] = None,
        **_ignored: Any,
    ) -> None:
        self.text = text
        self.html = html
        self.markdown = markdown
        self.svg = svg
        self.png = png
        self.jpeg = jpeg
        self.pdf = pdf
        self.latex = latex
        self.json = json
        self.javascript = javascript
        self.data = data
        self.chart = chart if isinstance(chart, Chart) or not chart else Chart(chart)
        self.is_main_result = bool(is_main_result)
        self.extra = extra

    def __getitem__(self, item: str) -> Any:
        if item in FORMATS or item in ("is_main_result", "extra"):
            return getattr(self, item)
        if self.extra and item in self.extra:
            return self.extra[item]
        raise KeyError(item)

    def formats(self) -> List[str]:
        """The representations this result has: ``["text", "png"]``, then the keys of ``extra``."""
        found = [name for name in FORMATS if getattr(self, name)]
        return found + list(self.extra or {})

    @property
    def raw(self) -> Dict[MIMEType, Any]:
        """The representations by MIME type (``{"text/plain": ..., "image/png": ...}``; TrEnv-X's ``raw``)."""
        out: Dict[str, Any] = {}
        for name in FORMATS:
            value = getattr(self, name)
            if value:
                out[MIME_TYPES[name]] = value.to_dict() if isinstance(value, Chart) else value
        out.update(self.extra or {})
        return out

    def to_dict(self) -> Dict[str, Any]:
        """The fields that are set, as the server sent them (``chart`` as a dict), with ``is_main_result``."""
        out: Dict[str, Any] = {}
        for name in FORMATS:
            value = getattr(self, name)
            if value:
                out[name] = value.to_dict() if isinstance(value, Chart) else value
        if self.extra:
            out["extra"] = dict(self.extra)
        out["is_main_result"] = self.is_main_result
        return out

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Result) and other.to_dict() == self.to_dict()

    def __repr__(self) -> str:
        if self.text:
            return f"Result({self.text})"
        return f"Result(formats: {', '.join(self.formats()) or 'none'})"

    def __str__(self) -> str:
        return self.__repr__()

    # Notebooks (IPython's display) show a result through these.
    def _repr_html_(self) -> Optional[str]:
        return self.html

    def _repr_markdown_(self) -> Optional[str]:
        return self.markdown

    def _repr_svg_(self) -> Optional[str]:
        return self.svg

    def _repr_png_(self) -> Optional[str]:
        return self.png

    def _repr_jpeg_(self) -> Optional[str]:
        return self.jpeg

    def _repr_pdf_(self) -> Optional[str]:
        return self.pdf

    def _repr_latex_(self) -> Optional[str]:
        return self.latex

    def _repr_json_(self) -> Optional[Dict[str, Any]]:
        return self.json

    def _repr_javascript_(self) -> Optional[str]:
        return self.javascript


@dataclass
class Logs:
    """What the cell printed: the pieces of ``stdout`` and ``stderr`` in the order they arrived."""

    stdout: List[str] = field(default_factory=list)
    stderr: List[str] = field(default_factory=list)

    def to_dict(self) -> Dict[str, List[str]]:
        return {"stdout": list(self.stdout), "stderr": list(self.stderr)}


@dataclass
class Execution:
    """What running one cell produced: ``results`` (the last expression's value and every display
    call, in order), ``logs`` (stdout and stderr), ``error`` (the exception it raised, else None) and
    ``execution_count`` (the cell's number in its context). ``text`` is the main result's text.

    Example::

        execution = sandbox.run_code("x = 40\\nx + 2")
        assert execution.text == "42"
    """

    results: List[Result] = field(default_factory=list)
    logs: Logs = field(default_factory=Logs)
    error: Optional[ExecutionError] = None
    execution_count: Optional[int] = None

    @property
    def text(self) -> Optional[str]:
        """The text of the cell's value (its last expression), None when it has none."""
        for result in self.results:
            if result.is_main_result:
                return result.text
        return None

    def to_dict(self) -> Dict[str, Any]:
        return {
            "results": [r.to_dict() for r in self.results],
            "logs": self.logs.to_dict(),
            "error": self.error.to_dict() if self.error else None,
            "execution_count": self.execution_count,
        }

    def to_json(self) -> str:
        """The execution as one JSON object (``results``, ``logs``, ``error``, ``execution_count``)."""
        return json.dumps(self.to_dict())


@dataclass
class Context:
    """A place code runs in: one kernel with its own variables, imports and working directory.
    ``id``, ``language``, ``cwd``."""

    id: str
    language: str
    cwd: str

    @classmethod
    def from_json(cls, value: Any) -> "Context":
        if not isinstance(value, dict) or not isinstance(value.get("id"), str) or not value["id"]:
            raise StreamError(f"the code interpreter described a context without an id: {str(value)[:200]!r}")
        return cls(id=value["id"], language=str(value.get("language") or ""), cwd=str(value.get("cwd") or ""))


#: What a line was for: the callback to call with the value (None: no callback).
Event = Tuple[Optional[Literal["stdout", "stderr", "result", "error"]], Any]


def apply_line(execution: Execution, line: str) -> Event:
    """Fold one line of an execution's stream into ``execution``; returns ``(kind, value)`` for the
    callback it calls for (``"stdout"``/``"stderr"`` with an :class:`OutputMessage`, ``"result"``
    with a :class:`Result`, ``"error"`` with an :class:`ExecutionError`), ``(None, None)`` for lines
    that call none (counts, the end, blank or unknown lines). A line that is not a JSON object raises
    :class:`StreamError`."""
    line = line.strip()
    if not line:
        return None, None
    try:
        data = json.loads(line)
    except ValueError:
        raise StreamError(f"the code interpreter sent a line that is not JSON: {line[:200]!r}") from None
    if not isinstance(data, dict):
        raise StreamError(f"the code interpreter sent a line that is not a JSON object: {line[:200]!r}")
    kind = data.pop("type", None)
    if kind in ("stdout", "stderr"):
        text = data.get("text")
        text = "" if text is None else str(text)
        getattr(execution.logs, kind).append(text)
        return kind, OutputMessage(text, data.get("timestamp"), kind == "stderr")
    if kind == "result":
        result = Result(**{k: v for k, v in data.items() if isinstance(k, str)})
        execution.results.append(result)
        return "result", result
    if kind == "error":
        error = ExecutionError(str(data.get("name") or ""), str(data.get("value") or ""),
                               _traceback_text(data.get("traceback")))
        execution.error = error
        return "error", error
    if kind == "number_of_executions":
        count = data.get("execution_count")
        execution.execution_count = count if isinstance(count, int) else execution.execution_count
    return None, None


def _traceback_text(value: Any) -> str:
    if isinstance(value, list):
        return "\n".join(str(v) for v in value)
    return "" if value is None else str(value)


def parse_lines(lines: Iterator[str]) -> Execution:
    """An :class:`Execution` from a whole stream's lines (no callbacks)."""
    execution = Execution()
    for line in lines:
        apply_line(execution, line)
    return execution
