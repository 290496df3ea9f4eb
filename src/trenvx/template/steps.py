"""A template described as E2B's ``Template`` SDK sends it: a base image and build steps, checked
and turned into a :class:`BuildPlan` that trenvx can build.

E2B's SDK posts (``POST /v2/templates/{id}/builds/{build}``)::

    {"fromImage": "debian:bookworm", "force": false,
     "steps": [{"type": "RUN", "args": ["echo hi > /x", "root"], "force": false},
               {"type": "COPY", "args": ["app.py", "/app/", "", "0755"], "filesHash": "<sha256>"},
               {"type": "ENV", "args": ["K", "V", "K2", "V2"]},
               {"type": "WORKDIR", "args": ["/app"]}, {"type": "USER", "args": ["user"]}],
     "startCmd": "python3 app.py", "readyCmd": "sleep 2"}

How trenvx builds it (see :mod:`trenvx.template.step_runner`): the root filesystem is the base
image alone (``docker_img``: no build step runs on the host), and the steps run in order inside
the template's build VM, through its guest agent, before the start command and the snapshot:
RUN as a process of the step's user, COPY by unpacking the uploaded archive in the guest. So a
step can reach only what the VM reaches, like the sandboxes made from it.

The state the steps start from is E2B's: user ``user``, working directory ``/home/user``, no
extra environment. ``ENV`` values are expanded like a Dockerfile's (``$VAR`` and ``${VAR}`` from
earlier ``ENV`` steps) and hold for the later steps only (E2B: "available only during the build").

What cannot be built here is refused with :class:`StepError`, whose message names the field:
base images other than the local Debian base or an image already in trenvx's local storage (no
registry is reached), registry credentials, ``fromTemplate``, unknown step types.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from .rootfs import BASE_ALIASES, BASE_IMAGE, normalize_ref

BASE_REF = "debian:bookworm"
"""What ``fromImage`` names for trenvx's local Debian base (built with debootstrap, no registry)."""
BASE_SYNONYMS = frozenset(
    normalize_ref(r) for r in ("debian:bookworm", "debian:12", "debian:bookworm-slim", "debian:12-slim", BASE_IMAGE)
) | frozenset(BASE_ALIASES)
"""References served by the local base image (bookworm with python3: the slim variants are close)."""

START_USER = "user"
START_WORKDIR = "/home/user"
MAX_STEPS = 500
MAX_ARG = 256 * 1024
FILES_HASH_RE = re.compile(r"^[0-9a-f]{64}$")
ACCOUNT_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,255}$")
MODE_RE = re.compile(r"^0?[0-7]{3,4}$")
_VAR_RE = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


class StepError(ValueError):
    """The build request cannot be built here; the message names the field and what to do."""


@dataclass(frozen=True)
class RunStep:
    label: str
    command: str
    user: str | None
    """None: the user of the build at that point (the last USER step, else ``user``)."""
    kind: Literal["RUN"] = "RUN"


@dataclass(frozen=True)
class CopyStep:
    label: str
    src: str
    """A path or glob relative to the SDK's file context, as the step gives it (part of filesHash)."""
    dest: str
    owner: str | None
    """``name`` or ``name:group``; None: the user of the build at that point."""
    mode: int | None
    files_hash: str
    kind: Literal["COPY"] = "COPY"

    @property
    def path(self) -> str:
        """``src`` normalised: where its files are in the uploaded archive."""
        return posixpath.normpath(self.src)


@dataclass(frozen=True)
class EnvStep:
    label: str
    values: tuple[tuple[str, str], ...]
    kind: Literal["ENV"] = "ENV"


@dataclass(frozen=True)
class WorkdirStep:
    label: str
    path: str
    kind: Literal["WORKDIR"] = "WORKDIR"


@dataclass(frozen=True)
class UserStep:
    label: str
    user: str
    kind: Literal["USER"] = "USER"


Step = RunStep | CopyStep | EnvStep | WorkdirStep | UserStep


