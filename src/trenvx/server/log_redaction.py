"""Secrets out of the server's logs: query parameters that carry a key, a token or a signature.

The server never logs a header's value, but uvicorn's access log writes every request's path
with its query, and some URLs carry secrets by design: a signed ``/files`` URL's ``signature``
(a grant of one file operation in a sandbox), a browser link's ``trenvx_token`` (taken out of the
scope by the proxy before the access log, kept here too), and whatever a client puts in a query
by mistake (``?access_token=``, ``?api_key=``). :class:`RedactSecrets` rewrites such values to
``[redacted]`` in every record of the loggers it is installed on (:func:`install`: uvicorn's
access and error logs), so no log file, journal or terminal holds them.
"""

from __future__ import annotations

import logging
import re

SECRET_PARAMS = ("signature", "access_token", "accesstoken", "envd_access_token", "traffic_access_token",
                 "trenvx_token", "token", "api_key", "apikey", "x-api-key", "key", "password", "secret")
"""Query parameter names whose values never reach a log (compared without case)."""
REDACTED = "[redacted]"
_PARAM_RE = re.compile(r"([?&;](?:%s)=)[^&;\s\"']*" % "|".join(re.escape(p) for p in SECRET_PARAMS), re.IGNORECASE)
LOGGERS = ("uvicorn.access", "uvicorn.error")


def redact_query(text: str) -> str:
    """``text`` with the value of every secret query parameter (:data:`SECRET_PARAMS`) replaced."""
    if "=" not in text:
        return text
    return _PARAM_RE.sub(lambda m: m.group(1) + REDACTED, text)


class RedactSecrets(logging.Filter):
    """Rewrites a record's message and string arguments with :func:`redact_query`; drops nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact_query(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact_query(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: redact_query(v) if isinstance(v, str) else v for k, v in record.args.items()}
        return True


def install() -> None:
    """Put :class:`RedactSecrets` on uvicorn's loggers (once)."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactSecrets) for f in logger.filters):
            logger.addFilter(RedactSecrets())


__all__ = ["REDACTED", "RedactSecrets", "SECRET_PARAMS", "install", "redact_query"]
