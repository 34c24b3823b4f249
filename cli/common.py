"""Helpers every command module shares: the registry, the consoles, JSON output, sizes."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Console

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
