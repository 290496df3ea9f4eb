"""The languages the interpreter runs, and the code it sends to their kernels for itself.

A :class:`Language` names its Jupyter kernel spec and writes the short cells the server runs
silently around a user's cell: the kernel's start-up, setting and restoring one execution's
environment variables, and reseeding its random state after a restore.

Names a request may use (case-insensitive):

* ``python`` (also ``python3``): ipykernel, kernel spec ``python3``
* ``bash`` (also ``sh``): the ``bash_kernel`` package's kernel, kernel spec ``bash``

Environment values never become code: python receives them as one JSON text inside a Python
string literal (``repr``), bash as ``$'...'`` strings in which every byte outside
``[A-Za-z0-9_./-]`` is a ``\\xHH`` escape, and names must be ``[A-Za-z_][A-Za-z0-9_]*``
(:func:`check_env`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_ENV_VARS = 1000
_BASH_PLAIN = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_./-")

HELPER_MODULE = "_trenvx_kernel"
"""The module name :mod:`.kernelside` gets inside each python kernel."""
CHARTS_MODULE = "_trenvx_charts"
"""The module name :mod:`.kernel_charts` (a result's ``data`` and ``chart``) gets inside each python kernel."""


def _module_code(filename: str, module: str) -> str:
    """One expression that runs this package's ``filename`` as the module ``module`` inside a
    kernel, without leaving a name in the user's namespace."""
    source = Path(__file__).with_name(filename).read_text(encoding="utf-8")
    return (f"exec(compile({source!r}, '<trenvx {module}>', 'exec'), "
            f"__import__('sys').modules.setdefault({module!r}, __import__('types').ModuleType({module!r})).__dict__)\n")


class UnknownLanguage(ValueError):
    """A request named a language the interpreter does not run."""


def check_env(env: object) -> dict[str, str]:
    """``env_vars`` of a request as a dict of str -> str; ValueError saying what is wrong."""
    if env is None:
        return {}
    if not isinstance(env, dict):
        raise ValueError("env_vars must be an object of name -> string value (or null)")
    if len(env) > MAX_ENV_VARS:
        raise ValueError(f"env_vars has {len(env)} entries; at most {MAX_ENV_VARS}")
    for key, value in env.items():
        if not isinstance(key, str) or not ENV_NAME.fullmatch(key):
            raise ValueError(f"env_vars: invalid name {key!r}: use letters, digits and '_', not starting with a digit")
        if not isinstance(value, str):
            raise ValueError(f"env_vars: the value of {key} must be a string, not {type(value).__name__}")
        if "\x00" in value:
            raise ValueError(f"env_vars: the value of {key} contains a NUL character")
    return dict(env)


def bash_quote(value: str) -> str:
    """``value`` as a bash ``$'...'`` word: one line, every byte but a few plain ones escaped."""
    return "$'" + "".join(chr(b) if b in _BASH_PLAIN else f"\\x{b:02x}" for b in value.encode("utf-8")) + "'"


@dataclass(frozen=True)
class Language:
    """One language: its canonical name, the kernel spec it runs on, and the silent cells."""

    name: str
    kernel_spec: str
    install_hint: str
    reseeds_itself: bool = False
    """Its :meth:`bootstrap` leaves a hook in the kernel that notices a new identity file before
    each cell and reseeds there: no silent cell (a round trip to the kernel) on a restored
    sandbox's first request. Else the server sends :meth:`reseed` before the next cell."""
    kernel_arguments: tuple[str, ...] = ()
    """Appended to the kernel spec's command line."""

    def bootstrap(self, preload: bool, identity_file: str | None = None) -> str:
        """Code run once after the kernel starts (and after each restart); ``identity_file``:
        what a kernel that :attr:`reseeds_itself` watches."""
        raise NotImplementedError

    def apply_env(self, env: dict[str, str]) -> str:
        """Code that sets ``env`` for the next cell (``env`` passed :func:`check_env`)."""
        raise NotImplementedError

    def restore_env(self, env: dict[str, str]) -> str:
        """Code that undoes :meth:`apply_env` after the cell."""
        raise NotImplementedError

    def reseed(self) -> str:
        """Code that gives the kernel fresh random state (after a restore from a snapshot)."""
        raise NotImplementedError


class Python(Language):
    def bootstrap(self, preload: bool, identity_file: str | None = None) -> str:
        return (
            _module_code("kernelside.py", HELPER_MODULE)
            + f"__import__({HELPER_MODULE!r}).setup({bool(preload)!r}, {identity_file!r})\n"
            # After setup (it configures matplotlib's inline backend); never raises.
            + _module_code("kernel_charts.py", CHARTS_MODULE)
            + f"__import__({CHARTS_MODULE!r}).register()\n"
        )

    def apply_env(self, env: dict[str, str]) -> str:
        return f"__import__({HELPER_MODULE!r}).apply_env({json.dumps(env)!r})\n"

    def restore_env(self, env: dict[str, str]) -> str:
        return f"__import__({HELPER_MODULE!r}).restore_env()\n"

    def reseed(self) -> str:
        return f"__import__({HELPER_MODULE!r}).reseed()\n"


class Bash(Language):
    def bootstrap(self, preload: bool, identity_file: str | None = None) -> str:
        return ""

    def apply_env(self, env: dict[str, str]) -> str:
        # declare -p prints a variable (value and attributes) as bash code that recreates it,
        # or nothing when it is unset: restore_env evaluates what it printed.
        return "".join(
            f"__trenvx_saved_{key}=$(declare -p {key} 2>/dev/null); export {key}={bash_quote(value)}\n"
            for key, value in env.items()
        )

    def restore_env(self, env: dict[str, str]) -> str:
        # Only where apply_env ran (a kernel restarted in between has no saved value: leave it be).
        return "".join(
            f'if [ -n "${{__trenvx_saved_{key}+set}}" ]; then unset {key}; eval "$__trenvx_saved_{key}"; '
            f'unset __trenvx_saved_{key}; fi\n' for key in env
        )

    def reseed(self) -> str:
        # Assigning RANDOM seeds bash's generator; SRANDOM (bash 5.1) reads getrandom itself.
        return f"RANDOM={int.from_bytes(os.urandom(4), 'little')}\n"


PYTHON = Python(
    "python", "python3", "ipykernel (Debian: python3-ipykernel)", reseeds_itself=True,
    # IPython's history in memory: %history works within the kernel's life, and no cell makes
    # its history thread write (and fsync) an SQLite file while the cell's answer is on its way.
    kernel_arguments=("--HistoryManager.hist_file=:memory:",),
)
BASH = Bash(
    "bash", "bash",
    "pip install bash_kernel && python3 -m bash_kernel.install --sys-prefix",
)
LANGUAGES: dict[str, Language] = {"python": PYTHON, "bash": BASH}
ALIASES: dict[str, str] = {"python": "python", "python3": "python", "bash": "bash", "sh": "bash"}
SUPPORTED = "python (or python3), bash (or sh)"


def language_named(name: str | None) -> Language:
    """The language a request names (None: python); :class:`UnknownLanguage` saying which exist."""
    if name is None:
        return PYTHON
    if not isinstance(name, str):
        raise UnknownLanguage(f"language must be a string, not {type(name).__name__}")
    key = ALIASES.get(name.strip().lower())
    if key is None:
        raise UnknownLanguage(f"language {name!r} is not supported; supported: {SUPPORTED}")
    return LANGUAGES[key]
