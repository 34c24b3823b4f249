"""Helpers every command module shares: the registry, the consoles, JSON output, tables, sizes.

Design decisions:
- Tables are printed at the width their content needs when stdout is not a terminal (rich
  would otherwise squeeze them into 80 columns and cut references with "…"), and never
  narrower than their unbreakable columns in a terminal: a reference someone copies into the
  next command is never cut. Columns holding such values are `no_wrap`.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from adapterhub.registry import Registry

console = Console()
err_console = Console(stderr=True)

JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of a table.")]


def open_registry() -> Registry:
    """The registry of `$ADAPTERHUB_HOME` / `$ADAPTERHUB_DATABASE_URL`."""
    return Registry.open()


def print_json(data: Any) -> None:
    """JSON on stdout, unstyled, so `| jq` works."""
    typer.echo(json.dumps(data, indent=2, default=str))


def human_bytes(size: int | float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(size) < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def print_table(table: Table) -> None:
    """Print `table` on stdout without cutting any `no_wrap` cell (see the module docstring)."""
    needed = Measurement.get(console, console.options.update(max_width=1_000_000), table)
    width = max(console.width, needed.minimum) if console.is_terminal else needed.maximum
    if width <= console.width:
        console.print(table)
        return
    # `Console.print(width=...)` cannot exceed the console's width: render on a wider twin.
    Console(file=console.file, width=width, force_terminal=console.is_terminal, no_color=console.no_color).print(table)
