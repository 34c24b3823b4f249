"""docs/scaling.md keeps its promise that each command is exercised by a test or marked as
needing hardware, and the accelerate configs it ships load as what it says.

The DDP config is launched for real on CPU (gloo) by `tests/cli/test_train_cli.py`; FSDP and
tensor-parallel serving need several GPUs. This checks what can be checked here: accelerate
parses the configs into the distributed types the docs name, every config file the commands use
exists, every command block names the test that runs it (or says it needs hardware), and every
`adapterhub` flag the docs use exists.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("name", "kind"), [("ddp", "MULTI_GPU"), ("fsdp", "FSDP")])
def test_the_shipped_accelerate_configs_load_as_what_the_docs_say(name: str, kind: str) -> None:
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(REPO_ROOT / "examples" / "accelerate" / f"{name}.yaml"))
    assert config.distributed_type.value == kind
    assert config.num_processes >= 2 and config.num_machines == 1
    if kind == "FSDP":
        assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"


def test_every_config_file_the_scaling_docs_launch_exists() -> None:
    text = (REPO_ROOT / "docs" / "scaling.md").read_text(encoding="utf-8")
    used = re.findall(r"--config_file (\S+)", text)
    assert used and all((REPO_ROOT / path).is_file() for path in used)


def _command_blocks(text: str) -> list[tuple[str, str]]:
    """Each ```bash block of the text with the prose since the previous block (or heading)."""
    blocks = []
    position = 0
    for match in re.finditer(r"```bash\n(.*?)```", text, flags=re.S):
        prose = text[position:match.start()].rsplit("\n#", 1)[-1]
        blocks.append((" ".join(prose.split()), match.group(1)))
        position = match.end()
    return blocks


def test_every_command_block_in_the_scaling_docs_names_its_test_or_the_hardware_it_needs() -> None:
    text = (REPO_ROOT / "docs" / "scaling.md").read_text(encoding="utf-8")
    blocks = _command_blocks(text)
    assert len(blocks) >= 4
    for prose, commands in blocks:
        tests = [path for path in re.findall(r"tests/[\w/]+\.py", prose) if (REPO_ROOT / path).is_file()]
        assert tests or "Needs hardware this machine lacks" in prose, f"no test and no hardware note before:\n{commands}"


def test_the_adapterhub_flags_the_scaling_docs_use_exist() -> None:
    from adapterhub.cli.main import COMMANDS, module_commands

    text = (REPO_ROOT / "docs" / "scaling.md").read_text(encoding="utf-8")
    checked = 0
    for _, commands in _command_blocks(text):
        for line in commands.splitlines():
            words = shlex.split(line.split(" # ")[0].split("   #")[0])
            if "adapterhub.cli.main" in words:  # `accelerate launch ... -m adapterhub.cli.main CMD ...`
                words = ["adapterhub", *words[words.index("adapterhub.cli.main") + 1:]]
            if len(words) < 2 or words[0] != "adapterhub":
                continue
            command = module_commands(COMMANDS[words[1]])[words[1]]
            if words[1] == "models":
                command = command.commands[words[2]]
            known = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
            used = {word.split("=")[0] for word in words if word.startswith("--")}
            assert used <= known, f"{line}: {sorted(used - known)}"
            checked += 1
    assert checked >= 6
