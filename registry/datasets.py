"""Dataset records: every file a data verb writes (and every file training reads), with its parents.

Design decisions:
- A record names a file by its path and identifies it by the sha256 of its bytes; the file stays
  where the user keeps it (datasets are often larger than the adapters trained on them, and the
  blob store's garbage collection only knows adapter files). `data show` says when the file on
  disk no longer matches.
- Versions are per name (the output file's stem) and monotonic; registering the same bytes under
  the same name again returns the existing record, so rerunning a verb adds nothing.
- A record and its parent edges are inserted in one transaction: a reader never sees a dataset
  without its parents.
- An adapter's lineage holds the sha256 of its training data (`dataset_fingerprint`), so the
  dataset behind an adapter is found by content, whichever name it was registered under.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, insert, select

from adapterhub.errors import AmbiguousRefError, NotFoundError, ValidationError
from adapterhub.registry.schema import DatasetParentRow, DatasetRow

_D = DatasetRow.__table__
_P = DatasetParentRow.__table__
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class DatasetRecord:
    """One registered dataset file."""

    id: int
    name: str
    version: int
    sha256: str
    path: Path
    rows: int
    size_bytes: int
    verb: str
    parameters: Mapping[str, Any]
    stats: Mapping[str, Any]
    created_at: datetime

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    def to_json(self) -> dict[str, Any]:
        return {
            "ref": self.ref, "name": self.name, "version": self.version, "sha256": self.sha256, "path": str(self.path),
            "rows": self.rows, "size_bytes": self.size_bytes, "verb": self.verb, "parameters": dict(self.parameters),
            "stats": dict(self.stats), "created_at": self.created_at.isoformat(),
        }


def dataset_name(path: Path) -> str:
    """A record name from a file name: its stem with characters outside [A-Za-z0-9._-] replaced."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", Path(path).stem).lstrip(".-_") or "dataset"
    return name[:128]


class DatasetCatalog:
    """The dataset records of one registry database."""

    def __init__(self, engine: Engine, write: Any) -> None:
        self._engine = engine
        self._write = write  # the registry's write-transaction context (BEGIN IMMEDIATE on SQLite)

    def put(
        self, *, name: str, path: Path, sha256: str, rows: int, verb: str, parameters: Mapping[str, Any] | None = None,
        stats: Mapping[str, Any] | None = None, parents: Sequence[DatasetRecord] = (),
    ) -> DatasetRecord:
        """Register a dataset file (idempotent for the same name and bytes); parents link in the same transaction."""
        problems = []
        if not _NAME.match(name):
            problems.append(f"name {name!r} must be 1-128 of A-Z a-z 0-9 . _ - starting with a letter or digit")
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            problems.append("sha256 must be 64 lowercase hex digits")
        if rows < 0:
            problems.append(f"rows must not be negative, got {rows}")
        if problems:
            raise ValidationError(f"dataset {name}", problems)
        path = Path(path).resolve()
        with self._write() as conn:
            latest = conn.execute(select(_D).where(_D.c.name == name).order_by(_D.c.version.desc()).limit(1)).first()
            if latest is not None and latest.sha256 == sha256:
                return _record(latest)
            version = (conn.execute(select(func.max(_D.c.version)).where(_D.c.name == name)).scalar() or 0) + 1
            values = {
                "name": name, "version": version, "sha256": sha256, "path": str(path), "rows": rows,
                "size_bytes": path.stat().st_size if path.is_file() else 0, "verb": verb,
                "parameters": dict(parameters or {}), "stats": dict(stats or {}), "created_at": datetime.now(timezone.utc),
            }
            new_id = conn.execute(insert(_D).values(**values)).inserted_primary_key[0]
            for parent_id in sorted({p.id for p in parents}):
                conn.execute(insert(_P).values(child_id=new_id, parent_id=parent_id))
        return DatasetRecord(id=new_id, **values)  # type: ignore[arg-type]

    def by_sha256(self, sha256: str) -> DatasetRecord | None:
        """The newest record of these bytes, or None."""
        with self._engine.connect() as conn:
            row = conn.execute(select(_D).where(_D.c.sha256 == sha256).order_by(_D.c.created_at.desc(), _D.c.id.desc()).limit(1)).first()
        return _record(row) if row is not None else None

    def get(self, ref: str) -> DatasetRecord:
        """`name` (newest version), `name:version` or `@sha256-prefix` (at least 8 hex digits)."""
        with self._engine.connect() as conn:
            if ref.startswith("@") or "@" in ref:
                name, _, prefix = ref.partition("@")
                if not re.fullmatch(r"[0-9a-f]{8,64}", prefix):
                    raise ValidationError(f"dataset {ref}", ["a content reference is @ and 8-64 lowercase hex digits"])
                query = select(_D).where(_D.c.sha256.startswith(prefix, autoescape=True))
                if name:
                    query = query.where(_D.c.name == name)
                rows = conn.execute(query.order_by(_D.c.id)).all()
                if len({r.sha256 for r in rows}) > 1:
                    raise AmbiguousRefError(f"dataset {ref} matches {', '.join(f'{r.name}:{r.version}' for r in rows)}")
                row = rows[-1] if rows else None
            else:
                name, sep, version = ref.partition(":")
                query = select(_D).where(_D.c.name == name)
                if sep:
                    if not version.isdigit():
                        raise ValidationError(f"dataset {ref}", [f"version {version!r} is not a number"])
                    query = query.where(_D.c.version == int(version))
                row = conn.execute(query.order_by(_D.c.version.desc()).limit(1)).first()
            if row is None:
                known = conn.execute(select(_D.c.name).distinct().order_by(_D.c.name).limit(20)).scalars().all()
                raise NotFoundError(f"no dataset {ref!r}; registered: {', '.join(known) or 'none'}")
        return _record(row)

    def list(self) -> list[DatasetRecord]:
        """Every dataset record, newest first."""
        with self._engine.connect() as conn:
            return [_record(r) for r in conn.execute(select(_D).order_by(_D.c.created_at.desc(), _D.c.id.desc()))]

    def parents(self, record: DatasetRecord) -> list[DatasetRecord]:
        """The records `record` was made from."""
        with self._engine.connect() as conn:
            rows = conn.execute(select(_D).join(_P, _P.c.parent_id == _D.c.id).where(_P.c.child_id == record.id).order_by(_D.c.id))
            return [_record(r) for r in rows]

    def ancestry(self, record: DatasetRecord, *, limit: int = 100) -> list[tuple[int, DatasetRecord]]:
        """(depth, record) for `record` and every ancestor, depth first; a record shared by two branches appears once."""
        found: list[tuple[int, DatasetRecord]] = []
        seen: set[int] = set()
        stack = [(0, record)]
        while stack and len(found) < limit:
            depth, current = stack.pop()
            if current.id in seen:
                continue
            seen.add(current.id)
            found.append((depth, current))
            stack.extend((depth + 1, parent) for parent in reversed(self.parents(current)))
        return found


def _record(row: Any) -> DatasetRecord:
    created = row.created_at if row.created_at.tzinfo else row.created_at.replace(tzinfo=timezone.utc)
    return DatasetRecord(
        id=row.id, name=row.name, version=row.version, sha256=row.sha256, path=Path(row.path), rows=row.rows,
        size_bytes=row.size_bytes, verb=row.verb, parameters=row.parameters or {}, stats=row.stats or {}, created_at=created,
    )
