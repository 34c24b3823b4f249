"""The registry: adapter and base-model records over a metadata database and a blob store.

Invariants, and how they hold:
- *Nothing half-written is visible.* An import validates everything first (one error listing
  every problem, nothing touched), writes its blobs durably, and only then inserts the record,
  its files, tags and lineage in one transaction. A crash before the commit leaves unreferenced
  blobs, which `gc` removes; a crash after it leaves a complete record.
- *Concurrent writers.* SQLite runs in WAL mode and write transactions start with
  `BEGIN IMMEDIATE`, so version numbers are assigned under the database's write lock; the
  `(name, version)` unique constraint backs this up on any database (a conflict retries).
- *Verified reads.* `export` re-hashes every blob it hands out; `materialize` does too, except
  for blobs whose stat still matches the stamp of an earlier check (see `registry/blobs.py`).

Lookups and removal:
- *User text is never a pattern.* Refs and base-model names are compared with `=`; the two
  prefix lookups (`name@sha-prefix`, a base's fingerprint prefix) use `startswith(autoescape=True)`,
  so `%` and `_` match themselves; a prefix that two records share is an `AmbiguousRefError`.
- *Deleting takes an exact name.* `remove_base_model` (which deletes the model's directory)
  accepts only the name or the full fingerprint, never a prefix.
- *Lineage is not broken silently.* Removing a record that other records name as a parent needs
  `force`; the edges keep the parent's ref text, and `removed_parents` says which are gone.
- *Suggestions name live records.* `adapter_names` keeps removed names so versions are never
  reused; "did you mean" draws from the records that exist.

The Hugging Face Hub:
- A base model may carry a Hub id (`hub_id`, checked by `adapterhub.hub.ids`); the same id may
  belong to several bases (two precisions of one model), so a lookup by it returns a list and the
  caller decides. Ids compare case-insensitively, as the Hub's do.
- `record_hub_transfer` appends one push or pull of a record (repo, revision, commit sha,
  endpoint); recording the same transfer again is a no-op, so a pull repeated at one commit
  leaves one row. Transfers belong to their record and go when it is removed.

The registry imports no torch: adapters are checked against a base model through safetensors
headers (`adapterhub.formats`), and only regular files inside an adapter's directory are stored
(`formats.directory_files`).
"""

from __future__ import annotations

import contextlib
import difflib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, String, create_engine, delete, event, func, insert, select, type_coerce, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, OperationalError

from adapterhub import settings
from adapterhub.errors import AdapterhubError, AmbiguousRefError, CorruptBlobError, NotFoundError, ValidationError
from adapterhub.formats import (
    BaseModelSpec,
    base_model_spec,
    check_adapter_against_base,
    directory_files,
    fingerprint_config,
    link_roots,
    read_adapter_dir,
    weight_files,
)
from adapterhub.hub.ids import validate_hub_id
from adapterhub.kinds import get_kind, kind_of, peft_types, variant_flags
from adapterhub.names import Ref, parse_ref, validate_name
from adapterhub.registry.blobs import BlobStore, hash_file
from adapterhub.registry.records import (
    AdapterRecord,
    BaseModelRecord,
    Evaluation,
    GcReport,
    HubDirection,
    HubTransfer,
    Lineage,
    PutResult,
    RemoveResult,
)
from adapterhub.registry.schema import (
    AdapterFileRow,
    AdapterNameRow,
    AdapterRow,
    BaseModelRow,
    EvaluationRow,
    HubTransferRow,
    LineageParentRow,
    TagRow,
)

_A = AdapterRow.__table__
_B = BaseModelRow.__table__
_F = AdapterFileRow.__table__
_T = TagRow.__table__
_E = EvaluationRow.__table__
_L = LineageParentRow.__table__
_N = AdapterNameRow.__table__
_H = HubTransferRow.__table__

if TYPE_CHECKING:
    from adapterhub.registry.datasets import DatasetCatalog

# Listing 10,000 records must stay well under a second: summaries skip the JSON documents
# (config, lineage) and read the timestamp as text, parsed by the C `fromisoformat`.
_SUMMARY_COLUMNS = (
    _A.c.id, _A.c.name, _A.c.version, _A.c.sha256, _A.c.peft_type, _A.c.task_type, _A.c.rank, _A.c.alpha,
    _A.c.target_modules, _A.c.size_bytes, _A.c.origin,
    _B.c.name.label("base_name"), _B.c.fingerprint.label("base_fingerprint"),
)
_FULL_COLUMNS = (*_SUMMARY_COLUMNS, _A.c.created_at, _A.c.lineage, _A.c.config)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _as_utc(value: datetime) -> datetime:
    # SQLite hands back naive datetimes; everything stored is UTC.
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def content_sha256(files: Mapping[str, str]) -> str:
    """Identity of a record's content: the hash of its sorted (path, blob sha256) list."""
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(f"{path}\0{files[path]}\n".encode())
    return digest.hexdigest()


