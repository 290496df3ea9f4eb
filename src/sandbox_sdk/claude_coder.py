"""``claude-coder``: a web VS Code with Claude Code in a private sandbox, opened from a browser.

::

    SANDBOX_BACKEND_ADDR=10.0.0.5:3000 claude-coder --api-key "$ANTHROPIC_API_KEY"
    SANDBOX_BACKEND_ADDR=10.0.0.5:3000 claude-coder --kimi --api-key "$MOONSHOT_API_KEY" --kill

It creates a sandbox of the ``claude-code`` template (code-server on port 8080, already serving in
the snapshot, and ``claude``) whose ports are private (``allow_public_traffic=False``: only
requests holding its traffic token reach them), with the key in its environment; writes Claude
Code's own files for the sandbox's user ``user`` (``~/.claude.json``: onboarding done, this key
approved, the workspace trusted; ``~/.claude/settings.json``: the key, base URL and models under
``env``, which Claude Code reads however it is started: the IDE's terminals do not inherit the
sandbox's environment, since code-server was started before the snapshot); and prints a URL that
opens the IDE through the backend's proxy from any machine that reaches the backend:

- ``http://8080-<id>.<domain>/?folder=/home/user/workspace&trenvx_token=<token>`` (host form),
  when the backend's announced domain resolves for the browser: a real domain (wildcard DNS), or
  ``localhost`` when the backend itself is reached on loopback (browsers resolve ``*.localhost``);
- ``http://<backend>/sandboxes/<id>/ports/8080/?folder=...&trenvx_token=<token>`` (path form)
  otherwise, e.g. a backend announcing ``localhost`` reached from another machine.

The token in the URL is the sandbox's traffic access token: the proxy trades it for a cookie and
takes it out of the address bar; whoever has the URL has the sandbox, nobody who only guesses its
id does. The URL alone goes to stdout (``url=$(claude-coder ...)``), everything else to stderr.

Lifetime: without ``--kill`` the command prints the URL, says when the sandbox's timeout ends it
(``--timeout``, default one hour) and exits, leaving it running; ``sandbox-cli sandbox kill ID``
ends it sooner. With ``--kill`` it stays in the foreground and kills the sandbox on Ctrl-C (or
SIGTERM, or the terminal closing); it exits by itself if the sandbox ends first. A Ctrl-C while
the sandbox is being set up kills it in either mode.

This module uses only the SDK (no trenvx host module): it is the SDK package's console script.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import ipaddress
import json
import shlex
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, TextIO
from urllib.parse import quote, urlsplit

from ._config import ENV_ADDR, resolve_api_url
from .exceptions import NotFoundError, SandboxError, SandboxNotFoundError

DEFAULT_TEMPLATE = "claude-code"
IDE_PORT = 8080
"""code-server's port in the claude-code template."""
USER = "user"
HOME = "/home/user"
WORKSPACE = "/home/user/workspace"
DEFAULT_TIMEOUT_S = 3600
CREATE_REQUEST_TIMEOUT_S = 120.0
"""A create may restore a 4 GiB template on a busy host: more than the SDK's default request timeout."""
WAIT_POLL_S = 5.0
"""How often ``--kill`` looks whether the sandbox still runs."""
TOKEN_PARAM = "trenvx_token"
"""The proxy's query parameter for the traffic token (trenvx.server.traffic_auth.TOKEN_PARAM)."""

# Kimi (Moonshot AI) through its Anthropic-compatible API. TrEnv-X's claude-coder
# (github.com/JothamWong/TrEnv-X, sandbox-sdk/sandbox_sdk/claude_code/main.py) sets, for --kimi,
# ANTHROPIC_BASE_URL to Kimi's Anthropic endpoint (its api.moonshot.cn variant) next to
# ANTHROPIC_API_KEY; Kimi's own Claude Code guide (github.com/LLM-Red-Team/kimi-cc, README_EN.md)
# documents ANTHROPIC_BASE_URL=https://api.moonshot.ai/anthropic/ with the model kimi-k2-0711-preview.
# ANTHROPIC_MODEL and ANTHROPIC_SMALL_FAST_MODEL are the main and small/fast model variables of
# Claude Code 1.x; Claude Code 2.x names the small model's slot ANTHROPIC_DEFAULT_HAIKU_MODEL and the
# /model aliases ANTHROPIC_DEFAULT_SONNET_MODEL / _OPUS_MODEL (code.claude.com/docs/en/env-vars), so
# they name Kimi's model too: no Claude model name reaches Kimi's API.
KIMI_BASE_URL = "https://api.moonshot.ai/anthropic"
KIMI_MODEL = "kimi-k2-0711-preview"
KIMI_MODEL_VARS = ("ANTHROPIC_MODEL", "ANTHROPIC_SMALL_FAST_MODEL", "ANTHROPIC_DEFAULT_HAIKU_MODEL",
                   "ANTHROPIC_DEFAULT_SONNET_MODEL", "ANTHROPIC_DEFAULT_OPUS_MODEL")

