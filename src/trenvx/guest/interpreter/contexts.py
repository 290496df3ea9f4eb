"""Contexts: each one a kernel of one language in one working directory.

The default context of a language is what an ``/execute`` without ``context_id`` runs in:
python's is started with the server (so it is in the template's snapshot, numpy, pandas and
matplotlib already imported), bash's on its first use. Other contexts come from
``POST /contexts``. A removed default context is started again when next needed.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

from .identity import IdentityWatch, reseed_if_identity_changed
from .kernel import Kernel, KernelStartError, LaunchSettings
from .languages import Language

log = logging.getLogger("trenvx_interpreter.contexts")


class UnknownContext(LookupError):
    """No context has this id."""


class KernelNotInstalled(RuntimeError):
    """The language's Jupyter kernel spec is not installed in this sandbox."""


@dataclass
class Context:
    id: str
    language: Language
    cwd: str
    kernel: Kernel
    default: bool = False

    def as_json(self) -> dict[str, str]:
        return {"id": self.id, "language": self.language.name, "cwd": self.cwd}


KernelFactory = Callable[[Language, str, str], Kernel]


def effective_cwd(requested: str | None, default: str, home: str) -> str:
    """The directory a kernel starts in: the requested one (else ``default``) when it is a
    directory, else the user's home, else ``/``."""
    for candidate in (requested or default, home):
        if candidate and os.path.isdir(candidate):
            return candidate
    return "/"


class Contexts:
    """The contexts of this sandbox, and the default one of each language."""

    def __init__(self, launch: LaunchSettings, default_cwd: str, identity: IdentityWatch,
                 kernel_factory: KernelFactory | None = None) -> None:
        self.launch = launch
        self.default_cwd = default_cwd
        self.identity = identity
        self._factory: KernelFactory = kernel_factory or (
            lambda language, cwd, kid: Kernel(language, cwd, launch, kid))
        self._lock = threading.Lock()
        self._contexts: dict[str, Context] = {}
        self._defaults: dict[str, str] = {}
        self._default_locks: dict[str, threading.Lock] = {}

    # ------------------------------------------------------------------ queries
    def get(self, context_id: str) -> Context:
        with self._lock:
            ctx = self._contexts.get(context_id)
        if ctx is None:
            raise UnknownContext(f"context {context_id!r} not found")
        return ctx

    def list(self) -> list[Context]:
        with self._lock:
            return list(self._contexts.values())

    def default_started(self, language: Language) -> bool:
        with self._lock:
            return language.name in self._defaults

    # ------------------------------------------------------------------ changes
    def check_installed(self, language: Language) -> None:
        """KernelNotInstalled naming the kernel spec and how to install it, when it is missing."""
        try:
            KernelSpecManager().get_kernel_spec(language.kernel_spec)
        except NoSuchKernel:
            raise KernelNotInstalled(
                f"the {language.name} kernel (Jupyter kernel spec {language.kernel_spec!r}) is not installed "
                f"in this sandbox; install it in the template: {language.install_hint}") from None

    def create(self, language: Language, cwd: str | None, *, default: bool = False) -> Context:
        """Start a kernel and register it as a new context (KernelStartError if it fails)."""
        self.check_installed(language)
        directory = effective_cwd(cwd, self.default_cwd, self.launch.run_as.home)
        context_id = uuid.uuid4().hex
        kernel = self._factory(language, directory, context_id)
        try:
            kernel.start()
        except BaseException:
            kernel.shutdown(wait_s=5)
            raise
        ctx = Context(context_id, language, directory, kernel, default)
        with self._lock:
            self._contexts[context_id] = ctx
            if default:
                self._defaults[language.name] = context_id
        return ctx

    def default(self, language: Language) -> Context:
        """The default context of ``language``, started now if it is not running."""
        with self._lock:
            context_id = self._defaults.get(language.name)
            if context_id is not None and context_id in self._contexts:
                return self._contexts[context_id]
            start_lock = self._default_locks.setdefault(language.name, threading.Lock())
        with start_lock:  # one start at a time; the others wait for it
            with self._lock:
                context_id = self._defaults.get(language.name)
                if context_id is not None and context_id in self._contexts:
                    return self._contexts[context_id]
            return self.create(language, None, default=True)

    def delete(self, context_id: str) -> None:
        with self._lock:
            ctx = self._contexts.pop(context_id, None)
            if ctx is None:
                raise UnknownContext(f"context {context_id!r} not found")
            if self._defaults.get(ctx.language.name) == context_id:
                del self._defaults[ctx.language.name]
        ctx.kernel.shutdown()

    def restart(self, context_id: str) -> None:
        self.get(context_id).kernel.restart()

    def before_execution(self) -> bool:
        """Reseed every kernel when the sandbox's identity changed (see :mod:`.identity`)."""
        return reseed_if_identity_changed(self.identity, [ctx.kernel for ctx in self.list()])

    def shutdown(self) -> None:
        with self._lock:
            contexts = list(self._contexts.values())
            self._contexts.clear()
            self._defaults.clear()
        threads = [threading.Thread(target=ctx.kernel.shutdown, daemon=True) for ctx in contexts]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20)


__all__ = ["Context", "Contexts", "KernelNotInstalled", "KernelStartError", "UnknownContext", "effective_cwd"]
