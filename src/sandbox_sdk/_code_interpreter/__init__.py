"""The client of the code interpreter that sandboxes of the ``code-interpreter`` template run on
port 49999 (E2B's code-interpreter protocol): its models (:mod:`.models`), its HTTP API and the
``run_code`` methods of the E2B-style sandboxes (:mod:`.client`, :mod:`.sync`).

Public names are exported by :mod:`sandbox_sdk.e2b` (E2B's shape) and
:mod:`sandbox_sdk.code_interpreter` (TrEnv-X's ``CodeInterpreter``).
"""

from .client import (
    CODE_INTERPRETER_TEMPLATE,
    DEFAULT_EXECUTION_TIMEOUT,
    INTERPRETER_PORT,
    AsyncCodeRunner,
    Handlers,
    InterpreterClient,
    interpreter_error,
)
from .models import (
    Chart,
    Context,
    Execution,
    ExecutionError,
    Logs,
    MIMEType,
    OutputMessage,
    Result,
    RunCodeLanguage,
    apply_line,
    parse_lines,
)
from .sync import CodeRunner

__all__ = [
    "CODE_INTERPRETER_TEMPLATE",
    "DEFAULT_EXECUTION_TIMEOUT",
    "INTERPRETER_PORT",
    "AsyncCodeRunner",
    "CodeRunner",
    "Handlers",
    "InterpreterClient",
    "interpreter_error",
    "Chart",
    "Context",
    "Execution",
    "ExecutionError",
    "Logs",
    "MIMEType",
    "OutputMessage",
    "Result",
    "RunCodeLanguage",
    "apply_line",
    "parse_lines",
]
