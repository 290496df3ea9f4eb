"""A paused sandbox moved to this node from the node that holds it, so it can resume here
(``POST /sandboxes/{id}/resume?node=<name>`` or ``/connect?node=<name>`` through any node).

The node that holds it (the giver, :class:`trenvx.sandbox.handover.PausedHandover`) offers its
record and files, each with its SHA-256; this node copies the template's build first if it lacks
it, downloads the files into a staging directory, checks them, moves them into place and takes the
sandbox over (:func:`trenvx.sandbox.handover.adopt_paused`); then the giver forgets it. Anything
that fails before the takeover gives the sandbox back to the giver untouched and leaves nothing
here. The giver must be alive: a dead node's files cannot be reached (no shared storage).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import shutil
import time
from typing import TYPE_CHECKING, Any

import httpx

from ..sandbox.handover import adopt_paused
from ..sandbox.state import SandboxRecord
from ..template.store import MANIFEST, TemplateBuild, TemplateManifest, TemplateNotFound
from .records import NodeRecord
from .template_copy import COPY_TIMEOUT, FileDigest, TemplateCopyError, download

if TYPE_CHECKING:
    from .node import ClusterNode

log = logging.getLogger(__name__)


class SandboxMoveError(RuntimeError):
    """The sandbox could not be moved here; it stays paused where it was."""


async def pull_paused(node: "ClusterNode", sandbox_id: str, giver: NodeRecord) -> float:
    """Move the paused ``sandbox_id`` from ``giver`` to ``node``; returns the seconds it took.
    Raises :class:`SandboxMoveError`."""
    manager = node.manager
    t0 = time.monotonic()
    base = f"{giver.url}/cluster/sandboxes/{sandbox_id}"
    async with httpx.AsyncClient(timeout=COPY_TIMEOUT, headers=node.internal_headers()) as client:
        try:
            r = await client.post(f"{base}/handover")
        except httpx.HTTPError as e:
            raise SandboxMoveError(f"node {giver.name} did not answer: {e!r}") from None
        if r.status_code != 200:
            raise SandboxMoveError(f"node {giver.name} refused to hand sandbox {sandbox_id} over ({r.status_code}): "
                                   f"{message_of(r)}")
        offer: dict[str, Any] = r.json()
        staging = manager.data_root.sandboxes / f".{sandbox_id}.moving"
        try:
            build = await _build_here(node, offer)
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(mode=0o700)
            for f in offer["files"]:
                fd = FileDigest(**f)
                dest = (staging / fd.name).resolve()
                if not dest.is_relative_to(staging.resolve()) or fd.name.startswith("/"):
                    raise SandboxMoveError(f"a file named {fd.name!r} is refused")
                dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                try:
                    await download(client, f"{base}/files/{fd.name}", dest, fd)
                except TemplateCopyError as e:
                    raise SandboxMoveError(str(e)) from None
            workdir = manager.data_root.sandbox_dir(sandbox_id)
            if workdir.exists():
                raise SandboxMoveError(f"{workdir} exists here already")
            staging.rename(workdir)
            fields = {f.name for f in dataclasses.fields(SandboxRecord)}
            record = SandboxRecord(**{k: v for k, v in offer["record"].items() if k in fields})
            record = dataclasses.replace(record, workdir=str(workdir))
            await adopt_paused(manager, record, build)
        except BaseException as e:
            shutil.rmtree(staging, ignore_errors=True)
            if manager.data_root.sandbox_dir(sandbox_id).exists() and sandbox_id not in {s.id for s in manager.list()}:
                shutil.rmtree(manager.data_root.sandbox_dir(sandbox_id), ignore_errors=True)
            try:
                await client.post(f"{base}/handover/abort")
            except httpx.HTTPError:
                pass  # the giver takes it back by itself after its hold times out
            if isinstance(e, (SandboxMoveError, asyncio.CancelledError)):
                raise
            raise SandboxMoveError(f"moving sandbox {sandbox_id} from node {giver.name} failed: "
                                   f"{type(e).__name__}: {e}") from e
        try:
            r = await client.post(f"{base}/handover/done")
            if r.status_code != 200:
                log.warning("cluster: node %s did not confirm the handover of %s (%s): %s", giver.name, sandbox_id,
                            r.status_code, message_of(r))
        except httpx.HTTPError as e:
            log.warning("cluster: node %s did not confirm the handover of %s: %r", giver.name, sandbox_id, e)
    seconds = time.monotonic() - t0
    log.info("cluster: sandbox %s moved here from node %s (paused) in %.1f s", sandbox_id, giver.name, seconds)
    return seconds


async def _build_here(node: "ClusterNode", offer: dict[str, Any]) -> TemplateBuild:
    """The build the sandbox stands on, in this node's store (copied if it is the template's current)."""
    store = node.manager.templates
    template, build_id = offer["template"], offer["build_id"]
    path = store.build_dir(template, build_id)
    if not (path / MANIFEST).is_file():
        try:
            await node.ensure_template(template)
        except TemplateCopyError as e:
            raise SandboxMoveError(str(e)) from None
    if not (path / MANIFEST).is_file():
        try:
            have = store.current(template).manifest.build_id
        except TemplateNotFound:
            have = "none"
        raise SandboxMoveError(f"sandbox {offer['record']['id']} stands on build {build_id} of {template}, which "
                               f"no node offers any more (this node holds {have})")
    return TemplateBuild(path, TemplateManifest.model_validate_json((path / MANIFEST).read_text()))


def message_of(r: httpx.Response) -> str:
    """The ``message`` of another node's error answer (else the start of its body)."""
    try:
        return str(r.json().get("message", r.text[:300]))
    except ValueError:
        return r.text[:300]
