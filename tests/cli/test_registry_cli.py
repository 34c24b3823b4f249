"""The registry commands through the real console entry point, as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.registry.conftest import make_variant


def run_cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"ADAPTERHUB_HOME": str(home), "COLUMNS": "200"}
    env.pop("ADAPTERHUB_DATABASE_URL", None)
    return subprocess.run([sys.executable, "-m", "adapterhub.cli.main", *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture()
def home(tmp_path: Path, tiny_base: Path) -> Path:
    home = tmp_path / "home"
    result = run_cli(home, "models", "add", "tiny", str(tiny_base))
    assert result.returncode == 0, result.stderr
    return home


def test_import_list_show_tag_export_rm_gc(home: Path, lora_dir: Path, tmp_path: Path) -> None:
    result = run_cli(home, "import", str(lora_dir), "--name", "rev", "--base", "tiny", "--tag", "demo")
    assert result.returncode == 0 and "imported rev:1" in result.stdout
    again = run_cli(home, "import", str(lora_dir), "--name", "rev", "--base", "tiny")
    assert again.returncode == 0 and "already registered as rev:1" in again.stdout
    run_cli(home, "import", str(make_variant(lora_dir, tmp_path / "v2", seed=7)), "--name", "rev", "--base", "tiny")

    listed = json.loads(run_cli(home, "list", "--json").stdout)
    assert [r["ref"] for r in listed] == ["rev:2", "rev:1"]
    assert listed[1]["tags"] == ["demo"] and listed[1]["origin"] == "imported"
    assert [r["ref"] for r in json.loads(run_cli(home, "list", "--tag", "demo", "--json").stdout)] == ["rev:1"]

    shown = json.loads(run_cli(home, "show", "rev:1", "--json").stdout)
    assert shown["rank"] == 4 and shown["target_modules"] == ["q_proj", "v_proj"]
    assert "rev:1" in run_cli(home, "show", f"rev@{shown['sha256'][:8]}").stdout

    assert run_cli(home, "tag", "rev", "best").returncode == 0
    assert json.loads(run_cli(home, "show", "rev", "--json").stdout)["tags"] == ["best"]

    out = tmp_path / "exported"
    assert run_cli(home, "export", "rev:1", str(out)).returncode == 0
    assert (out / "adapter_model.safetensors").read_bytes() == (lora_dir / "adapter_model.safetensors").read_bytes()

    assert run_cli(home, "rm", "rev:2").returncode == 0
    gc = run_cli(home, "gc")
    assert gc.returncode == 0 and "removed 1 blob(s)" in gc.stdout

    models = json.loads(run_cli(home, "models", "list", "--json").stdout)
    assert models[0]["name"] == "tiny" and models[0]["hidden_size"] == 64


@pytest.mark.parametrize(
    "args, message",
    [
        (["show", "nope"], "error: no adapter named 'nope'"),
        (["show", "ab/cd"], "error: invalid reference: name 'ab/cd' contains a path separator"),
        (["show", "ab:\u00b2"], "the version after ':' must be a positive integer"),  # '²' passes str.isdigit
        (["show", "ab:99999999999999999999999"], "the version after ':' must be a positive integer"),  # beyond 64 bits
        (["import", "/does/not/exist", "--name", "x", "--base", "tiny"], "the directory does not exist"),
        (["import", ".", "--name", "x", "--base", "nobase"], "error: no base model named 'nobase'"),
        (["models", "show", "tinny"], "did you mean: tiny"),
    ],
)
def test_user_errors_are_one_line_and_exit_1(home: Path, args: list[str], message: str) -> None:
    result = run_cli(home, *args)
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_convert_bin_loads_weights_only(home: Path, lora_dir: Path, tmp_path: Path) -> None:
    import shutil

    import torch
    from safetensors.torch import load_file

    pickled = Path(shutil.copytree(lora_dir, tmp_path / "pickled"))
    torch.save(load_file(pickled / "adapter_model.safetensors"), pickled / "adapter_model.bin")
    (pickled / "adapter_model.safetensors").unlink()
    refused = run_cli(home, "import", str(pickled), "--name", "p", "--base", "tiny")
    assert refused.returncode == 1 and "pickled weights" in refused.stderr
    converted = run_cli(home, "import", str(pickled), "--name", "p", "--base", "tiny", "--convert-bin")
    assert converted.returncode == 0, converted.stderr
    exported = json.loads(run_cli(home, "show", "p", "--json").stdout)
    assert "adapter_model.safetensors" in exported["files"] and "adapter_model.bin" not in exported["files"]
