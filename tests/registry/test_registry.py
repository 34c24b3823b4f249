"""The registry's behaviour on real PEFT adapters and a real SQLite database."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import sqlalchemy
import torch

from adapterhub.errors import AdapterhubError, AmbiguousRefError, CorruptBlobError, NotFoundError
from adapterhub.registry import Lineage, Registry
from tests.registry.conftest import make_variant


def test_put_get_and_versions(registry: Registry, lora_dir: Path, tmp_path: Path) -> None:
    first = registry.put_adapter(name="summarize", source_dir=lora_dir, base="tiny", tags=("nlp",))
    assert first.created and first.record.ref == "summarize:1"
    record = first.record
    assert record.peft_type == "LORA" and record.rank == 4 and record.alpha == 8.0
    assert record.target_modules == ("q_proj", "v_proj")
    assert record.base_name == "tiny" and len(record.base_fingerprint) == 64
    assert set(record.files) == {"README.md", "adapter_config.json", "adapter_model.safetensors"}
    assert record.size_bytes == sum(p.stat().st_size for p in lora_dir.iterdir())

    second = registry.put_adapter(name="summarize", source_dir=make_variant(lora_dir, tmp_path / "v2", seed=3), base="tiny")
    assert second.record.ref == "summarize:2"
    assert registry.get("summarize").ref == "summarize:2"
    assert registry.get("summarize:1").sha256 == record.sha256
    assert registry.get(f"summarize@{record.sha256[:8]}").ref == "summarize:1"


def test_identical_reimport_is_a_noop(registry: Registry, lora_dir: Path) -> None:
    registry.put_adapter(name="a", source_dir=lora_dir, base="tiny")
    again = registry.put_adapter(name="a", source_dir=lora_dir, base="tiny")
    assert not again.created and again.record.ref == "a:1"
    # The same content under another name is a new record sharing the same blobs.
    blobs_before = sorted(sha for sha, _ in registry.blobs.iter_blobs())
    other = registry.put_adapter(name="b", source_dir=lora_dir, base="tiny")
    assert other.created and other.record.sha256 == again.record.sha256
    assert sorted(sha for sha, _ in registry.blobs.iter_blobs()) == blobs_before


def test_versions_are_never_reused(registry: Registry, lora_dir: Path, tmp_path: Path) -> None:
    registry.put_adapter(name="a", source_dir=lora_dir, base="tiny")
    registry.put_adapter(name="a", source_dir=make_variant(lora_dir, tmp_path / "v2", seed=1), base="tiny")
    registry.remove("a:2")
    third = registry.put_adapter(name="a", source_dir=make_variant(lora_dir, tmp_path / "v3", seed=2), base="tiny")
    assert third.record.version == 3


def test_list_filters(registry: Registry, lora_dir: Path, tmp_path: Path) -> None:
    registry.put_adapter(name="a", source_dir=lora_dir, base="tiny", tags=("x",))
    registry.put_adapter(name="a", source_dir=make_variant(lora_dir, tmp_path / "a2", seed=1), base="tiny")
    registry.put_adapter(name="b", source_dir=make_variant(lora_dir, tmp_path / "b1", seed=2), base="tiny", tags=("x", "y"))
    assert [r.ref for r in registry.list()] == ["a:2", "a:1", "b:1"]
    assert [r.ref for r in registry.list(tag="x")] == ["a:1", "b:1"]
    assert [r.ref for r in registry.list(name="a")] == ["a:2", "a:1"]
    assert [r.ref for r in registry.list(latest_only=True)] == ["a:2", "b:1"]
    assert registry.list(base="tiny") == registry.list()
    assert registry.list(base="other") == []
    assert registry.list(tag="x")[1].tags == ("x", "y")


def test_ref_errors_name_close_matches(registry: Registry, lora_dir: Path, tmp_path: Path) -> None:
    registry.put_adapter(name="summarize", source_dir=lora_dir, base="tiny")
    with pytest.raises(NotFoundError, match="did you mean: summarize"):
        registry.get("sumarize")
    with pytest.raises(NotFoundError, match="summarize:1"):
        registry.get("summarize:7")
    assert registry.resolve("nothing") is None
    assert registry.resolve("summarize", base="tiny") is not None
    assert registry.resolve("summarize", base="another-base") is None
    with pytest.raises(AdapterhubError, match="hex digits"):
        registry.get("summarize@zz")


def test_ambiguous_prefix_error_lists_every_match(registry: Registry, lora_dir: Path, tmp_path: Path) -> None:
    registry.put_adapter(name="a", source_dir=lora_dir, base="tiny")
    registry.put_adapter(name="a", source_dir=make_variant(lora_dir, tmp_path / "v", seed=5), base="tiny")
    # Force a shared prefix by rewriting one record's hash: the ambiguity logic, not sha256, is under test.
    with registry.engine.begin() as conn:
        first = registry.get("a:1").sha256
        conn.execute(sqlalchemy.text("UPDATE adapters SET sha256 = :sha WHERE version = 2"), {"sha": first[:6] + "f" * 58})
    with pytest.raises(AmbiguousRefError, match=r"matches 2 records: a:2 .*a:1"):
        registry.get(f"a@{first[:6]}")


def test_export_loads_in_peft_with_identical_weights(registry: Registry, lora_dir: Path, tiny_base: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    registry.put_adapter(name="a", source_dir=lora_dir, base="tiny")
    out = registry.export("a", tmp_path / "exported")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(registry.get_base_model("tiny").path), out)
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), lora_dir)
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    with pytest.raises(AdapterhubError, match="not empty"):
        registry.export("a", out)


def test_materialize_is_cached_and_verified(registry: Registry, lora_dir: Path) -> None:
    record = registry.put_adapter(name="a", source_dir=lora_dir, base="tiny").record
    path = registry.materialize(record)
    assert registry.materialize("a:1") == path
    assert json.loads((path / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_corrupted_blob_is_detected_on_read(registry: Registry, lora_dir: Path, tmp_path: Path) -> None:
    record = registry.put_adapter(name="a", source_dir=lora_dir, base="tiny").record
    blob = registry.blobs.path_for(record.files["adapter_model.safetensors"])
    blob.chmod(0o644)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(CorruptBlobError, match="corrupt on disk"):
        registry.export("a", tmp_path / "out")
    with pytest.raises(CorruptBlobError):
        registry.materialize("a")
    assert not (tmp_path / "out").exists()


def test_materialize_trusts_a_verification_stamp_until_the_blob_changes(
    registry: Registry, lora_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    from adapterhub.registry import blobs

    monkeypatch.setattr(blobs, "_RACY_SECONDS", -1.0)  # stamp even a blob written a moment ago
    hashed: list[Path] = []
    real_hash = blobs.hash_file
    monkeypatch.setattr(blobs, "hash_file", lambda path: hashed.append(path) or real_hash(path))
    record = registry.put_adapter(name="a", source_dir=lora_dir, base="tiny").record
    registry.materialize(record)
    first = len(hashed)
    assert first == len(set(record.files.values()))
    registry.materialize(record)
    assert len(hashed) == first  # unchanged since the check: no second hash
    time.sleep(0.1)  # past the file system's timestamp tick, so the edit gets a new ctime
    blob = registry.blobs.path_for(record.files["adapter_model.safetensors"])
    blob.chmod(0o644)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(CorruptBlobError):
        registry.materialize(record)


def test_lineage_evaluations_and_children(registry: Registry, lora_dir: Path, tmp_path: Path) -> None:
    registry.put_adapter(name="parent", source_dir=lora_dir, base="tiny")
    child = registry.put_adapter(
        name="child", source_dir=make_variant(lora_dir, tmp_path / "c", seed=9), base="tiny",
        lineage=Lineage(kind="merged", parents=("parent:1",), details={"method": "ties"}),
    ).record
    assert child.lineage == Lineage(kind="merged", parents=("parent:1",), details={"method": "ties"})
    assert [c.ref for c in registry.children("parent")] == ["child:1"]
    registry.record_evaluation("child", metric="exact_match", value=0.75, dataset="rev.jsonl")
    registry.record_evaluation("tiny", metric="perplexity", value=12.5, dataset="general", base_model=True)
    assert [(e.metric, e.value) for e in registry.get("child").evaluations] == [("exact_match", 0.75)]
    assert registry.get_base_model("tiny").evaluations[0].value == 12.5
    with pytest.raises(AdapterhubError, match="lineage parent 'ghost:1'"):
        registry.put_adapter(name="orphan", source_dir=lora_dir, base="tiny", lineage=Lineage(kind="merged", parents=("ghost:1",)))


def test_gc_keeps_shared_blobs_and_removes_orphans(registry: Registry, lora_dir: Path, tmp_path: Path) -> None:
    registry.put_adapter(name="a", source_dir=lora_dir, base="tiny")
    registry.put_adapter(name="b", source_dir=lora_dir, base="tiny")  # same blobs
    registry.put_adapter(name="c", source_dir=make_variant(lora_dir, tmp_path / "c", seed=4), base="tiny")
    registry.materialize("c")
    registry.remove("a")
    assert registry.gc().removed_blobs == 0  # b still uses them
    registry.remove("c")
    report = registry.gc()
    assert report.removed_blobs == 1  # only c's weights differ; its config/README equal a's
    assert report.removed_cache_dirs == 1
    registry.export("b", tmp_path / "b-out")  # b is intact


def test_full_model_records(registry: Registry, tiny_base: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(1.01)
    model.save_pretrained(tmp_path / "ft")
    record = registry.put_adapter(name="ft", source_dir=tmp_path / "ft", base="tiny").record
    assert record.is_full_model and record.peft_type == "FULL"
    loaded = AutoModelForCausalLM.from_pretrained(registry.materialize(record))
    assert torch.equal(loaded.model.layers[1].mlp.down_proj.weight, model.model.layers[1].mlp.down_proj.weight)


def test_base_models(registry: Registry, tiny_base: Path, tiny_base_other: Path, lora_dir: Path) -> None:
    assert registry.add_base_model(name="tiny", model_dir=tiny_base).name == "tiny"  # no-op
    with pytest.raises(AdapterhubError, match="already registered as base model 'tiny'"):
        registry.add_base_model(name="tiny-again", model_dir=tiny_base)
    with pytest.raises(AdapterhubError, match="another fingerprint"):
        registry.add_base_model(name="tiny", model_dir=tiny_base_other)
    other = registry.add_base_model(name="other", model_dir=tiny_base_other)
    assert other.spec.hidden_size == 96
    assert registry.get_base_model(other.fingerprint[:10]).name == "other"
    registry.put_adapter(name="a", source_dir=lora_dir, base="tiny")
    with pytest.raises(AdapterhubError, match="used by adapters"):
        registry.remove_base_model("tiny")
    registry.remove_base_model("other")
    with pytest.raises(NotFoundError, match="did you mean: tiny"):
        registry.get_base_model("tinny")


def test_reopening_keeps_everything_and_schema_is_migrated(adapterhub_home: Path, tiny_base: Path, lora_dir: Path) -> None:
    with Registry.open(adapterhub_home) as reg:
        reg.add_base_model(name="tiny", model_dir=tiny_base)
        reg.put_adapter(name="a", source_dir=lora_dir, base="tiny")
    with Registry.open(adapterhub_home) as reg:
        assert reg.get("a").ref == "a:1"
        with reg.engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar() == "0003"
            if conn.dialect.name == "sqlite":
                assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            else:
                assert conn.dialect.name == "postgresql"  # the home's registry.db is not used at all
                assert not (adapterhub_home / "registry.db").exists()


def test_database_url_setting(tmp_path: Path, tiny_base: Path, lora_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTERHUB_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ADAPTERHUB_DATABASE_URL", f"sqlite:///{tmp_path / 'elsewhere.db'}")
    reg = Registry.open()
    reg.add_base_model(name="tiny", model_dir=tiny_base)
    assert (tmp_path / "elsewhere.db").exists() and not (tmp_path / "home" / "registry.db").exists()


def test_importing_the_registry_does_not_import_torch() -> None:
    import subprocess

    code = "import sys, adapterhub.registry, adapterhub.registry.store; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_suggestions_name_only_records_that_still_exist(registry: Registry, lora_dir: Path, tmp_path: Path) -> None:
    registry.put_adapter(name="summarize", source_dir=lora_dir, base="tiny")
    registry.put_adapter(name="summary", source_dir=make_variant(lora_dir, tmp_path / "v", seed=2), base="tiny")
    registry.remove("summarize")
    with pytest.raises(NotFoundError) as info:
        registry.get("sumarize")
    assert "did you mean: summary?" in str(info.value) and "summarize" not in str(info.value).split("did you mean")[1]
    with pytest.raises(NotFoundError, match="every version of 'summarize' was removed \\(the last was summarize:1\\)"):
        registry.get("summarize")


def test_removing_a_lineage_parent_needs_force_and_says_what_it_orphans(registry: Registry, lora_dir: Path, tmp_path: Path) -> None:
    registry.put_adapter(name="parent", source_dir=lora_dir, base="tiny")
    for i in range(7):
        registry.put_adapter(
            name=f"merge{i}", source_dir=make_variant(lora_dir, tmp_path / f"m{i}", seed=20 + i), base="tiny",
            lineage=Lineage(kind="merged", parents=("parent:1",), details={"method": "ties"}),
        )
    with pytest.raises(AdapterhubError, match=r"parent:1 is a lineage parent of 7 record\(s\) \(merge0:1, merge1:1, .* and 2 more\); .*--force"):
        registry.remove("parent")
    assert registry.get("parent").ref == "parent:1" and registry.removed_parents("merge0:1") == ()
    result = registry.remove("parent", force=True)
    assert result.record.ref == "parent:1"
    assert result.orphaned == tuple(f"merge{i}:1" for i in range(7))
    assert registry.removed_parents("merge3") == ("parent:1",)
    assert registry.get("merge3").lineage.parents == ("parent:1",)  # the story is kept, the parent is gone
    assert registry.remove("merge3").orphaned == ()  # a record nothing names is removed without force


def test_kinds_name_the_lora_variant(registry: Registry, tiny_base: Path, tmp_path: Path, lora_dir: Path) -> None:
    from tests.conftest import build_lora_adapter

    registry.put_adapter(name="plain", source_dir=lora_dir, base="tiny")
    registry.put_adapter(name="dora", source_dir=build_lora_adapter(tiny_base, tmp_path / "dora", use_dora=True), base="tiny")
    registry.put_adapter(name="rs", source_dir=build_lora_adapter(tiny_base, tmp_path / "rs", seed=3, use_rslora=True), base="tiny")
    registry.put_adapter(name="ia3", source_dir=build_lora_adapter(tiny_base, tmp_path / "ia3", peft_type="ia3"), base="tiny")
    registry.put_adapter(name="pt", source_dir=build_lora_adapter(tiny_base, tmp_path / "pt", peft_type="prompt_tuning"), base="tiny")
    expected = {"dora": "dora", "ia3": "ia3", "plain": "lora", "pt": "prompt_tuning", "rs": "rslora"}
    assert {r.name: r.kind for r in registry.list()} == expected  # summaries, without their config
    assert {name: registry.get(name).kind for name in expected} == expected
    assert registry.get("dora").to_json()["kind"] == "dora"
    assert [r.name for r in registry.list(peft_type="dora")] == ["dora"]
    assert [r.name for r in registry.list(peft_type="lora")] == ["dora", "plain", "rs"]  # the PEFT type


def test_list_with_several_tags_needs_all_of_them(registry: Registry, lora_dir: Path, tmp_path: Path) -> None:
    registry.put_adapter(name="a", source_dir=lora_dir, base="tiny", tags=("x", "y"))
    registry.put_adapter(name="b", source_dir=make_variant(lora_dir, tmp_path / "b", seed=1), base="tiny", tags=("x",))
    assert [r.ref for r in registry.list(tag=["x", "y"])] == ["a:1"]
    assert [r.ref for r in registry.list(tag=["x"])] == ["a:1", "b:1"]
    assert registry.list(tag=["x", "nope"]) == []


def test_export_refuses_files_links_and_unwritable_places_and_leaves_nothing(registry: Registry, lora_dir: Path, tmp_path: Path) -> None:
    registry.put_adapter(name="a", source_dir=lora_dir, base="tiny")
    a_file = tmp_path / "file"
    a_file.write_text("keep me")
    with pytest.raises(AdapterhubError, match="exists and is not a directory"):
        registry.export("a", a_file)
    assert a_file.read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "link").symlink_to(empty)
    with pytest.raises(AdapterhubError, match="is a symbolic link"):
        registry.export("a", tmp_path / "link")
    assert list(empty.iterdir()) == []
    with pytest.raises(AdapterhubError, match="cannot export to /proc/self/adapter"):
        registry.export("a", Path("/proc/self/adapter"))
    # A failure after writing started leaves neither the target nor the parents made for it.
    blob = registry.blobs.path_for(registry.get("a").files["adapter_model.safetensors"])
    blob.chmod(0o644)
    blob.write_bytes(b"rot")
    with pytest.raises(CorruptBlobError):
        registry.export("a", tmp_path / "new" / "deeper" / "out")
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file", "home", "link", "lora"]
