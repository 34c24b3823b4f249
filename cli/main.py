"""Entry point of the `adapterhub` console script.

Each command group lives in its own module exposing `register(app)`; this file only
assembles them and turns user errors into one line + exit 1 (no traceback).
"""

from __future__ import annotations

import importlib
import sys

import typer

from adapterhub.errors import AdapterhubError

app = typer.Typer(
    name="adapterhub",
    help="Train, register, merge and serve many adapters on one base model.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# Command modules, in help order. Each defines `register(app: typer.Typer) -> None`.
_COMMAND_MODULES = ("models", "registry_cmds", "train", "evaluate", "merge", "serve", "demo")

for _module_name in _COMMAND_MODULES:
    importlib.import_module(f"adapterhub.cli.{_module_name}").register(app)


def main() -> None:
    """Run the CLI; an `AdapterhubError` prints `error: <message>` and exits 1."""
    try:
        app(standalone_mode=False)
    except AdapterhubError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(1)
    except typer.Abort:
        typer.secho("aborted", err=True)
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code if exc.exit_code else 2)
        raise


if __name__ == "__main__":
    main()
