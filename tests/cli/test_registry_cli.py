"""The registry commands through the real console entry point, as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.registry.conftest import make_variant


def run_cli(home: Path, *args: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"ADAPTERHUB_HOME": str(home), "COLUMNS": "200"} | extra_env
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
        (["show", "ab:\u00b2"], "the version after ':' must be a whole number"),  # '²' passes str.isdigit
        (["show", "ab:99999999999999999999999"], "the version after ':' must be a whole number from 1 to 2147483647"),
        (["show", "ab:2147483648"], "must be a whole number from 1 to 2147483647"),  # past PostgreSQL's INTEGER
        (["show", "ab:2147483647"], "no adapter named 'ab:2147483647'"),  # the limit itself is a ref
        (["models", "show", "%%%%%%%%"], "no base model named '%%%%%%%%'"),
        (["models", "rm", "%%%%%%%%"], "no base model named '%%%%%%%%'"),
        (["import", ".", "--name", "x", "--base", "________"], "no base model named '________'"),
        (["import", "/does/not/exist", "--name", "x", "--base", "tiny"], "the directory does not exist"),
        (["import", ".", "--name", "x", "--base", "nobase"], "error: no base model named 'nobase'"),
        (["models", "show", "tinny"], "did you mean: tiny"),
    ],
)
def test_user_errors_are_one_line_and_exit_1(home: Path, args: list[str], message: str) -> None:
    result = run_cli(home, *args)
    assert_one_line_error(result, message)
    assert (home / "models" / "tiny" / "config.json").is_file()  # `models rm` of a wildcard removed nothing


def assert_one_line_error(result: subprocess.CompletedProcess[str], message: str) -> None:
    assert result.returncode == 1, result.stdout + result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


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


def test_convert_bin_of_random_bytes_is_one_error_and_leaves_no_temp_dir(home: Path, lora_dir: Path, tmp_path: Path) -> None:
    import random
    import shutil

    pickled = Path(shutil.copytree(lora_dir, tmp_path / "random"))
    (pickled / "adapter_model.safetensors").unlink()
    temp = tmp_path / "temp"
    temp.mkdir()
    # Seeded bytes that torch.load refuses in three different ways: UnpicklingError (paragraphs of
    # text), IndexError (pop from empty list), and a zip archive without a central directory.
    for content in (random.Random(0).randbytes(4096), random.Random(2).randbytes(4096), b"PK\x03\x04" + random.Random(1).randbytes(4000)):
        (pickled / "adapter_model.bin").write_bytes(content)
        result = run_cli(home, "import", str(pickled), "--name", "p", "--base", "tiny", "--convert-bin", TMPDIR=str(temp))
        assert_one_line_error(result, "is not a plain tensor checkpoint: torch.load(weights_only=True) refused it")
        assert list(temp.iterdir()) == []
    assert json.loads(run_cli(home, "list", "--json").stdout) == []


def test_convert_bin_copies_no_link_from_outside(home: Path, lora_dir: Path, tmp_path: Path) -> None:
    import shutil

    import torch
    from safetensors.torch import load_file

    pickled = Path(shutil.copytree(lora_dir, tmp_path / "pickled"))
    torch.save(load_file(pickled / "adapter_model.safetensors"), pickled / "adapter_model.bin")
    (pickled / "adapter_model.safetensors").unlink()
    (pickled / "passwd").symlink_to("/etc/passwd")
    result = run_cli(home, "import", str(pickled), "--name", "p", "--base", "tiny", "--convert-bin")
    assert_one_line_error(result, "passwd is a symbolic link to /etc/passwd, outside the directory")


def test_import_refuses_links_out_and_skips_pickles_saying_so(home: Path, lora_dir: Path, tmp_path: Path) -> None:
    import shutil

    import torch

    source = Path(shutil.copytree(lora_dir, tmp_path / "src"))
    (source / "environ").symlink_to("/proc/self/environ")
    assert_one_line_error(run_cli(home, "import", str(source), "--name", "a", "--base", "tiny"), "environ is a symbolic link")
    (source / "environ").unlink()
    torch.save({"lr": 1.0}, source / "training_args.bin")
    result = run_cli(home, "import", str(source), "--name", "a", "--base", "tiny")
    assert result.returncode == 0, result.stderr
    assert "skipped 1 pickled file(s), which the registry never stores: training_args.bin" in result.stderr
    assert "training_args.bin" not in json.loads(run_cli(home, "show", "a", "--json").stdout)["files"]


def test_malformed_inputs_are_one_line_and_register_nothing(home: Path, lora_dir: Path, tmp_path: Path) -> None:
    import shutil

    nested = Path(shutil.copytree(lora_dir, tmp_path / "nested"))
    (nested / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ' + "[" * 50_000 + "]" * 50_000 + "}")
    assert_one_line_error(run_cli(home, "import", str(nested), "--name", "a", "--base", "tiny"), "nested too deeply")
    regex = Path(shutil.copytree(lora_dir, tmp_path / "regex"))
    config = json.loads((regex / "adapter_config.json").read_text())
    (regex / "adapter_config.json").write_text(json.dumps(config | {"target_modules": "([", "modules_to_save": 5}))
    assert_one_line_error(run_cli(home, "import", str(regex), "--name", "a", "--base", "tiny"), "2 problems")
    assert json.loads(run_cli(home, "list", "--json").stdout) == []


def test_export_onto_a_file_a_link_or_proc_is_one_line_and_writes_nothing(home: Path, lora_dir: Path, tmp_path: Path) -> None:
    assert run_cli(home, "import", str(lora_dir), "--name", "a", "--base", "tiny").returncode == 0
    a_file = tmp_path / "file"
    a_file.write_text("keep me")
    assert_one_line_error(run_cli(home, "export", "a", str(a_file)), "exists and is not a directory")
    assert a_file.read_text() == "keep me"
    (tmp_path / "empty").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    assert_one_line_error(run_cli(home, "export", "a", str(tmp_path / "link")), "is a symbolic link")
    assert list((tmp_path / "empty").iterdir()) == []
    assert_one_line_error(run_cli(home, "export", "a", "/proc/self/out"), "cannot export to /proc/self/out")


def test_rm_of_a_lineage_parent_needs_force_and_show_says_the_parent_was_removed(home: Path, lora_dir: Path) -> None:
    from adapterhub.registry import Lineage, Registry

    assert run_cli(home, "import", str(lora_dir), "--name", "parent", "--base", "tiny").returncode == 0
    with Registry.open(home) as registry:  # a merge's record, as `adapterhub merge` writes it
        registry.put_adapter(name="child", source_dir=lora_dir, base="tiny", lineage=Lineage(kind="merged", parents=("parent:1",)))
    assert_one_line_error(run_cli(home, "rm", "parent"), "parent:1 is a lineage parent of 1 record(s) (child:1)")
    forced = run_cli(home, "rm", "parent", "--force")
    assert forced.returncode == 0, forced.stderr
    assert "removed parent:1" in forced.stdout and "1 record(s)' lineage now names a removed parent: child:1" in forced.stdout
    assert "lineage: merged from parent:1 (removed)" in run_cli(home, "show", "child").stdout
    assert json.loads(run_cli(home, "show", "child", "--json").stdout)["removed_parents"] == ["parent:1"]
    assert "did you mean" not in run_cli(home, "show", "parnt").stderr  # a removed name is no suggestion


def test_list_shows_the_kind_never_cuts_refs_and_takes_several_tags(home: Path, tiny_base: Path, lora_dir: Path, tmp_path: Path) -> None:
    from tests.conftest import build_lora_adapter

    dora = build_lora_adapter(tiny_base, tmp_path / "dora", use_dora=True)
    long_name = "a-descriptive-adapter-name-" + "x" * 80
    assert run_cli(home, "import", str(dora), "--name", long_name, "--base", "tiny", "--tag", "t1", "--tag", "t2").returncode == 0
    assert run_cli(home, "import", str(lora_dir), "--name", "plain", "--base", "tiny", "--tag", "t1").returncode == 0
    listed = run_cli(home, "list", COLUMNS="80")  # not a terminal, and the default width
    assert listed.returncode == 0, listed.stderr
    assert f"{long_name}:1" in listed.stdout and "…" not in listed.stdout
    row = next(line for line in listed.stdout.splitlines() if long_name in line)
    assert "dora r=4" in row
    both = json.loads(run_cli(home, "list", "--tag", "t1", "-t", "t2", "--json").stdout)
    assert [r["ref"] for r in both] == [f"{long_name}:1"] and both[0]["kind"] == "dora"


def test_models_add_refuses_a_link_out_of_the_model_directory(home: Path, tiny_base: Path, tmp_path: Path) -> None:
    import shutil

    model = Path(shutil.copytree(tiny_base, tmp_path / "model"))
    (model / "tokenizer_config.json").unlink()
    (model / "tokenizer_config.json").symlink_to("/etc/passwd")
    assert_one_line_error(run_cli(home, "models", "add", "linked", str(model)), "tokenizer_config.json is a symbolic link to /etc/passwd")
    assert [m["name"] for m in json.loads(run_cli(home, "models", "list", "--json").stdout)] == ["tiny"]


def test_show_says_what_the_kinds_table_allows_and_list_type_names_the_kinds(home: Path, tiny_base: Path, tmp_path: Path) -> None:
    from tests.conftest import build_lora_adapter

    dora = build_lora_adapter(tiny_base, tmp_path / "dora", use_dora=True)
    assert run_cli(home, "import", str(dora), "--name", "d", "--base", "tiny").returncode == 0
    shown = run_cli(home, "show", "d")
    assert "merge: yes\nserve on torch: yes\nserve on vllm: no, lora with DoRA adapters cannot be served by the vllm backend: " in shown.stdout
    uses = json.loads(run_cli(home, "show", "d", "--json").stdout)["uses"]
    assert uses["merge"] is None and uses["torch"] is None and "vLLM does not yet support DoRA" in uses["vllm"]
    assert json.loads(run_cli(home, "list", "--type", "DoRA", "--json").stdout)[0]["ref"] == "d:1"
    assert_one_line_error(run_cli(home, "list", "--type", "loha"), "unknown adapter kind 'loha'; known kinds: lora, rslora, dora")
