"""A sandbox's lifecycle in E2B's Python shape, turned into the backend's create fields.

``Sandbox.create(lifecycle={"on_timeout": "pause", "auto_resume": True})`` (E2B's
``SandboxLifecycle``): at its timeout the sandbox is paused to disk instead of killed, and a request
through the backend's proxy resumes it. ``on_timeout`` is ``"kill"``, ``"pause"``, or
``{"action": "pause", "mode": "full" | "filesystem"}`` (``mode="filesystem"``: the auto-pause
keeps only its filesystem, a resume boots it; ``keep_memory`` is E2B's older spelling). The backend
gets E2B's create fields ``autoPause``, ``autoPauseMemory`` and ``autoResume: {"enabled": ...}``;
what is not given is left out, so the backend's defaults apply (kill, no auto-resume).
"""

from __future__ import annotations

from typing import Any, Dict, Literal, Mapping, NotRequired, Optional, TypedDict, Union

from .exceptions import InvalidArgumentError

SnapshotMode = Literal["full", "filesystem"]


class SandboxOnTimeoutPause(TypedDict):
    """``on_timeout`` as an object: pause, keeping memory (``"full"``) or only the filesystem."""

    action: Literal["pause"]
    mode: NotRequired[SnapshotMode]
    keep_memory: NotRequired[bool]


class SandboxOnTimeoutKill(TypedDict):
    action: Literal["kill"]


SandboxOnTimeout = Union[Literal["pause", "kill"], SandboxOnTimeoutPause, SandboxOnTimeoutKill]


class SandboxLifecycle(TypedDict):
    """``lifecycle`` of ``Sandbox.create`` (E2B's ``SandboxLifecycle``).

    Example: ``Sandbox.create(lifecycle={"on_timeout": "pause", "auto_resume": True})``"""

    on_timeout: SandboxOnTimeout
    auto_resume: NotRequired[bool]


def _memory_of(pause: Mapping[str, Any]) -> Optional[bool]:
    mode, keep = pause.get("mode"), pause.get("keep_memory")
    if mode is not None and keep is not None:
        raise InvalidArgumentError('on_timeout: give "mode" or "keep_memory", not both')
    if mode is not None:
        if mode not in ("full", "filesystem"):
            raise InvalidArgumentError(f'on_timeout["mode"] must be "full" or "filesystem", not {mode!r}')
        return mode == "full"
    if keep is not None and not isinstance(keep, bool):
        raise InvalidArgumentError(f'on_timeout["keep_memory"] must be True or False, not {keep!r}')
    return keep


def create_lifecycle_body(lifecycle: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """The create request's lifecycle fields (``autoPause``, ``autoPauseMemory``, ``autoResume``) for
    ``lifecycle``; empty when it is None. Raises :class:`InvalidArgumentError` naming what is wrong."""
    if lifecycle is None:
        return {}
    if not isinstance(lifecycle, Mapping):
        raise InvalidArgumentError(f"lifecycle must be a dict like {{'on_timeout': 'pause'}}, not {lifecycle!r}")
    unknown = sorted(set(lifecycle) - {"on_timeout", "auto_resume"})
    if unknown:
        raise InvalidArgumentError(f"lifecycle: unknown key(s) {unknown}; use on_timeout and auto_resume")
    raw = lifecycle.get("on_timeout")
    memory: Optional[bool] = None
    if isinstance(raw, Mapping):
        action = raw.get("action")
        extra = sorted(set(raw) - {"action", "mode", "keep_memory"})
        if extra:
            raise InvalidArgumentError(f"on_timeout: unknown key(s) {extra}; use action and mode")
        if action != "pause" and ("mode" in raw or "keep_memory" in raw):
            raise InvalidArgumentError('on_timeout: "mode" is only allowed with action "pause"')
        memory = _memory_of(raw) if action == "pause" else None
    else:
        action = raw
    if raw is not None and action not in ("pause", "kill"):
        where = 'on_timeout["action"]' if isinstance(raw, Mapping) else "on_timeout"
        raise InvalidArgumentError(f'{where} must be "pause" or "kill", not {action!r}')
    auto_resume = lifecycle.get("auto_resume")
    if auto_resume is not None and not isinstance(auto_resume, bool):
        raise InvalidArgumentError(f"lifecycle auto_resume must be True or False, not {auto_resume!r}")
    if auto_resume and action != "pause":
        raise InvalidArgumentError('auto_resume can be True only with on_timeout "pause"')
    if auto_resume and memory is False:
        raise InvalidArgumentError(
            'auto_resume cannot be True with on_timeout mode "filesystem": a filesystem-only pause boots on resume, '
            "so traffic cannot wake it; resume it with connect()")
    body: Dict[str, Any] = {}
    if raw is not None:
        body["autoPause"] = action == "pause"
    if memory is not None:
        body["autoPauseMemory"] = memory
    if auto_resume is not None:
        body["autoResume"] = {"enabled": auto_resume}
    return body

