"""Running a :class:`~trenvx.template.steps.BuildPlan`'s steps in the template's build VM.

:class:`StepsBuilder` is the :class:`~trenvx.template.builder.TemplateBuilder` (same stages,
same store, same reuse of unchanged builds) with two additions:

- the plan's digest is an input of the build, so a template rebuilt with the same base image,
  steps, uploaded files and commands is the build already published (nothing runs again);
- after the VM booted and before its start command and snapshot, the steps run through the
  guest agent, in order: RUN as a process (``/bin/bash -l -c``, as E2B's envd runs commands) of
  the step's user, in the current working directory, with the ENV so far; COPY by uploading the
  archive into the guest and unpacking it there (:mod:`trenvx.template.guest_copy`); WORKDIR
  made if missing (owned by the current user); USER checked to exist. Their output goes to the
  build's log line by line; the first failing step ends the build with :class:`StepFailed`,
  whose message holds the step, the command and its last output lines.

Nothing of a step runs on the host: the root filesystem is the base image unchanged, and the
steps' processes are the VM's, with what it reaches (a build VM's network slot, as for
``template-manager``'s start command).

The start command then starts as the plan's final user in its final working directory (E2B
runs it as the template's user), and the builder waits for the ready command as usual.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import Config, StartCommand, TemplateConfig
from ..guest.client import AgentClient
from ..vmm.base import Vm
from .builder import BuildReporter, TemplateBuilder
from .steps import (
    START_USER, START_WORKDIR, BuildPlan, CopyStep, EnvStep, RunStep, Step, UserStep, WorkdirStep, expand_vars,
    resolve_workdir,
)
from .uploads import UploadStore

GUEST_DIR = "/opt/trenvx-build"
"""Where uploaded archives are unpacked in the build VM; removed before the snapshot."""
GUEST_COPY_SRC = Path(__file__).with_name("guest_copy.py")
STEP_TIMEOUT_S = 3600.0
TAIL_LINES = 30

StepLog = Callable[[str | None, str, str], None]
"""``(step label or None, message, level)``: one line of the build's log."""


class StepFailed(Exception):
    """A build step failed; ``step`` is its label (E2B's step number, 1 = the first step)."""

    def __init__(self, step: str, message: str) -> None:
        super().__init__(message)
        self.step = step
        self.message = message


def describe(step: Step) -> str:
    if isinstance(step, RunStep):
        return f"RUN {step.command}" + (f" (as {step.user})" if step.user else "")
    if isinstance(step, CopyStep):
        return f"COPY {step.src} {step.dest}"
    if isinstance(step, EnvStep):
        return "ENV " + " ".join(f"{k}={v}" for k, v in step.values)
    if isinstance(step, WorkdirStep):
        return f"WORKDIR {step.path}"
    return f"USER {step.user}"


class _Lines:
    """Splits a process's output into lines for the log, keeping the last ones for errors."""

    def __init__(self, emit: Callable[[str], None]) -> None:
        self.emit = emit
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self._buf = {"stdout": b"", "stderr": b""}

    def feed(self, stream: str, data: bytes) -> None:
        buf = self._buf[stream] + data
        *lines, rest = buf.split(b"\n")
        self._buf[stream] = rest
        for raw in lines:
            self._line(raw)
        if len(rest) > 64 * 1024:  # no newline for 64 KiB: cut it
            self._line(rest)
            self._buf[stream] = b""

    def _line(self, raw: bytes) -> None:
        text = raw.decode(errors="replace").rstrip("\r")
        self.tail.append(text)
        self.emit(text)

    def close(self) -> str:
        for stream, rest in self._buf.items():
            if rest:
                self._line(rest)
            self._buf[stream] = b""
        return "\n".join(self.tail)


