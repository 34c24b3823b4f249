"""The lazy command table stays in step with the command modules, and their options read alike."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from typer.testing import CliRunner

from adapterhub.cli.main import COMMANDS, app, module_commands


def test_every_registered_command_is_in_the_table_and_back() -> None:
    for module in set(COMMANDS.values()):
        registered = set(module_commands(module))
        listed = {name for name, owner in COMMANDS.items() if owner == module}
        assert registered == listed, f"cli/{module}.py registers {sorted(registered)}, COMMANDS lists {sorted(listed)}"


def _all_commands() -> dict[str, Any]:
    """Every leaf command of the CLI by its full name (`models add`, `merge`, ...)."""
    commands: dict[str, Any] = {}

    def walk(name: str, command: Any) -> None:
        subcommands = getattr(command, "commands", None)
        if subcommands:
            for sub_name, sub in subcommands.items():
                walk(f"{name} {sub_name}", sub)
        else:
            commands[name] = command

    for module in sorted(set(COMMANDS.values())):
        for name, command in module_commands(module).items():
            walk(name, command)
    return commands


def test_a_short_flag_means_the_same_option_in_every_command() -> None:
    meanings: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for name, command in _all_commands().items():
        for param in command.params:
            long_names = [opt for opt in getattr(param, "opts", []) if opt.startswith("--")]
            for short in (opt for opt in getattr(param, "opts", []) if not opt.startswith("--")):
                meanings[short].add((long_names[0] if long_names else "?", name))
    for short, uses in meanings.items():
        long_names = {long_name for long_name, _ in uses}
        assert len(long_names) == 1, f"{short} means {sorted(uses)}"


def test_help_labels_values_the_click_way_and_flags_not_at_all() -> None:
    runner = CliRunner()
    for name in ["", *_all_commands()]:
        result = runner.invoke(app, [*name.split(), "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, (name, result.output)
        option_lines = [line for line in result.output.splitlines() if "│ --" in line or "│ -" in line]
        for python_tag in ("<bool>", "<str>", "<int", "<float>", "<list[", "<path>"):
            shown = [line for line in option_lines if python_tag in line]
            assert not shown, f"`adapterhub {name} --help` shows {python_tag}: {shown[0]}"
    merge_help = runner.invoke(app, ["merge", "--help"], env={"COLUMNS": "200"}).output
    seed_line = next(line for line in merge_help.splitlines() if "--seed" in line)
    json_line = next(line for line in merge_help.splitlines() if "--json" in line)
    assert "INTEGER" in seed_line
    assert "TEXT" not in json_line and "BOOL" not in json_line.upper().replace("BOOLEAN", "")