CLAUDE_JSON = f"{HOME}/.claude.json"
CLAUDE_SETTINGS = f"{HOME}/.claude/settings.json"


class UsageError(Exception):
    """Bad command-line input; the message says what was wrong and what to do."""


@dataclass(frozen=True)
class Options:
    """What the command was asked to do."""

    api_key: str
    kimi: bool = False
    template: str = DEFAULT_TEMPLATE
    timeout: int = DEFAULT_TIMEOUT_S
    kill: bool = False
    port: int = IDE_PORT
    url_form: str = "auto"
    api_url: str = ""
    """The backend's base URL (``--backend``, else ``SANDBOX_BACKEND_ADDR``, else 127.0.0.1)."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="claude-coder",
        description="Create a private sandbox with a web VS Code and Claude Code, and print the URL that "
                    f"opens it in a browser. The backend is {ENV_ADDR} (host, host:port or URL; "
                    "default 127.0.0.1:5000), or --backend.",
        epilog="Without --kill the sandbox keeps running until its timeout; the command says when, and exits.")
    p.add_argument("--api-key", dest="api_key", metavar="KEY", required=True,
                   help="the Anthropic API key (with --kimi: the Moonshot/Kimi API key) Claude Code uses; "
                        "it goes into the sandbox only")
    p.add_argument("--kimi", action="store_true",
                   help=f"use Kimi's Anthropic-compatible API ({KIMI_BASE_URL}, model {KIMI_MODEL})")
    p.add_argument("--template", default=DEFAULT_TEMPLATE, help=f"the sandbox template (default {DEFAULT_TEMPLATE})")
    p.add_argument("--timeout", type=int, default=DEFAULT_TIMEOUT_S, metavar="S",
                   help=f"the sandbox's lifetime in seconds (default {DEFAULT_TIMEOUT_S})")
    p.add_argument("--kill", action="store_true",
                   help="stay in the foreground and kill the sandbox on Ctrl-C (default: leave it running "
                        "until its timeout and exit)")
    p.add_argument("--port", type=int, default=IDE_PORT, help=f"the IDE's port in the sandbox (default {IDE_PORT})")
    p.add_argument("--url-form", choices=("auto", "host", "path"), default="auto",
                   help="host: http://PORT-ID.<domain>/ (needs *.<domain> to resolve to the backend); path: "
                        "http://<backend>/sandboxes/ID/ports/PORT/; auto (default): host when the backend's "
                        "domain resolves for a browser, else path")
    p.add_argument("--backend", metavar="ADDR", default=None,
                   help=f"the backend's address (overrides {ENV_ADDR})")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> Options:
    """The options of one command line; :class:`UsageError` naming what is wrong."""
    ns = _parser().parse_args(argv)
    key = (ns.api_key or "").strip()
    if not key:
        raise UsageError("--api-key is empty: give the API key Claude Code should use "
                         "(with --kimi, your Moonshot/Kimi key)")
    if any(c.isspace() for c in key):
        raise UsageError("--api-key contains whitespace: quote the key exactly as issued, without spaces or newlines")
    if ns.timeout < 1:
        raise UsageError(f"--timeout {ns.timeout}: give the sandbox's lifetime in seconds, at least 1")
    if not 1 <= ns.port <= 65535:
        raise UsageError(f"--port {ns.port}: not a port number (1-65535)")
    if not ns.template.strip():
        raise UsageError("--template is empty: name a built template (default claude-code)")
    try:
        api_url = resolve_api_url(ns.backend)
    except ValueError as e:
        raise UsageError(f"the backend address ({'--backend' if ns.backend else ENV_ADDR}) is not valid: {e}") from None
    return Options(api_key=key, kimi=ns.kimi, template=ns.template.strip(), timeout=ns.timeout, kill=ns.kill,
                   port=ns.port, url_form=ns.url_form, api_url=api_url)


# -- what goes into the sandbox ------------------------------------------------------------------


def claude_env(api_key: str, kimi: bool) -> Dict[str, str]:
    """The environment Claude Code needs: the key, and with ``kimi`` Kimi's base URL and models."""
    env = {"ANTHROPIC_API_KEY": api_key}
    if kimi:
        env["ANTHROPIC_BASE_URL"] = KIMI_BASE_URL
        for name in KIMI_MODEL_VARS:
            env[name] = KIMI_MODEL
    return env


