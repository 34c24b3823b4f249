"""Concurrent writers, gc and killed imports against the real registry (SQLite and PostgreSQL)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from adapterhub.registry import Registry
from tests.registry.conftest import make_variant, registry_state

REPO_ROOT = Path(__file__).resolve().parents[2]

_IMPORTER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from adapterhub.registry import Registry

    home, worker, *dirs = sys.argv[1:]
    registry = Registry.open(Path(home))
    for i, source in enumerate(dirs):
        name = f"w{worker}-a{i % 5}"  # 5 names per worker, several versions each
        registry.put_adapter(name=name, source_dir=Path(source), base="tiny", tags=(f"worker{worker}",))
    print("done", worker)
    """
)


def test_four_processes_importing_at_once(registry: Registry, lora_dir: Path, tmp_path: Path) -> None:
    sources = [make_variant(lora_dir, tmp_path / f"v{i}", seed=100 + i) for i in range(100)]
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _IMPORTER, str(registry.home), str(w), *map(str, sources[w * 25:(w + 1) * 25])],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT,
        )
        for w in range(4)
    ]
    for process in workers:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
        assert "done" in out

    records = registry.list()
    assert len(records) == 100
    for w in range(4):
        for n in range(5):
            versions = sorted(r.version for r in registry.list(name=f"w{w}-a{n}"))
            assert versions == [1, 2, 3, 4, 5]  # consistent: no gap, no duplicate
        assert len(registry.list(tag=f"worker{w}")) == 25
    referenced = {sha for r in records for sha in registry.get(r.ref).files.values()}
    stored = {sha for sha, _ in registry.blobs.iter_blobs()}
    assert stored == referenced  # no orphan blob
    assert list(registry.blobs.iter_temp_files()) == []


_KILLED_IMPORTER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from adapterhub.registry import Registry
    from adapterhub.registry import store, blobs

    home, source, stage = sys.argv[1:]
    marker = Path(home) / "reached"

    def pause(*args, **kwargs):
        marker.write_text(stage)
        time.sleep(600)

    if stage == "before-commit":
        # Blobs are written and durable; the record's transaction has not committed yet.
        store.Registry._insert_record = pause
    else:
        # Halfway through writing a blob's temp file.
        original = blobs.BlobStore.put_file
        def put_file(self, path):
            tmp = self.tmp / "put-partial"
            tmp.write_bytes(path.read_bytes()[: 100])
            pause()
        blobs.BlobStore.put_file = put_file
    Registry.open(Path(home)).put_adapter(name="victim", source_dir=Path(source), base="tiny")
    """
)


@pytest.mark.parametrize("stage", ["before-commit", "mid-blob"])
def test_sigkill_mid_import_leaves_no_record(registry: Registry, lora_dir: Path, stage: str) -> None:
    before = registry_state(registry)
    process = subprocess.Popen(
        [sys.executable, "-c", _KILLED_IMPORTER, str(registry.home), str(lora_dir), stage], cwd=REPO_ROOT,
        stderr=subprocess.PIPE, text=True,
    )
    marker = registry.home / "reached"
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)

    reopened = Registry.open(registry.home)
    assert reopened.resolve("victim") is None
    assert [r.ref for r in reopened.list()] == before[0]
    stray = registry_state(reopened)
    assert stray[1] != before[1] or stray[2] != before[2]  # the killed import did leave debris...
    reopened.gc()
    assert registry_state(reopened) == before  # ...which gc removes
    # The registry still works: the same import now succeeds.
    assert reopened.put_adapter(name="victim", source_dir=lora_dir, base="tiny").created


def test_gc_running_during_imports_never_takes_a_blob_a_record_needs(registry: Registry, lora_dir: Path, tmp_path: Path) -> None:
    sources = [make_variant(lora_dir, tmp_path / f"g{i}", seed=300 + i) for i in range(30)]
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _IMPORTER, str(registry.home), str(w), *map(str, sources[w * 10:(w + 1) * 10])],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT,
        )
        for w in range(3)
    ]
    collections = 0
    while any(p.poll() is None for p in workers):
        registry.gc()  # between and during the imports' blob writes and commits
        collections += 1
    for process in workers:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
    assert collections > 1
    records = registry.list()
    assert len(records) == 30
    for record in records:
        registry.materialize(record.ref)  # every blob present and verified
    registry.gc()
    referenced = {sha for r in records for sha in registry.get(r.ref).files.values()}
    assert {sha for sha, _ in registry.blobs.iter_blobs()} == referenced
