"""Helpers that live INSIDE each python kernel, as the module ``_trenvx_kernel``.

The server never imports this for itself: it sends this file's source to every python kernel
when the kernel starts (:func:`trenvx_interpreter.languages.Python.bootstrap`), which runs it
as a fresh module registered in ``sys.modules`` under ``_trenvx_kernel``. So the user's
namespace gets no new names, and later calls are one short expression such as
``__import__("_trenvx_kernel").reseed()``. Standard library only (numpy and matplotlib are
used only when importable).
"""

import json
import os
import sys

_saved_env: list[dict] = []


def setup(preload: bool, identity_file: str | None = None) -> None:
    """Ready the kernel for its first cell: watch the sandbox's identity (``identity_file``,
    see :func:`watch_identity`); with ``preload``, import numpy, pandas and matplotlib (when
    importable) and configure matplotlib's inline backend, so a cell run right after a
    sandbox's restore answers at once and figures come back as PNG ``display_data``."""
    if identity_file:
        watch_identity(identity_file)
    if not preload:
        return
    for name in ("numpy", "pandas"):
        try:
            __import__(name)
        except Exception:  # not installed, or broken: the cell that uses it will say so
            pass
    try:
        import matplotlib.pyplot as plt
    except Exception:
        return
    try:
        import io

        from IPython import get_ipython

        shell = get_ipython()
        if shell is not None:
            shell.run_line_magic("matplotlib", "inline")
            # A figure comes back at the size it asks for (figsize x dpi), not cropped to what it
            # draws (Jupyter's default, bbox_inches='tight').
            shell.run_line_magic("config", "InlineBackend.print_figure_kwargs = {'bbox_inches': None}")
        # Draw once: loads the font cache and the Agg renderer now rather than in the first cell.
        fig = plt.figure(figsize=(1, 1))
        fig.add_subplot().plot([0, 1], [0, 1])
        fig.savefig(io.BytesIO(), format="png")
        plt.close(fig)
    except Exception as exc:  # never fail the kernel's start over a plot backend
        print(f"trenvx: matplotlib setup failed: {exc!r}", file=sys.__stderr__)


def _read_identity(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return None


def watch_identity(path: str) -> bool:
    """Reseed (:func:`reseed`) before the first execution that finds ``path`` (the sandbox's
    machine id) changed since the last one: every sandbox restored from one snapshot gets its
    own. An IPython ``pre_execute`` hook (it runs before every cell, silent ones too), so a
    restored sandbox's first cell costs one small file read rather than a round trip to the
    kernel. Replaces an earlier hook of this module. False where there is no IPython shell."""
    try:
        from IPython import get_ipython
    except Exception:
        return False
    shell = get_ipython()
    if shell is None:
        return False
    seen = [_read_identity(path)]

    def trenvx_identity_check() -> None:
        current = _read_identity(path)
        if current != seen[0]:
            seen[0] = current
            reseed()

    hooks = shell.events.callbacks.get("pre_execute", [])
    for hook in [h for h in hooks if getattr(h, "__name__", "") == trenvx_identity_check.__name__]:
        shell.events.unregister("pre_execute", hook)
    shell.events.register("pre_execute", trenvx_identity_check)
    return True


def apply_env(encoded: str) -> None:
    """Set the environment variables of one execution (``encoded``: a JSON object of strings);
    :func:`restore_env` puts the previous values back after the cell."""
    new = json.loads(encoded)
    _saved_env.append({key: os.environ.get(key) for key in new})
    os.environ.update(new)


def restore_env() -> None:
    """Undo every :func:`apply_env` not yet undone (unset what was unset before)."""
    while _saved_env:
        for key, value in _saved_env.pop().items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def reseed() -> None:
    """Fresh random state for a kernel whose memory another sandbox shares (every sandbox
    restored from one snapshot starts with the same RNG state): Python's ``random``, numpy's
    global RNG, ``tempfile``'s name generator, torch's default generator when imported."""
    import random

    random.seed(os.urandom(32))
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        try:
            numpy.random.seed(numpy.frombuffer(os.urandom(32), dtype=numpy.uint32))
        except Exception:
            pass
    tempfile = sys.modules.get("tempfile")
    if tempfile is not None and hasattr(tempfile, "_name_sequence"):
        tempfile._name_sequence = None  # made again on next use, seeded from os.urandom
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            torch.manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
        except Exception:
            pass