def claude_json(existing: Mapping[str, Any], api_key: str) -> Dict[str, Any]:
    """``~/.claude.json`` with Claude Code's first-run questions answered: onboarding done, this API
    key approved (Claude Code records a key by its last 20 characters), the workspace trusted.
    Whatever the file held already (the template's first ``claude`` run) is kept."""
    out = dict(existing)
    out["hasCompletedOnboarding"] = True
    responses = dict(out.get("customApiKeyResponses") or {})
    suffix = api_key[-20:]
    approved = [k for k in responses.get("approved") or [] if k != suffix] + [suffix]
    responses["approved"] = approved
    responses["rejected"] = [k for k in responses.get("rejected") or [] if k != suffix]
    out["customApiKeyResponses"] = responses
    projects = dict(out.get("projects") or {})
    project = dict(projects.get(WORKSPACE) or {})
    project.update(hasTrustDialogAccepted=True, hasCompletedProjectOnboarding=True)
    projects[WORKSPACE] = project
    out["projects"] = projects
    return out


def claude_settings(existing: Mapping[str, Any], env: Mapping[str, str]) -> Dict[str, Any]:
    """``~/.claude/settings.json`` with ``env`` added to its ``env`` (Claude Code applies it to every
    session, however ``claude`` was started)."""
    out = dict(existing)
    merged = dict(out.get("env") or {})
    merged.update(env)
    out["env"] = merged
    return out


# -- the URL -------------------------------------------------------------------------------------


def _is_loopback_name(host: str) -> bool:
    h = host.strip().strip("[]").lower().rstrip(".")
    if h == "localhost" or h.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def _domain_host(domain: str) -> str:
    """The host part of an announced domain (``localhost:3000`` -> ``localhost``)."""
    return urlsplit("//" + domain).hostname or domain


def url_form(api_url: str, domain: str, requested: str = "auto") -> str:
    """``host`` or ``path``: ``requested`` unless ``auto``; then ``host`` when the browser resolves
    ``*.<domain>`` to the backend (a real domain, or a loopback one while the backend is reached on
    loopback), else ``path``."""
    if requested in ("host", "path"):
        return requested
    if not domain:
        return "path"
    backend_host = urlsplit(api_url).hostname or ""
    if _is_loopback_name(_domain_host(domain)) and not _is_loopback_name(backend_host):
        return "path"
    return "host"


def ide_url(api_url: str, sandbox_id: str, domain: str, port: int, token: str, *, form: str = "auto",
            folder: str = WORKSPACE) -> str:
    """The URL that opens the IDE on ``port`` of the sandbox, with the traffic ``token`` the proxy
    trades for a cookie (see :func:`url_form` for which form)."""
    parts = urlsplit(api_url)
    query = f"folder={quote(folder, safe='/')}&{TOKEN_PARAM}={quote(token, safe='')}"
    if url_form(api_url, domain, form) == "host":
        return f"{parts.scheme or 'http'}://{int(port)}-{sandbox_id}.{domain}/?{query}"
    base = api_url.rstrip("/")
    return f"{base}/sandboxes/{sandbox_id}/ports/{int(port)}/?{query}"


# -- running it ----------------------------------------------------------------------------------


class _Stop(Exception):
    """SIGTERM or SIGHUP while the command holds a sandbox: end it as on Ctrl-C."""


def _read_json(sandbox: Any, path: str) -> Dict[str, Any]:
    """A JSON object file of the sandbox's user, {} when absent or not an object."""
    try:
        text = sandbox.files.read(path, user=USER)
    except NotFoundError:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def configure(sandbox: Any, api_key: str, env: Mapping[str, str]) -> None:
    """Write Claude Code's files for ``user`` (readable by ``user`` alone: they hold the key)."""
    sandbox.files.write(CLAUDE_JSON, json.dumps(claude_json(_read_json(sandbox, CLAUDE_JSON), api_key), indent=2),
                        user=USER)
    sandbox.files.write(CLAUDE_SETTINGS,
                        json.dumps(claude_settings(_read_json(sandbox, CLAUDE_SETTINGS), env), indent=2), user=USER)
    sandbox.commands.run(f"chmod 600 {shlex.quote(CLAUDE_JSON)} {shlex.quote(CLAUDE_SETTINGS)}", user=USER)


def _end_time(sandbox: Any, timeout: int) -> _dt.datetime:
    try:
        end = sandbox.get_info().end_at
    except SandboxError:
        end = None
    if end is None:
        end = _dt.datetime.now(_dt.timezone.utc) + _dt.timedelta(seconds=timeout)
    return end


