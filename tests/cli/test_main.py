"""The lazy command table stays in step with what the command modules register."""

from __future__ import annotations

from adapterhub.cli.main import COMMANDS, module_commands


def test_every_registered_command_is_in_the_table_and_back() -> None:
    for module in set(COMMANDS.values()):
        registered = set(module_commands(module))
        listed = {name for name, owner in COMMANDS.items() if owner == module}
        assert registered == listed, f"cli/{module}.py registers {sorted(registered)}, COMMANDS lists {sorted(listed)}"