class StepRunner:
    """Runs a plan's steps through one agent client."""

    def __init__(self, client: AgentClient, plan: BuildPlan, uploads: UploadStore, log: StepLog) -> None:
        self.client = client
        self.plan = plan
        self.uploads = uploads
        self.log = log
        self.user = START_USER
        self.workdir = START_WORKDIR
        self.env: dict[str, str] = {}
        self._copier_ready = False

    async def run_all(self) -> None:
        total = len(self.plan.steps)
        try:
            for step in self.plan.steps:
                self.log(step.label, f"[{step.label}/{total}] {describe(step)}", "info")
                await self.run(step)
        finally:
            await self.client.run(["rm", "-rf", GUEST_DIR], user="root", timeout=600)

    async def run(self, step: Step) -> None:
        if isinstance(step, RunStep):
            await self._process(step.label, step.command, user=step.user or self.user, what=f"RUN {step.command!r}")
        elif isinstance(step, CopyStep):
            await self._copy(step)
        elif isinstance(step, EnvStep):
            for k, v in step.values:
                self.env[k] = expand_vars(v, self.env)
        elif isinstance(step, WorkdirStep):
            path = resolve_workdir(self.workdir, expand_vars(step.path, self.env))
            script = 'if [ ! -d "$1" ]; then mkdir -p "$1" && chown "$2" "$1"; fi'
            await self._process(step.label, ["/bin/sh", "-c", script, "sh", path, self.user.split(":")[0]],
                                user="root", what=f"WORKDIR {path}")
            self.workdir = path
        elif isinstance(step, UserStep):
            name = step.user.split(":")[0]
            res = await self.client.run(["id", "-u", name], user="root", timeout=60)
            if res.exit_code != 0:
                raise StepFailed(step.label, f"step {step.label} (USER {step.user}): no user {name!r} in the template; "
                                             "create it in an earlier RUN step (e.g. useradd -m NAME)")
            self.user = step.user

    async def _process(self, label: str, cmd: str | list[str], *, user: str, what: str) -> None:
        lines = _Lines(lambda text: self.log(label, text, "info"))
        code: int | None = None
        error: str | None = None
        events = self.client.start(cmd, envs=self.env or None, cwd=self.workdir, user=user.split(":")[0],
                                   timeout=STEP_TIMEOUT_S)
        try:
            async for event in events:
                if event.kind in ("stdout", "stderr"):
                    lines.feed(event.kind, event.data)
                elif event.kind == "end":
                    code, error = event.exit_code, event.error
        except Exception as e:  # noqa: BLE001 - the agent refused or the stream broke: the step failed
            tail = lines.close()
            raise StepFailed(label, f"step {label} ({what} as {user}) could not run: {e}"
                                    + (f"\nits last output:\n{tail}" if tail else "")) from e
        finally:
            await events.aclose()
        tail = lines.close()
        if code != 0:
            why = f"exit code {code}" if code not in (None, -1) else (error or "no exit status")
            raise StepFailed(label, f"step {label} ({what} as {user}) failed with {why}"
                                    + (f"; its last output:\n{tail}" if tail else "; it printed nothing"))

    async def _copy(self, step: CopyStep) -> None:
        if not self._copier_ready:
            await self.client.upload(f"{GUEST_DIR}/guest_copy.py", GUEST_COPY_SRC.read_bytes(), user="root")
            self._copier_ready = True
        archive = f"{GUEST_DIR}/{step.label}.tar"
        await self.client.upload(archive, self.uploads.path(step.files_hash), user="root")
        dest = expand_vars(step.dest, self.env)
        if not dest.startswith("/"):
            dest = posixpath.join(self.workdir, dest)
        args = {"archive": archive, "stage": f"{GUEST_DIR}/{step.label}", "src": step.path, "dest": dest,
                "owner": step.owner or self.user, "mode": step.mode}
        await self._process(step.label, ["/bin/sh", "-c", 'exec python3 "$@"', "sh", f"{GUEST_DIR}/guest_copy.py",
                                         json.dumps(args)], user="root", what=f"COPY {step.src} {dest}")


class StepsBuilder(TemplateBuilder):
    """A template build whose steps run in the build VM (see the module's docstring)."""

    def __init__(self, config: Config, plan: BuildPlan, uploads: UploadStore, step_log: StepLog,
                 reporter: BuildReporter | None = None) -> None:
        super().__init__(config, reporter)
        self.plan = plan
        self.uploads = uploads
        self.step_log = step_log

    def input_digest(self, tpl: TemplateConfig) -> tuple[str, dict[str, str]]:
        _, inputs = super().input_digest(tpl)
        inputs = {**inputs, "steps": self.plan.digest()}
        return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest(), inputs

    async def _start_and_wait_ready(self, vm: Vm, tpl: TemplateConfig) -> None:
        client = AgentClient.for_endpoint(vm.agent_endpoint, timeout=120.0)
        try:
            await StepRunner(client, self.plan, self.uploads, self.step_log).run_all()
            if self.plan.start_cmd:
                self.step_log("finalize", f"start command (as {self.plan.final_user}): {self.plan.start_cmd}", "info")
                stream = client.start(self.plan.start_cmd, cwd=self.plan.final_workdir,
                                      user=self.plan.final_user.split(":")[0], tag="start_cmd")
                try:
                    first = await stream.__anext__()
                finally:
                    await stream.aclose()  # the process keeps running; only our stream ends
                if first.kind != "start":
                    raise StepFailed("finalize", f"the start command did not start: {first}")
        finally:
            await client.aclose()
        await super()._start_and_wait_ready(vm, tpl.model_copy(update={"start_cmd": StartCommand()}))


def template_config(name: str, plan: BuildPlan, machine: dict[str, Any]) -> TemplateConfig:
    """The template an API build makes: the plan's base image, its commands, ``machine``'s sizes
    (vcpu, mem_mb, disk_mb, kernel_version, vmm_type, overlay)."""
    default_user = plan.final_user.split(":")[0]
    # The sandboxes' default user: the plan's last USER when the image has it before the steps
    # run (root, or ``user``, which every build gets); an account a step makes is not there yet.
    user = {"user": default_user if default_user in ("root", START_USER) else START_USER}
    return TemplateConfig(
        name=name, docker_img=plan.base_image, no_pull=True,
        start_cmd=StartCommand(cmd=plan.start_cmd, working_dir=plan.final_workdir) if plan.start_cmd else StartCommand(),
        ready_cmd=plan.ready_cmd, ready_timeout_s=600.0,
        **(user if "user" in TemplateConfig.model_fields else {}),  # the setting arrives with issue 13 item 4
        **machine,
    )


__all__ = ["GUEST_DIR", "StepFailed", "StepRunner", "StepsBuilder", "describe", "template_config"]