def _kill(sandbox: Any, err: TextIO) -> None:
    try:
        sandbox.kill()
    except SandboxError as e:
        print(f"claude-coder: could not kill sandbox {sandbox.sandbox_id}: {e}; it ends at its timeout "
              f"(or: sandbox-cli sandbox kill {sandbox.sandbox_id})", file=err)
        return
    print(f"Sandbox {sandbox.sandbox_id} killed.", file=err)


def _wait(sandbox: Any, err: TextIO, sleep: Callable[[float], None]) -> None:
    """Returns once the sandbox no longer runs (its timeout, or killed elsewhere)."""
    warned = False
    while True:
        sleep(WAIT_POLL_S)
        try:
            sandbox.get_info()
        except SandboxNotFoundError:
            return
        except SandboxError as e:
            if not warned:
                print(f"claude-coder: cannot reach the backend to watch the sandbox ({e}); still waiting", file=err)
                warned = True
            continue
        warned = False


def run(opts: Options, *, sandbox_class: Any = None, out: TextIO = sys.stdout, err: TextIO = sys.stderr,
        sleep: Callable[[float], None] = time.sleep) -> int:
    """Create, configure, print the URL; with ``--kill`` wait and kill. Returns the exit status."""
    if sandbox_class is None:
        from .e2b import Sandbox as sandbox_class  # noqa: N813 - the SDK's synchronous E2B-style class
    env = claude_env(opts.api_key, opts.kimi)
    print(f"Creating a sandbox of template {opts.template!r} on {opts.api_url} ...", file=err)
    try:
        sandbox = sandbox_class.create(opts.template, timeout=opts.timeout, envs=env,
                                       network={"allow_public_traffic": False}, api_url=opts.api_url,
                                       request_timeout=CREATE_REQUEST_TIMEOUT_S)
    except KeyboardInterrupt:
        print("claude-coder: interrupted while the sandbox was being created; if the backend made it, it ends "
              "at its timeout (sandbox-cli sandbox ls shows it)", file=err)
        return 130
    except SandboxError as e:
        print(f"claude-coder: could not create a sandbox of template {opts.template!r} on {opts.api_url}: {e}",
              file=err)
        return 1
    held = [sandbox]
    delivered = False

    def stop(signum: int, frame: Any) -> None:
        raise _Stop(signal.Signals(signum).name)

    previous = ({s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGHUP)}
                if threading.current_thread() is threading.main_thread() else {})
    try:
        token = sandbox.traffic_access_token
        if not token:
            print(f"claude-coder: the backend did not make sandbox {sandbox.sandbox_id} private (no traffic access "
                  "token in its answer), so anyone could open its IDE; killing it. Update the backend.", file=err)
            _kill(sandbox, err)
            return 1
        try:
            configure(sandbox, opts.api_key, env)
        except SandboxError as e:
            print(f"claude-coder: could not set up Claude Code for user {USER!r} in sandbox {sandbox.sandbox_id} "
                  f"(is {opts.template!r} a claude-code template?): {e}", file=err)
            _kill(sandbox, err)
            return 1
        url = ide_url(opts.api_url, sandbox.sandbox_id, sandbox.sandbox_domain, opts.port, token, form=opts.url_form)
        end = _end_time(sandbox, opts.timeout).astimezone()
        print(f"Sandbox {sandbox.sandbox_id} is ready{' (Kimi)' if opts.kimi else ''}. Open the IDE "
              "(the link holds the sandbox's access token: share it with nobody):", file=err)
        print(url, file=out, flush=True)
        delivered = True
        if not opts.kill:
            held.clear()
            print(f"The sandbox keeps running until its timeout, at {end:%Y-%m-%d %H:%M:%S %Z} ({opts.timeout} s); "
                  f"end it sooner with: sandbox-cli sandbox kill {sandbox.sandbox_id}", file=err)
            return 0
        print(f"Press Ctrl-C to kill the sandbox (its timeout ends it at {end:%H:%M:%S %Z} otherwise).", file=err)
        _wait(sandbox, err, sleep)
        held.clear()
        print(f"Sandbox {sandbox.sandbox_id} has ended (its timeout, or killed elsewhere).", file=err)
        return 0
    except (KeyboardInterrupt, _Stop):
        if not held:
            return 130
        print("", file=err)  # past the terminal's ^C
        _kill(held[0], err)
        return 0 if opts.kill and delivered else 130
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        with contextlib.suppress(Exception):
            sandbox.close()  # the connections only: a sandbox left running keeps running


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        opts = parse_args(argv)
    except UsageError as e:
        print(f"claude-coder: {e}", file=sys.stderr)
        return 2
    return run(opts)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
