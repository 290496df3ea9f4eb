"""sandbox_sdk reads the proxy's end of a stream whose sandbox went away as the sandbox not found."""

from __future__ import annotations

from sandbox_sdk import exceptions
from sandbox_sdk._errors import connect_error


def test_unavailable_saying_not_found_is_sandbox_not_found() -> None:
    err = connect_error("unavailable", "The sandbox abc was not found: killed", context="process", sandbox_id="abc")
    assert isinstance(err, exceptions.SandboxNotFoundError)
    assert "was not found: killed" in str(err)


def test_other_unavailable_stays_a_sandbox_error() -> None:
    err = connect_error("unavailable", "the connection to sandbox abc (port 49983) ended before the stream completed",
                        context="process", sandbox_id="abc")
    assert type(err) is exceptions.SandboxError and not isinstance(err, exceptions.NotFoundError)


def test_deadline_exceeded_is_a_timeout() -> None:
    err = connect_error("deadline_exceeded", "process 7 ran past its deadline", context="process")
    assert isinstance(err, exceptions.TimeoutException) and isinstance(err, TimeoutError)
