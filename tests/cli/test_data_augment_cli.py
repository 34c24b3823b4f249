"""`adapterhub data augment` through the real console entry point: in-process (`--model`) and
against a real server on loopback (`--url`, the `openai` client), lineage records, and every
error path (one line, exit 1, nothing written, nothing registered)."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli.test_registry_cli import assert_one_line_error, run_cli
from tests.conftest import build_lora_adapter


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


ROWS = [{"prompt": f"spell the word number {i}", "completion": f"n-u-m {i}"} for i in range(4)]


@pytest.fixture()
def home(tiny_base: Path, tmp_path: Path) -> Iterator[Path]:
    import torch

    from adapterhub.registry import Registry

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    home = tmp_path / "home"
    registry = Registry.open(home=home)
    registry.add_base_model(name="tiny", model_dir=tiny_base)
    registry.put_adapter(name="greeter", source_dir=build_lora_adapter(tiny_base, tmp_path / "greeter", seed=5), base="tiny")
    registry.close()
    yield home
    torch.set_num_threads(threads)


def _records(home: Path) -> list[dict]:
    listed = run_cli(home, "data", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    return json.loads(listed.stdout)


def test_in_process_and_served_give_the_same_rows_and_both_are_registered(home: Path, tmp_path: Path) -> None:
    from adapterhub.registry import Registry
    from adapterhub.serving.app import create_app
    from adapterhub.serving.backends.config import EngineConfig
    from adapterhub.serving.backends.torch_engine import TorchEngine
    from adapterhub.serving.resolver import RegistryResolver
    from tests.serving.conftest import serve_app

    source = write_jsonl(tmp_path / "spell.jsonl", ROWS)
    local = tmp_path / "local.jsonl"
    args = ["-k", "3", "--max-tokens", "6", "--seed", "11", "--temperature", "1.0", "--batch-rows", "3", "--json"]
    # The server below runs on the CPU in fp32: so does the in-process engine, on any machine.
    result = run_cli(home, "data", "augment", str(source), "--out", str(local), "--model", "greeter", "--device", "cpu",
                     "--dtype", "fp32", *args, OMP_NUM_THREADS="1")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["stats"]["rows_in"] == 4 and report["stats"]["originals_out"] == 4
    assert report["records"] == ["local:1"]

    registry = Registry.open(home=home)
    base = registry.get_base_model("tiny")
    backend = TorchEngine(Path(base.path), base_name="tiny", config=EngineConfig(device="cpu"))
    app = create_app(backend, RegistryResolver(registry, "tiny"), api_key="s3cret")
    served = tmp_path / "served.jsonl"
    try:
        with serve_app(app) as url:
            result = run_cli(home, "data", "augment", str(source), "--out", str(served), "--url", url, "--model", "greeter",
                             "--api-key", "s3cret", *args)
            assert result.returncode == 0, result.stderr
            # Without --model, the server's first model: its base.
            base_out = tmp_path / "base.jsonl"
            result = run_cli(home, "data", "augment", str(source), "--out", str(base_out), "--url", url, "-k", "1",
                             "--max-tokens", "4", "--json", ADAPTERHUB_API_KEY="s3cret")
            assert result.returncode == 0, result.stderr
            assert json.loads(result.stdout)["records"] == ["base:1"]
            # Wrong key: refused before the file is read.
            refused = run_cli(home, "data", "augment", str(source), "--out", str(tmp_path / "x.jsonl"), "--url", url, "-k", "1",
                              "--api-key", "wrong")
            assert_one_line_error(refused, "refused the API key")
            unknown = run_cli(home, "data", "augment", str(source), "--out", str(tmp_path / "x.jsonl"), "--url", url, "-k", "1",
                              "--model", "nosuch", "--api-key", "s3cret")
            assert_one_line_error(unknown, "has no model 'nosuch'")
            assert not (tmp_path / "x.jsonl").exists()
    finally:
        registry.close()
    # The same seed gives the same rows with the engine in-process and through the server.
    assert served.read_bytes() == local.read_bytes()
    rows = [json.loads(line) for line in local.read_text().splitlines()]
    assert sum(not r["augmented"] for r in rows) == 4 and all(r["completion"] == ROWS[r["source_row"] - 1]["completion"] for r in rows)

    records = {r["name"]: r for r in _records(home)}
    assert set(records) == {"spell", "local", "served", "base"}
    assert records["spell"]["verb"] == "source"
    local_record, served_record = records["local"], records["served"]
    assert local_record["verb"] == served_record["verb"] == "augment"
    assert local_record["parameters"]["model"] == "greeter:1" and "url" not in local_record["parameters"]
    assert served_record["parameters"]["url"].endswith("/v1") and served_record["parameters"]["model"] == "greeter"
    assert records["base"]["parameters"]["model"] == "tiny"
    for record in (local_record, served_record):
        assert record["parameters"]["paraphrases"] == 3 and record["parameters"]["seed"] == 11
        assert "{text}" in record["parameters"]["instruction"]
        assert record["rows"] == len(rows)
    shown = run_cli(home, "data", "show", "local", "--json")
    assert shown.returncode == 0, shown.stderr
    assert [p["ref"] for p in json.loads(shown.stdout)["parents"]] == ["spell:1"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_every_bad_input_is_one_line_and_changes_nothing(home: Path, tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", ROWS)
    bad = write_jsonl(tmp_path / "bad.jsonl", [*ROWS, {"prompt": "no completion"}])
    out = tmp_path / "out.jsonl"
    cases = [
        (["--model", "greeter"], "missing.jsonl", "file not found"),
        ([], "in.jsonl", "augment needs a model: --model REF"),
        (["--model", "greeter", "-k", "0"], "in.jsonl", "--paraphrases must be at least 1"),
        (["--model", "greter"], "in.jsonl", "no base model, adapter or full model 'greter' in the registry; did you mean 'greeter'"),
        (["--url", f"http://127.0.0.1:{_free_port()}"], "in.jsonl", "cannot reach a server at http://127.0.0.1:"),
        (["--url", "localhost:8000"], "in.jsonl", "is not an http:// or https:// URL"),
        (["--model", "greeter"], "bad.jsonl", "line 5"),
    ]
    for extra, name, message in cases:
        k = [] if "-k" in extra else ["-k", "2"]
        result = run_cli(home, "data", "augment", str(tmp_path / name), "--out", str(out), *k, "--max-tokens", "4", *extra)
        assert_one_line_error(result, message)
        assert not out.exists() and not out.with_name("out.jsonl.card.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["home", "greeter", source.name, bad.name])
    assert _records(home) == []


def test_data_help_lists_augment(tmp_path: Path) -> None:
    result = run_cli(tmp_path / "home", "data", "--help")
    assert result.returncode == 0 and "augment" in result.stdout
    result = run_cli(tmp_path / "home", "data", "augment", "--help")
    assert result.returncode == 0
    for option in ("--paraphrases", "--model", "--url", "--instruction", "--temperature", "--max-tokens", "--seed", "--no-originals",
                   "--device", "--dtype"):
        assert option in result.stdout
