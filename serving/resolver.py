"""How the server finds an adapter named in a request: the `AdapterResolver` interface.

Design decisions:
- Modelled on vLLM's `LoRAResolver` plugin (`resolve(base, name) -> adapter | None`): the server
  asks a resolver only for names it does not already know, and a resolver never loads weights.
  It answers an `AdapterSpec` whose `key` is the canonical identity (a registry `name:version`),
  so `x`, `x:2` and `x@ab12` share one resident copy, and whose `locate()` materializes files
  only when the engine really needs to read them.
- `RegistryResolver` is the production one (the adapterhub registry: `reg.resolve`,
  `reg.materialize`, `reg.list`); `DirectoryResolver` serves PEFT directories below one folder,
  like vLLM's filesystem resolver, for use without a registry.
- Resolvers are synchronous (SQLAlchemy, file IO); the app calls `resolve` in a worker thread.
  `cached` is the exception: it answers from memory only (no table is read, nothing blocks), so
  the app asks it on the event loop first, for adapters the backend already holds.
- A resident adapter costs no registry read (`RegistryResolver`). `Registry.resolve` is four
  queries (~0.9 ms here, plus a worker-thread hop) and used to run on every request. Answers
  are cached, and each kind of ref is trusted as long as it can be:
  - `name:version` never changes its meaning (versions are never reused, the registry's
    `adapter_names.last_version` sees to that), but it can be removed (`adapterhub rm` on any
    replica's database): trusted while no commit happened, then checked by one indexed query
    (does the `(name, version)` row still exist), so a removed version is a 404 on the next
    request and its resident weights are not served.
  - `name` (the latest version) and `name@sha` change when another process imports or removes
    a version. On SQLite, the answer is trusted while the database's change counter,
    `PRAGMA data_version` on a connection of the resolver's own, has not moved: SQLite bumps
    it on every commit of any other connection, of any process, and reading it takes ~2 us
    and reads no table, so it is checked inline on every request. After a commit, a bare name
    is checked again by one indexed query (its latest version, the `(name, version)` unique
    index), and only resolved again when that changed; on other databases (PostgreSQL), which
    have no such counter, that one query is the check for every request.
  The counter moves for any commit (a tag, an evaluation), so some checks are needless: each
  costs one indexed query, and commits are rare next to requests. An answer read after a commit
  is never trusted as older than it is: the counter is read before the answer is.
"""

from __future__ import annotations

import collections
import datetime as dt
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import func, select

from adapterhub.errors import AdapterhubError, AmbiguousRefError
from adapterhub.serving.backends.base import AdapterSpec

_VERSIONED = re.compile(r"\s*[^@:\s]+:[0-9]+\s*")


def _is_versioned(name: str) -> bool:
    """`name:version`: a ref whose meaning never changes."""
    return _VERSIONED.fullmatch(name) is not None


def _is_bare(name: str) -> bool:
    """`name` alone: the latest version."""
    return ":" not in name and "@" not in name


@dataclass(frozen=True)
class AdapterListing:
    """One adapter `/v1/models` shows: its id, canonical key and facts worth displaying."""

    id: str
    key: str
    created: int
    aliases: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)


class AdapterResolver(Protocol):
    """Finds adapters of a base model by the name a client used."""

    def resolve(self, base: str, name: str) -> AdapterSpec | None:
        """The adapter `name` refers to, or None when nothing matches."""

    def cached(self, base: str, name: str) -> AdapterSpec | None:
        """What `resolve` would answer, from memory, when that is known to be still right
        without reading anything; else None (then the caller asks `resolve`)."""

    def list(self, base: str) -> list[AdapterListing]:
        """Every adapter this resolver can serve on `base`."""


