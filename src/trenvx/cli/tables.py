"""How the command-line tools print tables: fitted to a terminal, whole in a pipe.

On a terminal a table is rich's, fitted to the window: a long value wraps or is cut with an
ellipsis, except in the columns marked ``whole`` (ids), which are never cut. When stdout is not a
terminal (``| grep``, ``| awk``, a file, a test), every value is printed as it is, whatever the
window's width (``COLUMNS``): one row per line, columns left-aligned (or right-aligned) and
separated by at least three spaces, no ellipsis, no wrapping, no colours, an empty value shown as
``-``. So ``sandbox-cli sandbox ls -a | grep ID`` finds the sandbox by its full id, as docker's
listings do, and ``awk '{print $1}'`` gives the first column (ids have no spaces; other values
may, so split on runs of spaces with ``awk -F '   +'``, or use ``--json``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Sequence, Union

from rich import box
from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text

Cell = Union[str, Text]
"""A value: plain text (never read as rich markup), or a rich Text for a styled one (its style is
dropped in a pipe)."""

GAP = "   "
"""Between columns in a pipe: three spaces, as docker's listings."""

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class Column:
    """One column: its header, alignment, and how it behaves on a terminal (``wrap``: a long value
    wraps instead of being cut; ``whole``: never narrowed below its longest value; ``style``)."""

    header: str = ""
    justify: Literal["left", "right"] = "left"
    wrap: bool = False
    whole: bool = False
    style: str = ""


def is_terminal(console: Console) -> bool:
    """Whether the console writes to a terminal: its stream's own answer, as docker asks it
    (rich's ``is_terminal`` is also true when FORCE_COLOR is set, as it often is in CI)."""
    isatty = getattr(console.file, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def _plain(cell: Cell) -> str:
    text = cell.plain if isinstance(cell, Text) else str(cell)
    return _CONTROL.sub(" ", text) or "-"  # a newline or escape sequence would break the one-row-per-line


def plain_lines(columns: Sequence[Column], rows: Sequence[Sequence[Cell]], *, show_header: bool = True,
                title: str = "") -> list[str]:
    """The table as lines for a pipe: every value whole, columns aligned on their widest value."""
    cells = [[c.header or "-" for c in columns]] if show_header else []
    for row in rows:
        if len(row) != len(columns):
            raise ValueError(f"a row of {len(row)} values in a table of {len(columns)} columns: {row!r}")
        cells.append([_plain(v) for v in row])
    widths = [max((cell_len(r[i]) for r in cells), default=0) for i in range(len(columns))]
    lines = [title] if title else []
    for r in cells:
        parts = []
        for col, value, width in zip(columns, r, widths):
            pad = " " * (width - cell_len(value))
            parts.append(pad + value if col.justify == "right" else value + pad)
        lines.append(GAP.join(parts).rstrip())
    return lines


def rich_table(columns: Sequence[Column], rows: Sequence[Sequence[Cell]], *, show_header: bool = True,
               title: str = "", boxed: bool = False) -> Table:
    """The table for a terminal (values are text, never markup)."""
    table = Table(box=box.HEAVY_HEAD if boxed else None, pad_edge=boxed, show_header=show_header,
                  title=title or None)
    texts = [[v if isinstance(v, Text) else Text(str(v)) for v in row] for row in rows]
    for i, c in enumerate(columns):
        widest = max((cell_len(r[i].plain) for r in texts), default=0)
        table.add_column(c.header, justify=c.justify, style=c.style or None, no_wrap=not c.wrap,
                         min_width=max(widest, cell_len(c.header)) if c.whole else None)
    for row in texts:
        table.add_row(*row)
    return table


def print_table(console: Console, columns: Sequence[Column], rows: Sequence[Sequence[Cell]], *,
                show_header: bool = True, title: str = "", boxed: bool = False,
                terminal: bool | None = None) -> None:
    """Print the table on ``console``: fitted to the window on a terminal, whole lines otherwise
    (``terminal`` overrides the console's own answer)."""
    if terminal is None:
        terminal = is_terminal(console)
    if terminal:
        console.print(rich_table(columns, rows, show_header=show_header, title=title, boxed=boxed))
        return
    text = "".join(line + "\n" for line in plain_lines(columns, rows, show_header=show_header, title=title))
    console.file.write(text)
    console.file.flush()
