"""Frozen value types the registry hands out; plain data, safe to pass across threads.

Design decisions:
- A record names its kind (`kind`, a name in `adapterhub.kinds`) even as a summary without its
  config, so the CLI and the server look up what it can do (`adapter_kind`) without another read.
- Where a record was pushed to and pulled from on the Hugging Face Hub (`hub`, oldest first) is
  part of the full record, like its evaluations; summaries leave it out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from adapterhub.formats import BaseModelSpec
from adapterhub.kinds import AdapterKind, get_kind, kind_of

LineageKind = Literal["trained", "merged", "imported", "extracted"]
HubDirection = Literal["push", "pull"]


@dataclass(frozen=True)
class Lineage:
    """Where a record came from.

    `parents` are refs with versions (`name:3`); `details` is JSON-serialisable: for a trained
    adapter the dataset fingerprint, resolved config, base fingerprint, wall time and peak
    memory; for a merge the recipe, method and per-module error report; for an import its source.
    """

    kind: LineageKind
    parents: tuple[str, ...] = ()
    details: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "parents": list(self.parents), "details": dict(self.details)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> Lineage | None:
        if not data:
            return None
        return cls(kind=data["kind"], parents=tuple(data.get("parents", ())), details=data.get("details", {}))


@dataclass(frozen=True)
class Evaluation:
    metric: str
    value: float
    dataset: str
    split: str | None
    created_at: datetime
    details: Mapping[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "metric": self.metric, "value": self.value, "dataset": self.dataset, "split": self.split,
            "created_at": self.created_at.isoformat(), "details": dict(self.details or {}),
        }


@dataclass(frozen=True)
class HubTransfer:
    """One push of a record to a Hub repo (`direction="push"`) or one pull from it.

    `revision` is the branch the commit is on (`refs/pr/N` for a pull request, whose page is
    `pr_url`); `endpoint` is the Hub it happened on (`https://huggingface.co`, or `HF_ENDPOINT`).
    """

    direction: HubDirection
    endpoint: str
    repo_id: str
    revision: str
    commit_sha: str
    created_at: datetime
    pr_url: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "direction": self.direction, "endpoint": self.endpoint, "repo_id": self.repo_id, "revision": self.revision,
            "commit_sha": self.commit_sha, "pr_url": self.pr_url, "created_at": self.created_at.isoformat(),
        }


@dataclass(frozen=True)
class BaseModelRecord:
    name: str
    fingerprint: str
    architecture: str
    path: Path
    spec: BaseModelSpec
    source: str
    size_bytes: int
    created_at: datetime
    evaluations: tuple[Evaluation, ...] = ()
    hub_id: str | None = None  # its id on the Hugging Face Hub, which pushed cards name as `base_model`

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "fingerprint": self.fingerprint, "architecture": self.architecture,
            "path": str(self.path), "source": self.source, "hub_id": self.hub_id, "size_bytes": self.size_bytes,
            "created_at": self.created_at.isoformat(),
            "hidden_size": self.spec.hidden_size, "num_layers": self.spec.num_layers,
            "evaluations": [e.to_json() for e in self.evaluations],
        }


@dataclass(frozen=True)
class AdapterRecord:
    name: str
    version: int
    sha256: str
    base_name: str
    base_fingerprint: str
    peft_type: str
    task_type: str | None
    rank: int | None
    alpha: float | None
    target_modules: tuple[str, ...]
    size_bytes: int
    created_at: datetime
    tags: tuple[str, ...] = ()
    lineage: Lineage | None = None
    evaluations: tuple[Evaluation, ...] = ()
    files: Mapping[str, str] = field(default_factory=dict)
    config: Mapping[str, Any] = field(default_factory=dict)
    origin: str | None = None  # lineage kind; set on summaries too, where `lineage` is None
    # What a user calls it (`dora`, `rslora`, `ia3`, …: a name in `adapterhub.kinds`); set on
    # summaries too, which have no config. Derived from peft_type and config when not given.
    kind: str = ""
    hub: tuple[HubTransfer, ...] = ()  # pushes and pulls, oldest first; empty on summaries

    def __post_init__(self) -> None:
        if not self.kind:
            object.__setattr__(self, "kind", kind_of(self.peft_type, self.config).name)

    @property
    def ref(self) -> str:
        """The exact reference of this record, `name:version`."""
        return f"{self.name}:{self.version}"

    @property
    def adapter_kind(self) -> AdapterKind:
        """Its entry in the kinds table: whether it merges, which backends serve it and why not."""
        return get_kind(self.kind)

    @property
    def is_full_model(self) -> bool:
        return self.adapter_kind.is_full_model

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "version": self.version, "ref": self.ref, "sha256": self.sha256,
            "base": self.base_name, "base_fingerprint": self.base_fingerprint, "peft_type": self.peft_type,
            "kind": self.kind, "task_type": self.task_type, "rank": self.rank, "alpha": self.alpha,
            "target_modules": list(self.target_modules), "size_bytes": self.size_bytes,
            "created_at": self.created_at.isoformat(), "tags": list(self.tags),
            "origin": self.origin,
            "lineage": self.lineage.to_json() if self.lineage else None,
            "evaluations": [e.to_json() for e in self.evaluations],
            "hub": [t.to_json() for t in self.hub],
            "files": dict(self.files),
        }

    def hub_repo(self, endpoint: str) -> str | None:
        """The Hub repo this record was last pushed to on `endpoint`, else the one it was last pulled from."""
        for direction in ("push", "pull"):
            repos = [t.repo_id for t in self.hub if t.direction == direction and t.endpoint == endpoint]
            if repos:
                return repos[-1]
        return None


@dataclass(frozen=True)
class PutResult:
    """`created` is False when identical content was already registered under that name.

    `skipped` are the source directory's pickled files, which the registry never stores.
    """

    record: AdapterRecord
    created: bool
    skipped: tuple[str, ...] = ()


@dataclass(frozen=True)
class RemoveResult:
    """A removed record, and the records whose lineage now names it as a removed parent."""

    record: AdapterRecord
    orphaned: tuple[str, ...] = ()


@dataclass(frozen=True)
class GcReport:
    removed_blobs: int
    removed_bytes: int
    removed_temp_files: int
    removed_cache_dirs: int
    kept_blobs: int