def model_fingerprint(model_dir: Path) -> str:
    """Hash of a model's defining config and of every weight file's content."""
    import json

    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    digest = hashlib.sha256(fingerprint_config(config).encode())
    for path in weight_files(model_dir):
        digest.update(f"{path.name}\0{hash_file(path)}\n".encode())
    return digest.hexdigest()


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class Registry:
    """Adapters, full models and base models of one `ADAPTERHUB_HOME` (or database URL)."""

    def __init__(self, home: Path, engine: Engine) -> None:
        self.home = home
        self.engine = engine
        # A shared store (ADAPTERHUB_BLOB_DIR, an NFS mount say) holds the blobs and the base
        # models of every home on the database; the cache of hard links stays in this home.
        shared = settings.blob_dir()
        self.blobs = BlobStore(shared if shared is not None else home / "blobs")
        self.models_dir = shared / "models" if shared is not None else home / "models"
        self.cache_dir = home / "cache"
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self.cache_dir.mkdir(exist_ok=True)

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, home: Path | None = None, *, database_url: str | None = None) -> Registry:
        """Open (creating and migrating as needed) the registry at `home`."""
        home = Path(home) if home is not None else settings.adapterhub_home()
        home.mkdir(parents=True, exist_ok=True)
        url = database_url or settings.database_url(home)
        engine = _create_engine(url)
        from adapterhub.registry.migrate import upgrade_to_head

        with _file_lock(home / ".migrate.lock"):
            upgrade_to_head(engine)
        return cls(home, engine)

    def close(self) -> None:
        self.engine.dispose()

    @property
    def datasets(self) -> DatasetCatalog:
        """The dataset records (`registry/datasets.py`), in the same database."""
        from adapterhub.registry.datasets import DatasetCatalog

        return DatasetCatalog(self.engine, self._write)

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[Connection]:
        """A write transaction; on SQLite it takes the write lock up front (BEGIN IMMEDIATE)."""
        with self.engine.connect() as conn:
            conn.info["begin_immediate"] = True
            with conn.begin():
                yield conn

    @contextlib.contextmanager
    def _read(self) -> Iterator[Connection]:
        with self.engine.connect() as conn, conn.begin():
            yield conn

    # ------------------------------------------------------------------ base models

    def add_base_model(
        self, *, name: str, model_dir: Path, source: str = "", move: bool = False, hub_id: str | None = None,
    ) -> BaseModelRecord:
        """Register a transformers model directory (safetensors) as base model `name`.

        The directory is copied (or moved, for a staging dir adapterhub made) into
        `$ADAPTERHUB_HOME/models/<name>`. Registering the same model under the same name again
        is a no-op (with `hub_id`, it sets the Hub id: `set_base_model_hub_id`); another model
        under a taken name, or the same model under a second name, is refused.
        """
        validate_name(name, what="base model name")
        if hub_id is not None:
            validate_hub_id(hub_id)
        model_dir = Path(model_dir)
        listing = directory_files(model_dir)  # refuses links that leave it; pickles are left out
        spec = base_model_spec(model_dir)
        fingerprint = model_fingerprint(model_dir)
        with self._read() as conn:
            by_name = conn.execute(select(_B).where(_B.c.name == name)).first()
            by_print = conn.execute(select(_B).where(_B.c.fingerprint == fingerprint)).first()
        if by_name is not None:
            if by_name.fingerprint == fingerprint:
                return self.set_base_model_hub_id(name, hub_id) if hub_id is not None else self.get_base_model(name)
            raise AdapterhubError(f"base model {name!r} is already registered with another fingerprint ({by_name.fingerprint[:12]}); choose another name or `adapterhub models rm {name}` first")
        if by_print is not None:
            raise AdapterhubError(f"this model is already registered as base model {by_print.name!r}")
        target = self.models_dir / name
        staging = Path(tempfile.mkdtemp(dir=self.models_dir, prefix=f".{name}-"))
        try:
            for rel in listing.files:
                (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                if move:
                    shutil.move(str(model_dir / rel), staging / rel)
                else:
                    shutil.copy2(model_dir / rel, staging / rel)
            if target.exists():
                shutil.rmtree(target)  # leftovers of a removed model of the same name
            os.replace(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        try:
            with self._write() as conn:
                conn.execute(insert(_B).values(
                    # Relative to the models directory: a home that mounts the shared store
                    # elsewhere finds the files at its own mount point (`_base_path`).
                    name=name, fingerprint=fingerprint, architecture=spec.architecture, path=target.name,
                    spec=spec.to_json(), source=source or str(model_dir), size_bytes=_dir_size(target), created_at=_now(),
                    hub_id=hub_id,
                ))
        except IntegrityError:
            raise AdapterhubError(f"base model {name!r} was registered concurrently by another process") from None
        return self.get_base_model(name)

    def get_base_model(self, name_or_fingerprint: str, *, prefix: bool = True) -> BaseModelRecord:
        """A base model by name, fingerprint, or (with `prefix`) at least 8 hex digits of its fingerprint.

        The prefix is matched literally (`startswith` with `%`, `_` and the escape character
        escaped), so no text can match more than the bases whose fingerprint begins with it;
        a prefix two bases share is an `AmbiguousRefError`.
        """
        with self._read() as conn:
            row = self._base_row(conn, name_or_fingerprint, prefix=prefix)
            evaluations = self._evaluations(conn, _E.c.base_model_id == row.id)
        return _base_record(row, evaluations, self.models_dir)

    def _base_row(self, conn: Connection, wanted: str, *, prefix: bool) -> Any:
        row = conn.execute(select(_B).where((_B.c.name == wanted) | (_B.c.fingerprint == wanted.lower()))).first()
        if row is None and prefix and len(wanted) >= 8 and all(c in "0123456789abcdef" for c in wanted.lower()):
            rows = conn.execute(select(_B).where(_B.c.fingerprint.startswith(wanted.lower(), autoescape=True)).limit(6)).all()
            if len(rows) > 1:
                shown = ", ".join(f"{r.name} ({r.fingerprint[:12]})" for r in rows[:5])
                raise AmbiguousRefError(f"fingerprint prefix {wanted!r} matches several base models: {shown}; give more digits or the name")
            row = rows[0] if rows else None
        if row is None:
            names = list(conn.execute(select(_B.c.name)).scalars())
            hint = "" if prefix else " (removing a base model takes its exact name or full fingerprint)"
            raise NotFoundError(_not_found_message("base model", wanted, names, hint="`adapterhub models add`") + hint)
        return row

    def set_base_model_hub_id(self, name: str, hub_id: str | None) -> BaseModelRecord:
        """Set (or, with None, clear) the Hugging Face Hub id of base model `name`.

        `hub_id` is `OWNER/NAME` (a `ValidationError` says what is wrong with anything else); cards
        of adapters pushed from this base name it as their `base_model`.
        """
        if hub_id is not None:
            validate_hub_id(hub_id)
        with self._write() as conn:
            row = self._base_row(conn, name, prefix=True)
            conn.execute(update(_B).where(_B.c.id == row.id).values(hub_id=hub_id))
        return self.get_base_model(row.name)

    def base_models_with_hub_id(self, hub_id: str) -> list[BaseModelRecord]:
        """The base models registered with this Hub id (compared without case, as the Hub does), by name."""
        with self._read() as conn:
            rows = conn.execute(select(_B).where(func.lower(_B.c.hub_id) == hub_id.lower()).order_by(_B.c.name)).all()
        return [_base_record(row, (), self.models_dir) for row in rows]

    def list_base_models(self) -> list[BaseModelRecord]:
        with self._read() as conn:
            rows = conn.execute(select(_B).order_by(_B.c.name)).all()
        return [_base_record(row, (), self.models_dir) for row in rows]

    def remove_base_model(self, name: str) -> BaseModelRecord:
        """Remove a base model named exactly (name or full fingerprint); refused while adapters use it.

        No prefix matching here: deleting a model directory takes the model's own name.
        """
        with self._read() as conn:
            record = _base_record(self._base_row(conn, name, prefix=False), (), self.models_dir)
        with self._write() as conn:
            row_id = conn.execute(select(_B.c.id).where(_B.c.name == record.name)).scalar_one()
            users = conn.execute(select(_A.c.name, _A.c.version).where(_A.c.base_model_id == row_id).limit(6)).all()
            if users:
                shown = ", ".join(f"{u.name}:{u.version}" for u in users[:5])
                raise AdapterhubError(f"base model {name!r} is used by adapters ({shown}{', …' if len(users) > 5 else ''}); remove them first")
            conn.execute(delete(_E).where(_E.c.base_model_id == row_id))
            conn.execute(delete(_B).where(_B.c.id == row_id))
        # Only a directory the registry made is deleted (a database shared or edited by hand
        # could name any path).
        if record.path.resolve().is_relative_to(self.models_dir.resolve()):
            shutil.rmtree(record.path, ignore_errors=True)
        return record

    # ------------------------------------------------------------------ adapters: write

    def put_adapter(
        self,
        *,
        name: str,
        source_dir: Path,
        base: str,
        tags: Sequence[str] = (),
        lineage: Lineage | None = None,
    ) -> PutResult:
        """Validate and store an adapter (or full-model) directory as the next version of `name`.

        Everything is checked before anything is written; one `ValidationError` lists every
        problem. Identical content already stored under `name` is a no-op (`created=False`).
        """
        problems = [f"name: {p}" for p in _name_problems(name)]
        problems += [f"tag: {p}" for tag in tags for p in _name_problems(tag)]
        if problems:
            raise ValidationError(f"adapter {name!r}", problems)
        base_record = self.get_base_model(base)
        manifest = read_adapter_dir(Path(source_dir))
        problems = check_adapter_against_base(manifest, base_record.spec)
        if problems:
            raise ValidationError(f"adapter {source_dir} does not fit base model {base_record.name!r}", problems)
        if lineage is not None:
            missing_parents = [p for p in lineage.parents if self.resolve(p) is None]
            if missing_parents:
                raise ValidationError(f"adapter {name!r}", [f"lineage parent {p!r} is not in the registry" for p in missing_parents])

        root = manifest.path.resolve()
        allowed = link_roots(root)
        with self.blobs.writer_lock():
            files: dict[str, str] = {}
            sizes: dict[str, int] = {}
            for rel in manifest.files:
                # Links were checked by `directory_files`; resolving again here (and opening
                # without following links) keeps a file swapped for a link since then out.
                real = (root / rel).resolve()
                if not any(real.is_relative_to(allowed_root) for allowed_root in allowed):
                    raise AdapterhubError(f"{manifest.path / rel} changed during the import and now leads outside the directory")
                files[rel], sizes[rel] = self.blobs.put_file(real)
            sha256 = content_sha256(files)
            for attempt in range(5):
                try:
                    result = self._insert_record(
                        name=name, sha256=sha256, base_record=base_record, manifest=manifest,
                        files=files, sizes=sizes, tags=tags, lineage=lineage,
                    )
                    return PutResult(record=result.record, created=result.created, skipped=manifest.skipped)
                except IntegrityError:
                    # Another writer took this version between our read and insert (possible on
                    # databases without BEGIN IMMEDIATE); the retry sees its row.
                    if attempt == 4:
                        raise
                    time.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    def _insert_record(
        self, *, name: str, sha256: str, base_record: BaseModelRecord, manifest: Any, files: Mapping[str, str],
        sizes: Mapping[str, int], tags: Sequence[str], lineage: Lineage | None,
    ) -> PutResult:
        with self._write() as conn:
            # The name's row is locked first (FOR UPDATE): on PostgreSQL a second writer of this
            # name waits here until the first commits, then sees its version and its content
            # (SQLite's BEGIN IMMEDIATE already serialises writers; SQLAlchemy leaves the clause
            # out there). A name new to two writers at once is settled by its primary key: the
            # loser's IntegrityError retries and finds the row.
            last = conn.execute(select(_N.c.last_version).where(_N.c.name == name).with_for_update()).scalar_one_or_none()
            existing = conn.execute(
                select(_A.c.version).where(_A.c.name == name, _A.c.sha256 == sha256).order_by(_A.c.version.desc())
            ).first()
            if existing is not None:
                created = False
                version = existing.version
            else:
                created = True
                base_id = conn.execute(select(_B.c.id).where(_B.c.name == base_record.name)).scalar_one()
                if last is None:
                    conn.execute(insert(_N).values(name=name, last_version=0))
                    last = 0
                version = last + 1
                conn.execute(update(_N).where(_N.c.name == name).values(last_version=version))
                targets = list(manifest.target_modules)
                adapter_id = conn.execute(insert(_A).values(
                    name=name, version=version, sha256=sha256, base_model_id=base_id, peft_type=manifest.peft_type,
                    task_type=manifest.task_type, rank=manifest.rank, alpha=manifest.alpha, target_modules=targets,
                    config=dict(manifest.config), size_bytes=sum(sizes.values()), created_at=_now(),
                    lineage=lineage.to_json() if lineage else None, origin=lineage.kind if lineage else None,
                )).inserted_primary_key[0]
                conn.execute(insert(_F), [
                    {"adapter_id": adapter_id, "path": rel, "blob_sha256": files[rel], "size_bytes": sizes[rel]} for rel in files
                ])
                if tags:
                    conn.execute(insert(_T), [{"adapter_id": adapter_id, "tag": t} for t in dict.fromkeys(tags)])
                if lineage and lineage.parents:
                    conn.execute(insert(_L), [
                        {"child_id": adapter_id, "parent_ref": p, "parent_id": self._id_of(conn, p)}
                        for p in dict.fromkeys(lineage.parents)
                    ])
        return PutResult(record=self.get(f"{name}:{version}"), created=created)

    def _id_of(self, conn: Connection, ref: str) -> int | None:
        try:
            return self._find_row(conn, parse_ref(ref)).id
        except AdapterhubError:
            return None

    def tag(self, ref: str, tag: str) -> AdapterRecord:
        """Add `tag` to the record `ref` names (idempotent)."""
        validate_name(tag, what="tag")
        with self._write() as conn:
            row = self._find_row(conn, parse_ref(ref))
            exists = conn.execute(select(_T).where(_T.c.adapter_id == row.id, _T.c.tag == tag)).first()
            if exists is None:
                conn.execute(insert(_T).values(adapter_id=row.id, tag=tag))
        return self.get(f"{row.name}:{row.version}")

    def untag(self, ref: str, tag: str) -> AdapterRecord:
        with self._write() as conn:
            row = self._find_row(conn, parse_ref(ref))
            conn.execute(delete(_T).where(_T.c.adapter_id == row.id, _T.c.tag == tag))
        return self.get(f"{row.name}:{row.version}")

    def remove(self, ref: str, *, force: bool = False) -> RemoveResult:
        """Remove one record (its blobs stay until `gc`, as other records may share them).

        A record other records name as a lineage parent (a merge's inputs, say) is removed only
        with `force`: their lineage would then name a removed parent, which `removed_parents`
        reports and `RemoveResult.orphaned` lists.
        """
        record = self.get(ref)
        with self._write() as conn:
            row = self._find_row(conn, parse_ref(record.ref))
            child_ids = select(_L.c.child_id).where(_L.c.parent_id == row.id)
            children = [f"{r.name}:{r.version}" for r in conn.execute(
                select(_A.c.name, _A.c.version).where(_A.c.id.in_(child_ids)).order_by(_A.c.name, _A.c.version)
            )]
            if children and not force:
                shown = ", ".join(children[:5]) + (f" and {len(children) - 5} more" if len(children) > 5 else "")
                raise AdapterhubError(
                    f"{record.ref} is a lineage parent of {len(children)} record(s) ({shown}); remove them first, "
                    f"or `adapterhub rm {record.ref} --force` to remove it and leave their lineage naming a removed parent"
                )
            for table in (_F, _T, _E, _H):
                conn.execute(delete(table).where(table.c.adapter_id == row.id))
            conn.execute(delete(_L).where(_L.c.child_id == row.id))
            conn.execute(update(_L).where(_L.c.parent_id == row.id).values(parent_id=None))
            conn.execute(delete(_A).where(_A.c.id == row.id))
        return RemoveResult(record=record, orphaned=tuple(children))

    def removed_parents(self, ref: str) -> tuple[str, ...]:
        """The lineage parents of `ref`'s record that have been removed from the registry since."""
        with self._read() as conn:
            row = self._find_row(conn, parse_ref(ref))
            return tuple(sorted(conn.execute(
                select(_L.c.parent_ref).where(_L.c.child_id == row.id, _L.c.parent_id.is_(None))
            ).scalars()))

    def record_evaluation(
        self, ref: str, *, metric: str, value: float, dataset: str, split: str | None = None,
        details: Mapping[str, Any] | None = None, base_model: bool = False,
    ) -> Evaluation:
        """Store one metric of the record `ref` (or, with `base_model=True`, of base model `ref`)."""
        created_at = _now()
        with self._write() as conn:
            if base_model:
                row_id = conn.execute(select(_B.c.id).where(_B.c.name == ref)).scalar_one_or_none()
                if row_id is None:
                    raise NotFoundError(f"no base model named {ref!r}")
                owner = {"base_model_id": row_id}
            else:
                owner = {"adapter_id": self._find_row(conn, parse_ref(ref)).id}
            conn.execute(insert(_E).values(
                **owner, metric=metric, value=float(value), dataset=dataset, split=split,
                details=dict(details) if details else None, created_at=created_at,
            ))
        return Evaluation(metric=metric, value=float(value), dataset=dataset, split=split, created_at=created_at, details=details)

    def record_hub_transfer(
        self, ref: str, *, direction: HubDirection, endpoint: str, repo_id: str, revision: str, commit_sha: str,
        pr_url: str | None = None,
    ) -> HubTransfer:
        """Remember that the record `ref` was pushed to (or pulled from) `repo_id` at `commit_sha`.

        The same transfer recorded twice (a pull repeated at one commit) stays one row; the
        record's `hub` lists them oldest first.
        """
        if direction not in ("push", "pull"):
            raise ValueError(f"direction must be 'push' or 'pull', not {direction!r}")
        validate_hub_id(repo_id, what="Hub repo")
        key = {"direction": direction, "endpoint": endpoint, "repo_id": repo_id, "revision": revision, "commit_sha": commit_sha}
        with self._write() as conn:
            adapter_id = self._find_row(conn, parse_ref(ref)).id
            existing = conn.execute(
                select(_H).where(_H.c.adapter_id == adapter_id, *(_H.c[column] == value for column, value in key.items()))
            ).first()
            if existing is not None:
                return _hub_transfer(existing)
            created_at = _now()
            conn.execute(insert(_H).values(adapter_id=adapter_id, pr_url=pr_url, created_at=created_at, **key))
        return HubTransfer(**key, pr_url=pr_url, created_at=created_at)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ adapters: read

    def get(self, ref: str) -> AdapterRecord:
        """The record a ref names: `name` (latest), `name:version` or `name@sha-prefix`."""
        parsed = parse_ref(ref)
        with self._read() as conn:
            row = self._find_row(conn, parsed)
            return self._full_record(conn, row)

    def resolve(self, ref: str, *, base: str | None = None) -> AdapterRecord | None:
        """Like `get`, but None when nothing matches (or it belongs to another base).

        Text that is not a valid ref (a model name with a slash, say) is also a miss, so the
        server can ask about any `model` field. An ambiguous sha prefix still raises.
        """
        try:
            parsed = parse_ref(ref)
        except AdapterhubError:
            return None
        with self._read() as conn:
            try:
                row = self._find_row(conn, parsed, explain=False)
            except NotFoundError:
                return None
            record = self._full_record(conn, row)
        if base is not None and base not in (record.base_name, record.base_fingerprint):
            return None
        return record

    def list(
        self, *, base: str | None = None, tag: str | Sequence[str] | None = None, name: str | None = None,
        peft_type: str | None = None, latest_only: bool = False,
    ) -> list[AdapterRecord]:
        """Summary records, filtered as asked, by name then newest version first.

        `tag` may be several tags: records having all of them. `peft_type` is a PEFT type
        (`lora` keeps every LoRA variant) or a kind of the kinds table (`dora`); any other value
        is an `UnknownKindError` listing the kinds. Summaries leave out files, evaluations,
        config and the lineage document (`origin` holds its kind, `kind` is resolved from the
        config flags that name a variant, `kinds.variant_flags`); `get` returns the full record.
        """
        wanted_type = wanted_kind = None
        if peft_type is not None:
            if peft_type.upper() in peft_types():
                wanted_type = peft_type.upper()
            else:
                wanted_kind = get_kind(peft_type).name  # a variant such as `dora` is a config flag: filtered below
        # Raw text columns, decoded here with the C json/fromisoformat: SQLAlchemy's per-row
        # type processing was most of the time of a 10,000-record listing.
        query = select(
            _A.c.id, _A.c.name, _A.c.version, _A.c.sha256, _A.c.peft_type, _A.c.task_type, _A.c.rank, _A.c.alpha,
            type_coerce(_A.c.target_modules, String), _A.c.size_bytes, _A.c.origin, _B.c.name, _B.c.fingerprint,
            type_coerce(_A.c.created_at, String),
            *(_A.c.config[flag].as_boolean() for flag in variant_flags()),
        ).join(_B, _A.c.base_model_id == _B.c.id)
        if base is not None:
            query = query.where((_B.c.name == base) | (_B.c.fingerprint == base))
        if name is not None:
            query = query.where(_A.c.name == name)
        if wanted_type is not None:
            query = query.where(_A.c.peft_type == wanted_type)
        for wanted_tag in [tag] if isinstance(tag, str) else tag or ():
            query = query.where(_A.c.id.in_(select(_T.c.adapter_id).where(_T.c.tag == wanted_tag)))
        if latest_only:
            latest = select(_A.c.name, func.max(_A.c.version).label("v")).group_by(_A.c.name).subquery()
            query = query.join(latest, (latest.c.name == _A.c.name) & (latest.c.v == _A.c.version))
        query = query.order_by(_A.c.name, _A.c.version.desc())
        with self._read() as conn:
            rows = conn.execute(query).tuples().all()
            tag_query = select(_T.c.adapter_id, _T.c.tag)
            if len(rows) < 500:
                tag_query = tag_query.where(_T.c.adapter_id.in_([r[0] for r in rows]))
            tags: dict[int, list[str]] = {}
            for adapter_id, tag_value in conn.execute(tag_query):
                tags.setdefault(adapter_id, []).append(tag_value)
        records = [_summary_record(row, tuple(sorted(tags.get(row[0], ())))) for row in rows]
        return [r for r in records if r.kind == wanted_kind] if wanted_kind is not None else records

    def children(self, ref: str) -> list[AdapterRecord]:
        """Records whose lineage names `ref`'s record as a parent."""
        record = self.get(ref)
        with self._read() as conn:
            row = self._find_row(conn, parse_ref(record.ref))
            ids = list(conn.execute(select(_L.c.child_id).where(_L.c.parent_id == row.id)).scalars())
            return [self._full_record(conn, conn.execute(self._row_query().where(_A.c.id == i)).one()) for i in ids]

    def materialize(self, record_or_ref: AdapterRecord | str, *, verify: bool = True) -> Path:
        """A directory with the record's files, every blob verified, for PEFT/transformers to load.

        A blob already hashed once and unchanged since (same size, mtime, ctime, inode) is not
        hashed again: this is the server's hot-load path.

        Cached at `$ADAPTERHUB_HOME/cache/<sha256>` (hard links to the blobs, so it costs no
        space); the directory appears atomically. Treat it as read-only.
        """
        record = self.get(record_or_ref) if isinstance(record_or_ref, str) else record_or_ref
        if not record.files:
            record = self.get(record.ref)
        target = self.cache_dir / record.sha256
        if not target.exists():
            self._link_cache_dir(record, target)
        if verify:
            # After linking: a new hard link changes the blob's ctime, which would void a stamp.
            for sha in set(record.files.values()):
                self.blobs.verified_path(sha, trust_stamp=True)
        return target

    def _link_cache_dir(self, record: AdapterRecord, target: Path) -> None:
        """Create `target` atomically with hard links (or copies) of the record's blobs."""
        staging = Path(tempfile.mkdtemp(dir=self.cache_dir, prefix=".tmp-"))
        try:
            for rel, sha in record.files.items():
                dest = staging / _safe_relpath(rel)
                dest.parent.mkdir(parents=True, exist_ok=True)
                source = self.blobs.path_for(sha)
                if not source.exists():
                    self.blobs.verified_path(sha)  # raises NotFoundError naming the missing blob
                try:
                    os.link(source, dest)
                except OSError:
                    shutil.copyfile(source, dest)
            try:
                os.replace(staging, target)
            except OSError:
                if not target.exists():  # lost a race with another materialize: theirs is equal
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def export(self, ref: str, dest: Path) -> Path:
        """Write the record's files (verified) into `dest`, a new or empty directory.

        The files are written to a staging directory beside `dest` and renamed onto it in one
        step, so a failure (a corrupt blob, a full disk, a directory that cannot be written)
        leaves nothing at `dest`, and parent directories created for it are removed again.
        `dest` may not be a symbolic link (the files would land wherever it points) or a file.
        """
        record = self.get(ref)
        dest = Path(dest)
        created_parents: list[Path] = []
        staging: Path | None = None
        done = False
        try:
            if dest.is_symlink():
                raise AdapterhubError(f"export target {dest} is a symbolic link; give the directory itself")
            if dest.exists() and not dest.is_dir():
                raise AdapterhubError(f"export target {dest} exists and is not a directory")
            if dest.exists() and any(dest.iterdir()):
                raise AdapterhubError(f"export target {dest} exists and is not empty")
            created_parents = [p for p in dest.absolute().parents if not p.exists()]  # innermost first
            dest.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.export-"))
            for rel, sha in record.files.items():
                out = staging / _safe_relpath(rel)
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(self.blobs.verified_path(sha), out)
            os.replace(staging, dest)  # atomic; replaces `dest` only when it is an empty directory
            done = True
        except OSError as exc:
            raise AdapterhubError(f"cannot export to {dest}: {exc.strerror or exc}") from None
        finally:
            if not done:
                if staging is not None:
                    shutil.rmtree(staging, ignore_errors=True)
                for parent in created_parents:
                    with contextlib.suppress(OSError):
                        parent.rmdir()
        return dest

    def gc(self) -> GcReport:
        """Remove blobs no record references, stray temp files and stale caches."""
        with self.blobs.exclusive_lock():
            with self._read() as conn:
                referenced = set(conn.execute(select(_F.c.blob_sha256).distinct()).scalars())
                live = set(conn.execute(select(_A.c.sha256).distinct()).scalars())
            removed = removed_bytes = kept = 0
            for sha, path in list(self.blobs.iter_blobs()):
                if sha in referenced:
                    kept += 1
                    continue
                removed_bytes += path.stat().st_size
                path.unlink()
                self.blobs.forget(sha)
                removed += 1
            temp_files = 0
            for path in list(self.blobs.iter_temp_files()):
                path.unlink(missing_ok=True)
                temp_files += 1
            cache_dirs = 0
            for path in list(self.cache_dir.iterdir()):
                if path.name not in live:
                    shutil.rmtree(path, ignore_errors=True)
                    cache_dirs += 1
        return GcReport(removed_blobs=removed, removed_bytes=removed_bytes, removed_temp_files=temp_files,
                        removed_cache_dirs=cache_dirs, kept_blobs=kept)

    # ------------------------------------------------------------------ internals

    def _row_query(self) -> Any:
        return select(*_FULL_COLUMNS).join(_B, _A.c.base_model_id == _B.c.id)

    def _find_row(self, conn: Connection, ref: Ref, *, explain: bool = True) -> Any:
        query = self._row_query().where(_A.c.name == ref.name)
        if ref.version is not None:
            query = query.where(_A.c.version == ref.version)
        if ref.sha_prefix is not None:
            # Literal prefix: `parse_ref` allows only hex digits, and autoescape keeps it so.
            query = query.where(_A.c.sha256.startswith(ref.sha_prefix, autoescape=True))
        rows = conn.execute(query.order_by(_A.c.version.desc())).all()
        if not rows:
            if not explain:  # `resolve`: a miss is an answer, not an error worth a diagnosis
                raise NotFoundError(str(ref))
            versions = list(conn.execute(select(_A.c.version).where(_A.c.name == ref.name).order_by(_A.c.version)).scalars())
            if versions:
                shown = ", ".join(f"{ref.name}:{v}" for v in versions[-10:])
                raise NotFoundError(f"no adapter matches {str(ref)!r}; {ref.name!r} has {shown}")
            # Suggestions come from live records: `adapter_names` keeps removed names (so their
            # versions are never reused), which are no answer to "did you mean".
            last = conn.execute(select(_N.c.last_version).where(_N.c.name == ref.name)).scalar_one_or_none()
            if last:
                raise NotFoundError(f"no adapter matches {str(ref)!r}: every version of {ref.name!r} was removed (the last was {ref.name}:{last})")
            names = list(conn.execute(select(_A.c.name).distinct()).scalars())
            raise NotFoundError(_not_found_message("adapter", str(ref), names, hint="`adapterhub list`"))
        if ref.sha_prefix is not None and len(rows) > 1:
            shown = ", ".join(f"{r.name}:{r.version} ({r.sha256[:12]})" for r in rows[:10])
            raise AmbiguousRefError(f"{str(ref)!r} matches {len(rows)} records: {shown}; give more digits or name:version")
        return rows[0]

    def _evaluations(self, conn: Connection, where: Any) -> tuple[Evaluation, ...]:
        rows = conn.execute(select(_E).where(where).order_by(_E.c.created_at, _E.c.id)).all()
        return tuple(
            Evaluation(metric=r.metric, value=r.value, dataset=r.dataset, split=r.split,
                       created_at=_as_utc(r.created_at), details=r.details)
            for r in rows
        )

    def _full_record(self, conn: Connection, row: Any) -> AdapterRecord:
        tags = tuple(sorted(conn.execute(select(_T.c.tag).where(_T.c.adapter_id == row.id)).scalars()))
        files = {r.path: r.blob_sha256 for r in conn.execute(select(_F.c.path, _F.c.blob_sha256).where(_F.c.adapter_id == row.id))}
        hub = tuple(_hub_transfer(r) for r in conn.execute(select(_H).where(_H.c.adapter_id == row.id).order_by(_H.c.created_at, _H.c.id)))
        return _adapter_record(row, tags=tags, files=files, evaluations=self._evaluations(conn, _E.c.adapter_id == row.id), hub=hub)


def _safe_relpath(rel: str) -> str:
    """A record's file path, refused if it could leave the directory it is written into.

    Imports only store paths relative to the adapter directory; this guards against a
    database edited by hand or shared with a less careful writer.
    """
    parts = Path(rel).parts
    if not parts or Path(rel).is_absolute() or ".." in parts:
        raise CorruptBlobError(f"the registry lists a file {rel!r} whose path leaves the record's directory")
    return rel


def _name_problems(name: str) -> list[str]:
    from adapterhub.names import name_problems

    return name_problems(name)


def _not_found_message(what: str, wanted: str, candidates: Iterable[str], *, hint: str) -> str:
    names = sorted(set(candidates))
    close = difflib.get_close_matches(wanted.split(":")[0].split("@")[0], names, n=5, cutoff=0.5)
    if close:
        return f"no {what} named {wanted!r}; did you mean: {', '.join(close)}?"
    if names:
        shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
        return f"no {what} named {wanted!r}; known: {shown}"
    return f"no {what} named {wanted!r}; none registered yet (see {hint})"


def _base_record(row: Any, evaluations: tuple[Evaluation, ...], models_dir: Path) -> BaseModelRecord:
    # Bases registered since the shared store name their directory relative to the models
    # directory; older rows hold the absolute path of the machine that added them.
    return BaseModelRecord(
        name=row.name, fingerprint=row.fingerprint, architecture=row.architecture, path=models_dir / row.path,
        spec=BaseModelSpec.from_json(row.spec), source=row.source, size_bytes=row.size_bytes,
        created_at=_as_utc(row.created_at), evaluations=evaluations, hub_id=row.hub_id,
    )


def _hub_transfer(row: Any) -> HubTransfer:
    return HubTransfer(
        direction=row.direction, endpoint=row.endpoint, repo_id=row.repo_id, revision=row.revision,
        commit_sha=row.commit_sha, pr_url=row.pr_url, created_at=_as_utc(row.created_at),
    )


def _adapter_record(
    row: Any, *, tags: tuple[str, ...] = (), files: Mapping[str, str] | None = None,
    evaluations: tuple[Evaluation, ...] = (), hub: tuple[HubTransfer, ...] = (),
) -> AdapterRecord:
    return AdapterRecord(
        name=row.name, version=row.version, sha256=row.sha256, base_name=row.base_name,
        base_fingerprint=row.base_fingerprint, peft_type=row.peft_type, task_type=row.task_type, rank=row.rank,
        alpha=row.alpha, target_modules=tuple(row.target_modules or ()), size_bytes=row.size_bytes,
        created_at=_as_utc(row.created_at), tags=tags, lineage=Lineage.from_json(row.lineage),
        evaluations=evaluations, files=files or {}, config=row.config or {}, origin=row.origin, hub=hub,
    )


def _parse_timestamp(text: Any) -> datetime:
    if isinstance(text, datetime):
        return _as_utc(text)
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc)


def _json_value(raw: Any) -> Any:
    # SQLite hands the raw column back as text; psycopg decodes PostgreSQL's json type itself.
    return json.loads(raw) if isinstance(raw, (str, bytes)) else raw


def _summary_record(row: tuple[Any, ...], tags: tuple[str, ...]) -> AdapterRecord:
    (_, name, version, sha256, peft_type, task_type, rank, alpha, targets, size, origin, base_name, base_print,
     created, *flags) = row
    return AdapterRecord(
        name=name, version=version, sha256=sha256, base_name=base_name, base_fingerprint=base_print,
        peft_type=peft_type, task_type=task_type, rank=rank, alpha=alpha,
        target_modules=tuple(_json_value(targets)) if targets else (), size_bytes=size,
        created_at=_parse_timestamp(created), tags=tags, origin=origin,
        kind=kind_of(peft_type, dict(zip(variant_flags(), map(bool, flags)))).name,
    )


def _create_engine(url: str) -> Engine:
    if not url.startswith("sqlite"):
        return create_engine(_with_driver(url), pool_pre_ping=True)
    engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take over transaction control from pysqlite so writes can BEGIN IMMEDIATE.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA busy_timeout=60000")
        for _ in range(50):
            try:
                cursor.execute("PRAGMA journal_mode=WAL")
                break
            except Exception:  # database is locked while another process switches it
                time.sleep(0.1)
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        immediate = conn.info.pop("begin_immediate", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def _with_driver(url: str) -> str:
    """A plain `postgresql://` (or `postgres://`) URL goes through psycopg 3, the `postgres` extra.

    SQLAlchemy would pick psycopg2 for a URL without a driver, which adapterhub does not ship.
    """
    parsed = make_url(url.replace("postgres://", "postgresql://", 1) if url.startswith("postgres://") else url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with path.open("a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


__all__ = ["Registry", "content_sha256", "model_fingerprint", "OperationalError"]
