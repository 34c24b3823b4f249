"""Dataset records (migration 0003): identity by content, versions per name, parents, lookups, bad input."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from sqlalchemy import inspect as sa_inspect

from adapterhub.errors import AmbiguousRefError, NotFoundError, ValidationError
from adapterhub.registry import Registry
from adapterhub.registry.datasets import dataset_name


def _file(tmp_path: Path, name: str, text: str) -> tuple[Path, str]:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path, hashlib.sha256(text.encode()).hexdigest()


def test_put_is_idempotent_and_versions_per_name(registry: Registry, tmp_path: Path) -> None:
    path, sha = _file(tmp_path, "train.jsonl", '{"text": "a"}\n')
    first = registry.datasets.put(name="train", path=path, sha256=sha, rows=1, verb="source")
    again = registry.datasets.put(name="train", path=path, sha256=sha, rows=1, verb="source")
    assert again.id == first.id and first.ref == "train:1"
    path.write_text('{"text": "b"}\n', encoding="utf-8")
    second = registry.datasets.put(name="train", path=path, sha256=hashlib.sha256(b'{"text": "b"}\n').hexdigest(), rows=1, verb="clean")
    assert second.ref == "train:2"
    assert registry.datasets.get("train").id == second.id
    assert registry.datasets.get("train:1").id == first.id
    assert registry.datasets.get(f"@{sha[:10]}").id == first.id
    assert registry.datasets.by_sha256(sha).id == first.id
    assert [r.ref for r in registry.datasets.list()] == ["train:2", "train:1"]


def test_parents_and_ancestry(registry: Registry, tmp_path: Path) -> None:
    a_path, a_sha = _file(tmp_path, "a.jsonl", "a\n")
    b_path, b_sha = _file(tmp_path, "b.jsonl", "b\n")
    m_path, m_sha = _file(tmp_path, "mix.jsonl", "ab\n")
    s_path, s_sha = _file(tmp_path, "mix.train.jsonl", "a\n\n")
    a = registry.datasets.put(name="a", path=a_path, sha256=a_sha, rows=1, verb="source")
    b = registry.datasets.put(name="b", path=b_path, sha256=b_sha, rows=1, verb="source")
    mix = registry.datasets.put(name="mix", path=m_path, sha256=m_sha, rows=2, verb="mix", parameters={"weights": [0.5, 0.5]}, parents=[a, b])
    split = registry.datasets.put(name="mix.train", path=s_path, sha256=s_sha, rows=1, verb="split", parents=[mix])
    assert [p.ref for p in registry.datasets.parents(mix)] == ["a:1", "b:1"]
    assert [(d, r.ref) for d, r in registry.datasets.ancestry(split)] == [(0, "mix.train:1"), (1, "mix:1"), (2, "a:1"), (2, "b:1")]
    assert registry.datasets.get("mix").parameters == {"weights": [0.5, 0.5]}


def test_bad_names_hashes_and_refs_are_refused(registry: Registry, tmp_path: Path) -> None:
    path, sha = _file(tmp_path, "x.jsonl", "x\n")
    with pytest.raises(ValidationError, match="name '../etc'"):
        registry.datasets.put(name="../etc", path=path, sha256=sha, rows=1, verb="source")
    with pytest.raises(ValidationError, match="sha256"):
        registry.datasets.put(name="x", path=path, sha256="abc", rows=1, verb="source")
    assert registry.datasets.list() == []
    with pytest.raises(NotFoundError, match="no dataset 'nope'"):
        registry.datasets.get("nope")
    with pytest.raises(ValidationError, match="version 'two'"):
        registry.datasets.get("x:two")
    with pytest.raises(ValidationError, match="8-64 lowercase hex"):
        registry.datasets.get("@zz")


def test_an_ambiguous_content_prefix_is_an_error(registry: Registry, tmp_path: Path) -> None:
    path, _ = _file(tmp_path, "x.jsonl", "x\n")
    registry.datasets.put(name="x", path=path, sha256="ab" * 32, rows=1, verb="source")
    registry.datasets.put(name="y", path=path, sha256="ab" * 31 + "cd", rows=1, verb="source")
    with pytest.raises(AmbiguousRefError):
        registry.datasets.get("@abababab")


def test_dataset_names_from_file_names() -> None:
    assert dataset_name(Path("/x/my data (v2).jsonl")) == "my-data--v2-"
    assert dataset_name(Path("..hidden.jsonl")) == "hidden"


def test_migration_creates_the_tables(registry: Registry) -> None:
    tables = set(sa_inspect(registry.engine).get_table_names())
    assert {"datasets", "dataset_parents"} <= tables
