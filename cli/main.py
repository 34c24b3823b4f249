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
    "data": "data",
    "train": "train",
    "tune": "train",
    "eval": "evaluate",
    "merge": "merge",
    "extract": "extract",
    "push": "hub",
    "pull": "hub",
    "serve": "serve",
    "bench": "serve",
    "demo": "demo",
}


# Typer's labels for value types, spelled the way click (and most CLIs) spell them in help.
_VALUE_LABELS = {"str": "TEXT", "int": "INTEGER", "int range": "INTEGER", "float": "FLOAT", "float range": "FLOAT", "path": "PATH"}


def _value_label(option: Any) -> str:
    """The help label of one option: none for a flag, `[a|b]` for choices, else TEXT, INTEGER, ...

    Typer 0.29's rich help prints its own type tag beside every option that has no metavar:
    `<bool>` on every flag, `<str>` and `<list[str]>` on values. Flags take no value, so they
    get no label; a repeatable option is labelled by its element type (its help says it repeats).
    """
    if option.is_flag:
        return ""
    label = option.display_type(None).strip("<>")
    if label.startswith("list[") and label.endswith("]"):
        label = label[len("list[") : -1]
    if option.type_descriptor.is_choice:
        return f"[{label}]"
    return _VALUE_LABELS.get(label, label.upper())


def _label_values(command: Any) -> None:
    """Give every option of `command` (and of its subcommands) without a metavar its value label.

    The help option is made per command on first use and then cached, so it is made here once.
    """
    help_option = command.get_help_option(command.context_class(command))
    for param in [*getattr(command, "params", []), *([help_option] if help_option else [])]:
        if type(param).__name__ == "TyperOption" and param.metavar is None:
            param.metavar = _value_label(param)
    for subcommand in getattr(command, "commands", {}).values():
        _label_values(subcommand)


def module_commands(module_name: str) -> dict[str, Any]:
    """The click commands one module registers, by name, their options labelled for help."""
    sub_app = typer.Typer()
    importlib.import_module(f"adapterhub.cli.{module_name}").register(sub_app)
    if not sub_app.registered_commands and not sub_app.registered_groups:
        return {}
    group = typer.main.get_group(sub_app)
    for command in group.commands.values():
        _label_values(command)
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

    def get_help_option(self, ctx: Any) -> Any:
        help_option = super().get_help_option(ctx)
        if help_option is not None and help_option.metavar is None:
            help_option.metavar = _value_label(help_option)
        return help_option


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