@dataclass(frozen=True)
class BuildPlan:
    """What to build: the base image (``docker_img`` of the template) and the steps run in the VM."""

    base_image: str
    steps: tuple[Step, ...] = ()
    start_cmd: str = ""
    ready_cmd: str = ""
    force: bool = False
    final_user: str = START_USER
    final_workdir: str = START_WORKDIR
    copies: tuple[CopyStep, ...] = field(default=(), compare=False)

    @property
    def files_hashes(self) -> list[str]:
        return sorted({c.files_hash for c in self.copies})

    def digest(self) -> str:
        """A hash of everything the steps change in the template (``force`` is not an input)."""
        doc = {"base": self.base_image, "steps": [asdict(s) for s in self.steps],
               "start": self.start_cmd, "ready": self.ready_cmd}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def expand_vars(value: str, env: Mapping[str, str]) -> str:
    """``$VAR`` and ``${VAR}`` replaced from ``env`` (unset: empty), as a Dockerfile's ENV does."""
    return _VAR_RE.sub(lambda m: env.get(m.group(1) or m.group(2), ""), value)


def resolve_workdir(current: str, path: str) -> str:
    """A WORKDIR relative to the current one, normalised (``..`` cannot climb above ``/``)."""
    return posixpath.normpath(posixpath.join(current, path)) if path else current


def is_base_image(ref: str) -> bool:
    return "$" not in ref and normalize_ref(ref) in BASE_SYNONYMS


