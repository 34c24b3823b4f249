"""The accelerate configs docs/scaling.md ships load with accelerate's own reader as DDP and FSDP.

Launching them needs several GPUs (docs/scaling.md says so); this checks what can be checked
here: accelerate parses them into the distributed types the docs name, and every config file
the docs' commands use exists.
"""

from __future__ import annotations

import re
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