class DirectoryResolver:
    """Adapters are subdirectories of `root` holding an `adapter_config.json`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def resolve(self, base: str, name: str) -> AdapterSpec | None:
        if "/" in name or "\\" in name or name.startswith(".") or "\0" in name:
            return None
        adapter_dir = self.root / name
        if not (adapter_dir / "adapter_config.json").is_file():
            return None
        return AdapterSpec(key=name, locate=lambda: adapter_dir, name=name)

    def cached(self, base: str, name: str) -> AdapterSpec | None:
        """Nothing: a directory can change at any time, and `resolve` is one `stat` anyway."""
        return None

    def list(self, base: str) -> list[AdapterListing]:
        """Subdirectories with an `adapter_config.json`, with its `peft_type` and `task_type`
        (the app lists only kinds the backend serves); one whose config cannot be read is left
        out, as it could not be served either."""
        from adapterhub.serving.backends.lora_slots import read_adapter_config  # torch-free at import

        if not self.root.is_dir():
            return []
        listings = []
        for adapter_dir in sorted(self.root.iterdir()):
            try:
                config = read_adapter_config(adapter_dir)
            except (AdapterhubError, OSError):
                continue
            meta = {key: config.get(key) for key in ("peft_type", "task_type", "r") if config.get(key) is not None}
            listings.append(AdapterListing(id=adapter_dir.name, key=adapter_dir.name, created=int(adapter_dir.stat().st_mtime), meta=meta))
        return listings


def _timestamp(value: Any) -> int:
    if isinstance(value, dt.datetime):
        return int(value.timestamp())
    if isinstance(value, (int, float)):
        return int(value)
    return 0


class _ChangeCounter:
    """SQLite's `PRAGMA data_version` on a read-only connection of its own: the value changes
    whenever any other connection, of any process, commits to the database."""

    def __init__(self, database: str) -> None:
        import sqlite3

        self._lock = threading.Lock()
        # Its own connection (not one of the registry's pool): the counter is per connection,
        # and this one must never write. A short busy timeout: the check runs on the event loop,
        # and when it cannot tell, the answer is read again instead.
        self._connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=0.05, check_same_thread=False)
        self._connection.isolation_level = None

    def read(self) -> int | None:
        """The counter now; None when it cannot be read (then nothing cached is trusted)."""
        import sqlite3

        with self._lock:
            try:
                return int(self._connection.execute("PRAGMA data_version").fetchone()[0])
            except sqlite3.Error:
                return None

    def close(self) -> None:
        with self._lock:
            self._connection.close()


@dataclass
class _Resolved:
    """A cached answer of `RegistryResolver.resolve`, with what it was read under."""

    spec: AdapterSpec | None
    stamp: int | None  # the change counter before it was read (None: unknown)
    version: int | None  # the record's version (bare names are checked against the latest)


class RegistryResolver:
    """Adapters of the adapterhub registry registered against the served base model.

    Answers are cached (see the module's design decisions): `cached` is the event loop's check,
    `resolve` the worker thread's. `watch_changes=False` leaves out SQLite's change counter, as
    on databases that have none: bare names are then checked by one indexed query each.
    """

    #: Refs whose answers are kept, least recently used dropped first.
    MAX_CACHED = 4096

    def __init__(self, registry: Any, registry_base: str, *, watch_changes: bool = True) -> None:
        # `registry` is an `adapterhub.registry.Registry`; `registry_base` the base name it uses.
        self.registry = registry
        self.registry_base = registry_base
        self._cache: collections.OrderedDict[str, _Resolved] = collections.OrderedDict()
        self._cache_lock = threading.Lock()
        self._counter: _ChangeCounter | None = None
        url = registry.engine.url
        if watch_changes and url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
            self._counter = _ChangeCounter(url.database)
        from adapterhub.registry.schema import AdapterRow

        adapters = AdapterRow.__table__
        self._latest_version = lambda name: select(func.max(adapters.c.version)).where(adapters.c.name == name)
        self._version_exists = lambda name, version: select(adapters.c.id).where(adapters.c.name == name, adapters.c.version == version)

    def cached(self, base: str, name: str) -> AdapterSpec | None:
        with self._cache_lock:
            hit = self._cache.get(name)
            if hit is None or hit.spec is None:
                return None
            self._cache.move_to_end(name)
        if self._counter is not None and hit.stamp is not None and self._counter.read() == hit.stamp:
            return hit.spec  # nothing was committed since it was read
        return None

    def resolve(self, base: str, name: str) -> AdapterSpec | None:
        spec = self.cached(base, name)
        if spec is not None:
            return spec
        stamp = self._counter.read() if self._counter is not None else None  # before anything is read
        with self._cache_lock:
            hit = self._cache.get(name)
        if hit is not None and hit.spec is not None and hit.version is not None and (_is_bare(name) or _is_versioned(name)):
            # Something was committed, or no counter tells: the latest version says whether a
            # bare name still means the same record (versions are never reused); a version is
            # still right while its row exists.
            with self.registry.engine.connect() as conn:
                if _is_bare(name):
                    still_right = conn.execute(self._latest_version(name.strip())).scalar() == hit.version
                else:
                    still_right = conn.execute(self._version_exists(name.strip().split(":")[0], hit.version)).first() is not None
            if still_right:
                self._remember(name, _Resolved(hit.spec, stamp, hit.version))
                return hit.spec
        try:
            record = self.registry.resolve(name, base=self.registry_base)
        except AmbiguousRefError:
            raise
        except AdapterhubError:
            return None  # a malformed reference names nothing
        if record is None:
            return None
        registry = self.registry
        # `materialize` hashes a blob once; later hot loads only compare its stat stamp. The
        # record's kind travels along, so the backend refuses a kind it cannot serve unread.
        spec = AdapterSpec(
            key=record.ref, locate=lambda: Path(registry.materialize(record)), name=record.ref,
            peft_type=record.peft_type, task_type=record.task_type, config=dict(record.config or {}) or None,
        )
        self._remember(name, _Resolved(spec, stamp, record.version))
        return spec

    def _remember(self, name: str, resolved: _Resolved) -> None:
        with self._cache_lock:
            self._cache[name] = resolved
            self._cache.move_to_end(name)
            while len(self._cache) > self.MAX_CACHED:
                self._cache.popitem(last=False)

    def list(self, base: str) -> list[AdapterListing]:
        records = self.registry.list(base=self.registry_base)
        latest: dict[str, int] = {}
        for record in records:
            latest[record.name] = max(latest.get(record.name, 0), record.version)
        listings = []
        for record in records:
            aliases = (record.name,) if latest[record.name] == record.version else ()
            listings.append(
                AdapterListing(
                    id=record.ref,
                    key=record.ref,
                    created=_timestamp(record.created_at),
                    aliases=aliases,
                    meta={
                        "peft_type": record.peft_type,
                        "kind": record.kind,
                        "task_type": record.task_type,
                        "rank": record.rank,
                        "size_bytes": record.size_bytes,
                        "sha256": record.sha256,
                        "tags": list(record.tags),
                    },
                )
            )
        return listings
