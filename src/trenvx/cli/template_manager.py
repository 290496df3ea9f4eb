"""template-manager: build templates described in a TOML config.

    template-manager --config configs/example_config.toml [--template NAME] [--force] [--quiet]
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from ..config import ConfigError, load_config
from ..template.builder import STAGES, BuildResult, TemplateBuilder
from ..build_errors import BuildError
from .tables import Column, print_table

err = Console(stderr=True)
app = typer.Typer(add_completion=False, help=__doc__)


class RichReporter:
    """Shows one line per build stage with a spinner and its time."""

    def __init__(self, progress: Progress, verbose: bool) -> None:
        self.progress = progress
        self.verbose = verbose
        self.tasks = {s: progress.add_task(s, total=1, start=False, visible=True) for s in STAGES}

    def stage_started(self, stage: str) -> None:
        self.progress.start_task(self.tasks[stage])

    def stage_finished(self, stage: str, seconds: float) -> None:
        self.progress.update(self.tasks[stage], completed=1, description=f"{stage} [dim]{seconds:.1f}s[/]")

    def message(self, text: str) -> None:
        if self.verbose:
            self.progress.console.print(f"[dim]{text}[/]", highlight=False)


class QuietReporter:
    def stage_started(self, stage: str) -> None:
        pass

    def stage_finished(self, stage: str, seconds: float) -> None:
        print(f"{stage}: {seconds:.1f}s", file=sys.stderr)

    def message(self, text: str) -> None:
        pass


def _summary(result: BuildResult) -> tuple[str, list[tuple[str, str]]]:
    """The title and (label, value) rows printed after a build."""
    m = result.build.manifest
    title = f"template {m.name} ({'unchanged' if result.skipped else 'built'})"
    return title, [
        ("build", m.build_id),
        ("path", str(result.build.path)),
        ("vmm / accelerator", f"{m.vmm_type} / {m.machine.accelerator}"),
        ("kernel", m.kernel_version),
        ("rootfs", f"{m.sizes['rootfs_bytes'] / 2**20:.0f} MiB from {m.rootfs_source}"),
        ("memory / device state", f"{m.sizes['memory_bytes'] / 2**20:.0f} MiB / {m.sizes['vmstate_bytes'] / 1024:.0f} KiB"),
        ("stages", ", ".join(f"{k} {v:.1f}s" for k, v in m.stage_seconds.items())),
    ]


def print_summary(result: BuildResult, console: Console | None = None) -> None:
    """The build's summary: a boxed table on a terminal; piped, one whole ``label   value`` line each."""
    title, rows = _summary(result)
    print_table(console or Console(), [Column(), Column(wrap=True)], rows, show_header=False, title=title, boxed=True)


@app.command()
def build(
    config: Path = typer.Option(..., "--config", "-c", help="TOML config file (see configs/example_config.toml)"),
    template: Optional[str] = typer.Option(None, "--template", "-t", help="template to build (default: [template_manager] template_id)"),
    all_templates: bool = typer.Option(False, "--all", help="build every template in the config"),
    force: bool = typer.Option(False, "--force", "-f", help="rebuild even if the inputs are unchanged"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress display (for CI)"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="show the build's output"),
) -> None:
    """Build a template: root filesystem, boot, start command, snapshot."""
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        cfg = load_config(config)
        names = sorted(cfg.template) if all_templates else [template or cfg.default_template]
        for n in names:
            cfg.get_template(n)
    except ConfigError as e:
        err.print(f"[red]error:[/] {e}", highlight=False)
        raise typer.Exit(2)
    for name in names:
        t0 = time.perf_counter()
        try:
            if quiet:
                result = asyncio.run(TemplateBuilder(cfg, QuietReporter()).build(name, force=force))
            else:
                with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err) as p:
                    p.console.print(f"building template [bold]{name}[/]")
                    result = asyncio.run(TemplateBuilder(cfg, RichReporter(p, verbose)).build(name, force=force))
        except BuildError as e:
            err.print(f"[red]build of template {name!r} failed[/] {e}", highlight=False)
            raise typer.Exit(1)
        except KeyboardInterrupt:
            err.print(f"[yellow]build of {name!r} interrupted; nothing was left behind[/]")
            raise typer.Exit(130)
        if quiet:
            state = "unchanged" if result.skipped else "built"
            print(f"{name}: {state} {result.build.build_id} in {time.perf_counter() - t0:.1f}s")
        else:
            print_summary(result)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
