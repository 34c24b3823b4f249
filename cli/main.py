"""Entry point of the `adapterhub` console script.

Each command group lives in its own module exposing `register(app)`. Modules are imported
lazily, only for the command being run: training, merging and serving pull in torch and
transformers (seconds of import), which `adapterhub list` or `show` must not pay for.
`COMMANDS` maps each top-level command to its module (a test keeps it complete).

User errors (`AdapterhubError`) print one line and exit 1, with no traceback.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import typer
from typer.core import TyperGroup

from adapterhub.errors import AdapterhubError

# Top-level command -> module of adapterhub.cli that registers it, in help order.
COMMANDS: dict[str, str] = {
    "models": "models",
    "import": "registry_cmds",
    "list": "registry_cmds",
    "show": "registry_cmds",
    "tag": "registry_cmds",
    "export": "registry_cmds",
    "rm": "registry_cmds",
    "gc": "registry_cmds",
    "train": "train",
    "tune": "train",
    "eval": "evaluate",
    "merge": "merge",
    "serve": "serve",
    "bench": "serve",
    "demo": "demo",
}


def module_commands(module_name: str) -> dict[str, Any]:
    """The click commands one module registers, by name."""
    sub_app = typer.Typer()
    importlib.import_module(f"adapterhub.cli.{module_name}").register(sub_app)
    if not sub_app.registered_commands and not sub_app.registered_groups:
        return {}
    group = typer.main.get_group(sub_app)
    return dict(group.commands)


class LazyCommands(TyperGroup):
    """A click group that imports a command's module only when that command is needed."""

    _loaded: dict[str, dict[str, Any]] = {}

    def list_commands(self, ctx: Any) -> list[str]:
        return [name for name in COMMANDS if self.get_command(ctx, name) is not None]

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        module_name = COMMANDS.get(cmd_name)
        if module_name is None:
            return None
        if module_name not in self._loaded:
            self._loaded[module_name] = module_commands(module_name)
        return self._loaded[module_name].get(cmd_name)


app = typer.Typer(
    name="adapterhub",
    cls=LazyCommands,
    help="Train, register, merge and serve many adapters on one base model.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """Train, register, merge and serve many adapters on one base model."""


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; an `AdapterhubError` prints `error: <message>` and exits 1.

    Click's standalone mode handles usage errors (exit 2) and Ctrl-C itself and lets every
    other exception through, so only our user errors are caught here; bugs keep their traceback.
    """
    from adapterhub.models import defer_bitsandbytes

    defer_bitsandbytes()  # imported only for quantization (a QLoRA run), not by every command through PEFT
    try:
        app(args=argv)
    except AdapterhubError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
