"""Two homes (two machines, say) sharing one database and one blob store (`ADAPTERHUB_BLOB_DIR`).

Each home sees the shared store at its own path (as two machines mount one NFS export at
different places): here home B reaches it through a symbolic link, so nothing that A wrote
may name A's path for it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from adapterhub.registry import Registry
from adapterhub.registry.store import model_fingerprint
from tests.registry.conftest import make_variant


@pytest.fixture()
def two_homes(adapterhub_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Registry, Registry]:
    if not os.environ.get("ADAPTERHUB_DATABASE_URL"):  # the sqlite parameter: one file both open
        monkeypatch.setenv("ADAPTERHUB_DATABASE_URL", f"sqlite:///{tmp_path / 'shared.db'}")
    shared = tmp_path / "nfs-export"
    shared.mkdir()
    (tmp_path / "machine-b-mount").symlink_to(shared)
    monkeypatch.setenv("ADAPTERHUB_BLOB_DIR", str(shared))
    a = Registry.open(tmp_path / "home-a")
    monkeypatch.setenv("ADAPTERHUB_BLOB_DIR", str(tmp_path / "machine-b-mount"))
    b = Registry.open(tmp_path / "home-b")
    return a, b


def test_an_adapter_imported_by_one_home_is_materialized_by_the_other(
    two_homes: tuple[Registry, Registry], tiny_base: Path, lora_dir: Path, tmp_path: Path,
) -> None:
    a, b = two_homes
    a.add_base_model(name="tiny", model_dir=tiny_base)
    a.put_adapter(name="shared", source_dir=lora_dir, base="tiny")
    assert not (a.home / "blobs").exists() and not (b.home / "blobs").exists()  # both use the shared store

    record = b.get("shared")
    directory = b.materialize(record)
    assert directory.is_relative_to(b.home)  # the cache of links stays per home
    for rel in record.files:
        assert (directory / rel).read_bytes() == (lora_dir / rel).read_bytes()

    # B's import lands in the same store; A sees it and reads it back verified.
    b.put_adapter(name="shared", source_dir=make_variant(lora_dir, tmp_path / "v2", seed=7), base="tiny")
    assert [r.ref for r in a.list(name="shared")] == ["shared:2", "shared:1"]
    a.export("shared:2", tmp_path / "out")
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == (tmp_path / "v2" / "adapter_model.safetensors").read_bytes()


def test_a_base_model_is_found_through_the_shared_store_not_the_adding_machines_path(
    two_homes: tuple[Registry, Registry], tiny_base: Path,
) -> None:
    a, b = two_homes
    added = a.add_base_model(name="tiny", model_dir=tiny_base)
    seen_by_b = b.get_base_model("tiny")
    assert added.path == Path(os.environ["ADAPTERHUB_BLOB_DIR"]).parent / "nfs-export" / "models" / "tiny"
    assert seen_by_b.path == Path(os.environ["ADAPTERHUB_BLOB_DIR"]) / "models" / "tiny"  # B's own mount point
    assert model_fingerprint(seen_by_b.path) == added.fingerprint  # the files themselves are there
    with b.engine.connect() as conn:
        stored = conn.exec_driver_sql("SELECT path FROM base_models WHERE name = 'tiny'").scalar()
    assert not Path(stored).is_absolute()

    b.remove_base_model("tiny")  # the shared copy goes, for everyone
    assert not seen_by_b.path.exists() and a.list_base_models() == []


def test_a_base_registered_before_the_shared_store_keeps_its_absolute_path(adapterhub_home: Path, tiny_base: Path) -> None:
    # Databases made before relative paths name their bases' directories in full; those still open.
    with Registry.open(adapterhub_home) as reg:
        reg.add_base_model(name="tiny", model_dir=tiny_base)
        with reg.engine.begin() as conn:
            conn.exec_driver_sql(f"UPDATE base_models SET path = '{reg.models_dir / 'tiny'}'")
        assert reg.get_base_model("tiny").path == reg.models_dir / "tiny"


def test_gc_from_any_home_removes_only_blobs_no_record_of_the_shared_database_references(
    two_homes: tuple[Registry, Registry], tiny_base: Path, lora_dir: Path, tmp_path: Path,
) -> None:
    """docs/scaling.md's gc promise: references are read from the one shared database, so a gc
    run on any machine keeps every blob any home's record needs; each home's cache is its own."""
    a, b = two_homes
    a.add_base_model(name="tiny", model_dir=tiny_base)
    kept = a.put_adapter(name="kept", source_dir=lora_dir, base="tiny").record
    dropped = b.put_adapter(name="dropped", source_dir=make_variant(lora_dir, tmp_path / "other", seed=3), base="tiny").record
    a.materialize(dropped)
    b.materialize(kept)
    only_dropped = set(dropped.files.values()) - set(kept.files.values())
    assert only_dropped  # their weights differ

    report = b.gc()  # nothing to reclaim: every blob is referenced by a record of the shared database
    assert report.removed_blobs == 0 and report.kept_blobs == len(set(kept.files.values()) | set(dropped.files.values()))

    a.remove("dropped")
    report = b.gc()  # the other home, which made the record, removes its blobs
    assert report.removed_blobs == len(only_dropped)
    assert {sha for sha, _ in a.blobs.iter_blobs()} == set(kept.files.values())
    assert (b.cache_dir / kept.sha256).is_dir()  # B's cache of a live record stays
    assert (a.cache_dir / dropped.sha256).is_dir()  # A's cache is A's: B's gc leaves it
    assert a.gc().removed_cache_dirs == 1 and not (a.cache_dir / dropped.sha256).exists()
    assert (a.materialize("kept") / "adapter_model.safetensors").read_bytes() == (lora_dir / "adapter_model.safetensors").read_bytes()
