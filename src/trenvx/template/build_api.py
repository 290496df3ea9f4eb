"""Template builds requested over the API (E2B's v3 build flow), run in the server's background.

The flow, as E2B's ``Template.build`` drives it::

    request(name, cpu, memory)         -> a build id, status "waiting"     (POST /v3/templates)
    files for each COPY, by hash       -> stored by UploadStore             (GET + PUT .../files/{hash})
    start(template, build, steps)      -> checked, queued                   (POST /v2/templates/.../builds/...)
    status(offset)                     -> building -> ready | error, logs   (GET .../builds/.../status)

A build is the same pipeline as ``template-manager`` (:class:`~.step_runner.StepsBuilder`), under
the name the request gave; one build runs at a time and at most ``MAX_QUEUED`` wait. A build
whose inputs (base image, steps, files, commands, machine) equal the published one's is that
build again, at once. Names of the server's configured templates (and templates that
``template-manager`` built) are not the API's to overwrite: a template the API made carries a
marker file (``templates/<name>/.build-api``).

Build records live in memory (the last ``MAX_RECORDS``); published templates outlive the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ValidationError

from ..build_errors import BuildError
from ..config import Config, TemplateConfig
from ..layout import DataRoot
from .rootfs import Buildah
from .step_runner import StepFailed, StepsBuilder, template_config
from .steps import BuildPlan, StepError, is_base_image, parse_build
from .store import TemplateNotFound, TemplateStore
from .uploads import UploadStore, files_hash

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,127}$")
IMAGE_REF_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@-]{0,255}$")
"""What may be looked up in the local image storage (never an option of the lookup command)."""
MARKER = ".build-api"
MAX_QUEUED = 8
MAX_RECORDS = 200
MAX_LOG_ENTRIES = 20_000
LEVELS = ("debug", "info", "warn", "error")
Status = Literal["waiting", "building", "ready", "error"]


class BuildApiError(Exception):
    """A request the build API refuses; ``kind`` says how (the HTTP layer maps it to a status)."""

    kind: Literal["invalid", "not_found", "conflict", "busy"] = "invalid"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(BuildApiError):
    kind = "invalid"


class BuildNotFound(BuildApiError):
    kind = "not_found"


class NameTaken(BuildApiError):
    kind = "conflict"


class QueueFull(BuildApiError):
    kind = "busy"


@dataclass
class LogEntry:
    timestamp: dt.datetime
    level: str
    message: str
    step: str | None = None


@dataclass
class BuildRecord:
    build_id: str
    template: str
    machine: dict[str, Any]
    created_at: dt.datetime
    status: Status = "waiting"
    logs: list[LogEntry] = field(default_factory=list)
    reason: str | None = None
    reason_step: str | None = None
    started: bool = False
    finished_at: dt.datetime | None = None
    trenvx_build_id: str | None = None
    reused: bool = False
    task: asyncio.Task[None] | None = None

    def add(self, message: str, level: str = "info", step: str | None = None) -> None:
        if len(self.logs) >= MAX_LOG_ENTRIES:
            if len(self.logs) == MAX_LOG_ENTRIES:
                self.logs.append(LogEntry(_now(), "warn", f"more than {MAX_LOG_ENTRIES} log lines: the rest is not kept"))
            if level != "error":
                return
        self.logs.append(LogEntry(_now(), level, message, step))

    def entries(self, offset: int = 0, limit: int = 100, level: str | None = None) -> list[LogEntry]:
        """Log entries from ``offset`` on (at most ``limit``), of ``level`` or more severe."""
        logs = self.logs[max(offset, 0):]
        if level in LEVELS:
            least = LEVELS.index(level)
            logs = [e for e in logs if LEVELS.index(e.level) >= least]
        return logs[:max(limit, 0)]


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class _Reporter:
    """The builder's stages and messages into a build's log."""

    def __init__(self, record: BuildRecord) -> None:
        self.record = record

    def stage_started(self, stage: str) -> None:
        self.record.add(f"stage {stage} ...", step=_stage_step(stage))

    def stage_finished(self, stage: str, seconds: float) -> None:
        self.record.add(f"stage {stage} done in {seconds:.1f}s", step=_stage_step(stage))

    def message(self, text: str) -> None:
        self.record.add(text)

    def step(self, label: str | None, text: str, level: str) -> None:
        self.record.add(text, level, label)


def _stage_step(stage: str) -> str:
    return "base" if stage in ("kernel", "accelerator", "rootfs", "boot") else "finalize"


def split_name(name: str, tags: list[str] | None) -> str:
    """``name`` or ``name:tag`` -> the template name; only the tag ``latest`` exists here."""
    base, _, tag = name.partition(":")
    wanted = {t for t in ([tag] if tag else []) + list(tags or [])}
    if wanted - {"latest"}:
        raise InvalidRequest(
            f"tags {sorted(wanted - {'latest'})}: template tags are not implemented by trenvx; build under a name "
            "without ':tag' (each build replaces the template's previous one)"
        )
    if "/" in base:
        raise InvalidRequest(f"name {name!r}: namespaced names (team/name) are not used by trenvx; give the name alone")
    if not NAME_RE.match(base):
        raise InvalidRequest(
            f"name {name!r} is not a template name: use lowercase letters, digits, '-' and '_' (at most 128)"
        )
    return base


class BuildService:
    """The builds of one server; call :meth:`aclose` when it stops."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.data_root = DataRoot(config.data_root).ensure()
        self.store = TemplateStore(self.data_root)
        self.uploads = UploadStore(self.data_root)
        self.uploads.remove_partial()
        self._records: dict[str, BuildRecord] = {}
        self._turn = asyncio.Semaphore(1)
        self._closed = False

    # -- names

    def owned(self, name: str) -> bool:
        """The template was made through this API (its name is the API's to build again), or a
        build of it was requested here."""
        return (self.data_root.template_dir(name) / MARKER).is_file() or any(
            r.template == name for r in self._records.values())

    def _mark(self, name: str) -> None:
        """The name becomes the API's on disk when a build of it starts (not when it is requested:
        a request never started left a directory behind for good)."""
        marker = self.data_root.template_dir(name) / MARKER
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()

    def _unmark_if_unbuilt(self, name: str) -> None:
        """After a failed build: a name with no build on disk and no other build under way is
        nobody's again, and its directory goes (if the build left nothing else in it)."""
        if self.store.builds(name) or any(
                r.template == name and r.status in ("waiting", "building") and r.started for r in self._records.values()):
            return
        d = self.data_root.template_dir(name)
        with contextlib.suppress(OSError):
            (d / MARKER).unlink()
            d.rmdir()

    def knows(self, name: str) -> bool:
        """A template of that name exists, or has a build requested through the API."""
        return (name in self.store.names() or name in self.config.template or self.owned(name)
                or any(r.template == name for r in self._records.values()))

    def _check_name_free(self, name: str) -> None:
        if name in self.config.template or name == self.config.default_template:
            raise NameTaken(f"template {name!r} is defined in the server's config and built by template-manager; "
                            "choose another name")
        if name in self.store.names() and not self.owned(name):
            raise NameTaken(f"template {name!r} exists and was built by template-manager; choose another name")

    # -- the flow

    def machine(self, cpu_count: int | None, memory_mb: int | None, min_free_disk_mb: int | None) -> dict[str, Any]:
        """The VM of a new template: the request's sizes over those of the default template."""
        out: dict[str, Any] = {}
        try:
            m = self.store.current(self.config.default_template).manifest
            cfg = m.config
            out = {"vcpu": cfg.get("vcpu", 1), "mem_mb": cfg.get("mem_mb", 256), "disk_mb": cfg.get("disk_mb", 512),
                   "kernel_version": m.kernel_version, "vmm_type": m.vmm_type, "overlay": cfg.get("overlay")}
        except TemplateNotFound:
            tpl = self.config.template.get(self.config.default_template)
            if tpl is not None:
                out = {k: getattr(tpl, k) for k in ("vcpu", "mem_mb", "disk_mb", "kernel_version", "vmm_type", "overlay")}
        host_cpus = os.cpu_count() or 1
        host_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >> 20
        if cpu_count is not None:
            if not 1 <= cpu_count <= host_cpus:
                raise InvalidRequest(f"cpuCount {cpu_count}: this host has {host_cpus} CPUs; ask for 1 to {host_cpus}")
            out["vcpu"] = cpu_count
        if memory_mb is not None:
            if not 64 <= memory_mb <= host_mb // 2:
                raise InvalidRequest(f"memoryMB {memory_mb}: ask for 64 to {host_mb // 2} MiB (half of this host's memory)")
            out["mem_mb"] = memory_mb
        if min_free_disk_mb is not None:
            if not 0 <= min_free_disk_mb <= 1024 * 1024:
                raise InvalidRequest(f"minFreeDiskMB {min_free_disk_mb}: ask for 0 to 1048576 MiB")
            out["disk_mb"] = max(min_free_disk_mb, 64)
        return out

    def request(self, name: str, *, tags: list[str] | None = None, cpu_count: int | None = None,
                memory_mb: int | None = None, min_free_disk_mb: int | None = None) -> BuildRecord:
        """A new build of ``name`` (E2B's POST /v3/templates): reserved, waiting for its steps."""
        template = split_name(name, tags)
        self._check_name_free(template)
        machine = self.machine(cpu_count, memory_mb, min_free_disk_mb)
        rec = BuildRecord(build_id=str(uuid.uuid4()), template=template, machine=machine, created_at=_now())
        rec.add(f"build {rec.build_id} of template {template!r} requested "
                f"({machine.get('vcpu')} vCPU, {machine.get('mem_mb')} MiB)")
        self._keep(rec)
        return rec

    def get(self, template: str, build_id: str) -> BuildRecord:
        rec = self._records.get(build_id)
        if rec is None or rec.template != template:
            raise BuildNotFound(f"no build {build_id[:80]!r} of template {template[:200]!r} on this server "
                                "(builds are kept in memory: a restarted server forgets them)")
        return rec

    async def start(self, template: str, build_id: str, body: dict[str, Any]) -> BuildRecord:
        """Check the steps (E2B's POST /v2/templates/{id}/builds/{build}) and queue the build."""
        rec = self.get(template, build_id)
        if rec.started:
            raise NameTaken(f"build {build_id} was started already; request a new build to build again")
        if self._closed:
            raise QueueFull("the server is shutting down; no new builds")
        if sum(1 for r in self._records.values() if r.started and r.status in ("waiting", "building")) >= MAX_QUEUED:
            raise QueueFull(f"{MAX_QUEUED} builds are queued or running; try again when one has finished")
        rec.started = True
        image = body.get("fromImage")
        local = False
        if isinstance(image, str) and image.strip() and not is_base_image(image.strip()):
            local = await self._local_image(image.strip())
        # What cannot be built fails the build (status error, with the reason), as E2B fails a
        # build whose base or steps it cannot use: the SDK raises it from the status it polls.
        try:
            plan = parse_build(body, local_image=local)
            tpl = template_config(template, plan, rec.machine)
        except StepError as e:
            self._refuse(rec, str(e))
            return rec
        except ValidationError as e:
            self._refuse(rec, f"the template's settings are invalid: {e.errors()[0].get('msg')}")
            return rec
        missing = [c for c in plan.copies if not self.uploads.present(c.files_hash)]
        if missing:
            c = missing[0]
            self._refuse(rec, f"step {c.label} (COPY {c.src}): its files (hash {c.files_hash}) were not uploaded; get "
                              "an upload link with GET /templates/{templateID}/files/{hash} and PUT them first", c.label)
            return rec
        if plan.final_user.split(":")[0] not in ("root", "user"):
            rec.add(f"the template's sandboxes will run as 'user': an account made by a build step "
                    f"({plan.final_user!r}) cannot be their default user yet", "warn")
        self._mark(template)
        rec.task = asyncio.get_running_loop().create_task(self._run(rec, plan, tpl), name=f"build-{template}")
        return rec

    async def _local_image(self, ref: str) -> bool:
        if not IMAGE_REF_RE.match(ref):
            return False
        try:
            return await Buildah(self.data_root, log.debug).inspect_image(ref) is not None
        except Exception:  # noqa: BLE001 - buildah missing or failing: not local
            return False

    async def _run(self, rec: BuildRecord, plan: BuildPlan, tpl: TemplateConfig) -> None:
        reporter = _Reporter(rec)
        try:
            async with self._turn:
                rec.status = "building"
                rec.add("build started")
                for c in plan.copies:
                    got = await asyncio.to_thread(files_hash, self.uploads.path(c.files_hash), c.src, c.dest)
                    if got != c.files_hash:
                        self.uploads.discard(c.files_hash)
                        raise StepFailed(c.label, f"step {c.label} (COPY {c.src}): the uploaded files do not match "
                                                  f"their hash {c.files_hash}; build again to upload them anew")
                config = self.config.model_copy(update={"template": {**self.config.template, rec.template: tpl}})
                builder = StepsBuilder(config, plan, self.uploads, reporter.step, reporter)
                result = await builder.build(rec.template, force=plan.force)
                rec.trenvx_build_id = result.build.build_id
                rec.reused = result.skipped
                rec.add(f"template {rec.template!r} is ready: build {result.build.build_id}"
                        + (" (unchanged inputs: the published build is reused)" if result.skipped else ""))
                rec.status = "ready"
        except asyncio.CancelledError:
            self._fail(rec, "the server stopped during the build", None)
            raise
        except Exception as e:  # noqa: BLE001 - every failure ends the build with its reason
            failed = _cause(e, StepFailed)
            if isinstance(failed, StepFailed):
                self._fail(rec, failed.message, failed.step)
            elif isinstance(e, BuildError):
                self._fail(rec, f"stage {e.stage} failed: {e.message}", _stage_step(e.stage))
            else:
                log.exception("build %s of %s failed", rec.build_id, rec.template)
                self._fail(rec, f"{type(e).__name__}: {e}", None)
        finally:
            rec.finished_at = _now()
            if rec.status == "error":
                self._unmark_if_unbuilt(rec.template)

    def _refuse(self, rec: BuildRecord, message: str, step: str | None = None) -> None:
        self._fail(rec, f"this build cannot run here: {message}", step)
        rec.finished_at = _now()

    def _fail(self, rec: BuildRecord, message: str, step: str | None) -> None:
        rec.status = "error"
        rec.reason = message
        rec.reason_step = step
        rec.add(message, "error", step)

    def _keep(self, rec: BuildRecord) -> None:
        self._records[rec.build_id] = rec
        if len(self._records) > MAX_RECORDS:
            for old in sorted(self._records.values(), key=lambda r: r.created_at):
                if old.task is None or old.task.done():
                    del self._records[old.build_id]
                    if len(self._records) <= MAX_RECORDS:
                        break

    async def aclose(self) -> None:
        """Cancel running and queued builds (each removes what it made) and wait for them."""
        self._closed = True
        tasks = [r.task for r in self._records.values() if r.task is not None and not r.task.done()]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t


def _cause(e: BaseException, kind: type[BaseException]) -> BaseException | None:
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, kind):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


__all__ = ["BuildApiError", "BuildNotFound", "BuildRecord", "BuildService", "InvalidRequest", "LogEntry",
           "NameTaken", "QueueFull", "split_name"]