def _text(value: Any, where: str, *, allow_empty: bool = False, one_line: bool = True) -> str:
    if not isinstance(value, str):
        raise StepError(f"{where}: expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise StepError(f"{where}: must not be empty")
    if "\x00" in value:
        raise StepError(f"{where}: contains a NUL character")
    if one_line and ("\n" in value or "\r" in value):
        raise StepError(f"{where}: must be a single line")
    if len(value) > MAX_ARG:
        raise StepError(f"{where}: longer than {MAX_ARG} characters")
    return value


def _account(value: str, where: str) -> str:
    for part in value.split(":", 1):
        if not ACCOUNT_RE.match(part):
            raise StepError(f"{where}: {value!r} is not a user name (or user:group); use letters, digits, '_', '.', '-'")
    return value


def _relative_src(value: str, where: str) -> str:
    if value.startswith("/"):
        raise StepError(f"{where}: source {value!r} is absolute; sources are relative to the template's file context")
    norm = posixpath.normpath(value)
    if norm == ".." or norm.startswith("../"):
        raise StepError(f"{where}: source {value!r} leaves the template's file context ('..')")
    return value


def _step(index: int, raw: Any) -> Step:
    label = str(index)
    if not isinstance(raw, dict):
        raise StepError(f"steps[{index - 1}]: expected an object with type and args")
    kind = raw.get("type")
    where = f"steps[{index - 1}] ({kind})"
    args = raw.get("args") or []
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise StepError(f"{where}: args must be a list of strings")
    if kind == "RUN":
        if len(args) not in (1, 2):
            raise StepError(f"{where}: args must be [command] or [command, user]")
        command = _text(args[0], f"{where} command", one_line=False)
        user = _account(args[1], f"{where} user") if len(args) == 2 and args[1] else None
        return RunStep(label, command, user)
    if kind == "COPY":
        if len(args) < 2 or len(args) > 4:
            raise StepError(f"{where}: args must be [src, dest, user, mode]")
        src = _relative_src(_text(args[0], f"{where} src"), where)
        dest = _text(args[1], f"{where} dest")
        owner = args[2] if len(args) > 2 and args[2] else None
        if owner is not None:
            _account(owner, f"{where} user")
        mode_text = args[3] if len(args) > 3 and args[3] else None
        if mode_text is not None and not MODE_RE.match(mode_text):
            raise StepError(f"{where}: mode {mode_text!r} is not an octal mode such as 0755")
        files_hash = raw.get("filesHash")
        if not isinstance(files_hash, str) or not FILES_HASH_RE.match(files_hash):
            raise StepError(f"{where}: filesHash must be the SDK's lowercase hex SHA-256 of the files")
        return CopyStep(label, src, dest, owner, int(mode_text, 8) if mode_text else None, files_hash)
    if kind == "ENV":
        if not args or len(args) % 2:
            raise StepError(f"{where}: args must be pairs of name and value")
        values = []
        for k, v in zip(args[::2], args[1::2]):
            if not ENV_NAME_RE.match(k):
                raise StepError(f"{where}: {k!r} is not an environment variable name")
            values.append((k, _text(v, f"{where} {k}", allow_empty=True, one_line=False)))
        return EnvStep(label, tuple(values))
    if kind == "WORKDIR":
        if len(args) != 1:
            raise StepError(f"{where}: args must be [path]")
        return WorkdirStep(label, _text(args[0], f"{where} path"))
    if kind == "USER":
        if len(args) != 1:
            raise StepError(f"{where}: args must be [user]")
        return UserStep(label, _account(_text(args[0], f"{where} user"), where))
    raise StepError(f"{where}: step type {kind!r} is not supported (RUN, COPY, ENV, WORKDIR, USER are)")


def parse_build(body: Mapping[str, Any], *, local_image: bool = False) -> BuildPlan:
    """Check E2B's ``TemplateBuildStartV2`` body and make the plan.

    ``local_image``: ``fromImage`` (not the Debian base) was found in trenvx's local image storage.
    """
    if body.get("fromTemplate"):
        raise StepError(
            "fromTemplate: building on another template is not supported by trenvx yet; start from "
            f"fromImage {BASE_REF!r} (Template().from_image({BASE_REF!r})) and repeat its steps"
        )
    if body.get("fromImageRegistry"):
        raise StepError(
            "fromImageRegistry: trenvx builds without registries, so registry credentials cannot be used; "
            f"base the template on {BASE_REF!r} or an image loaded into the server's local storage"
        )
    image = body.get("fromImage")
    if not isinstance(image, str) or not image.strip():
        raise StepError(f"fromImage: required (e.g. {BASE_REF!r})")
    image = _text(image.strip(), "fromImage")
    if is_base_image(image):
        base = BASE_REF
    elif local_image:
        base = image
    else:
        raise StepError(
            f"fromImage {image!r} is not available on this trenvx server: it builds without a registry. "
            f"Use {BASE_REF!r} (trenvx's local Debian base: Template().from_image({BASE_REF!r}), or "
            f"FROM {BASE_REF} in a Dockerfile), or load the image into the server's local image storage first"
        )
    raw_steps = body.get("steps") or []
    if not isinstance(raw_steps, list):
        raise StepError("steps: expected a list")
    if len(raw_steps) > MAX_STEPS:
        raise StepError(f"steps: {len(raw_steps)} steps; at most {MAX_STEPS}")
    steps = tuple(_step(i + 1, s) for i, s in enumerate(raw_steps))
    force = bool(body.get("force")) or any(isinstance(s, dict) and s.get("force") for s in raw_steps)
    start = body.get("startCmd") or ""
    ready = body.get("readyCmd") or ""
    start = _text(start, "startCmd", allow_empty=True, one_line=False)
    ready = _text(ready, "readyCmd", allow_empty=True, one_line=False)
    user, workdir = START_USER, START_WORKDIR
    for s in steps:
        if isinstance(s, UserStep):
            user = s.user
        elif isinstance(s, WorkdirStep):
            workdir = resolve_workdir(workdir, s.path)
    return BuildPlan(
        base_image=base, steps=steps, start_cmd=start, ready_cmd=ready, force=force,
        final_user=user, final_workdir=workdir, copies=tuple(s for s in steps if isinstance(s, CopyStep)),
    )


__all__ = [
    "BASE_REF", "BuildPlan", "CopyStep", "EnvStep", "RunStep", "Step", "StepError", "UserStep", "WorkdirStep",
    "expand_vars", "is_base_image", "parse_build", "resolve_workdir",
]
