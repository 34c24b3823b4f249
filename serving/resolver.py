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
- Resolvers are synchronous (SQLAlchemy, file IO); the app calls them in a worker thread.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from adapterhub.errors import AdapterhubError, AmbiguousRefError
from adapterhub.serving.backends.base import AdapterSpec


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

    def list(self, base: str) -> list[AdapterListing]:
        """Every adapter this resolver can serve on `base`."""


class DirectoryResolver:
    """Adapters are subdirectories of `root` holding an `adapter_config.json`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def resolve(self, base: str, name: str) -> AdapterSpec | None:
        if "/" in name or name.startswith("."):
            return None
        adapter_dir = self.root / name
        if not (adapter_dir / "adapter_config.json").is_file():
            return None
        return AdapterSpec(key=name, locate=lambda: adapter_dir)

    def list(self, base: str) -> list[AdapterListing]:
        if not self.root.is_dir():
            return []
        return [
            AdapterListing(id=d.name, key=d.name, created=int(d.stat().st_mtime))
            for d in sorted(self.root.iterdir())
            if (d / "adapter_config.json").is_file()
        ]


def _timestamp(value: Any) -> int:
    if isinstance(value, dt.datetime):
        return int(value.timestamp())
    if isinstance(value, (int, float)):
        return int(value)
    return 0


class RegistryResolver:
    """Adapters of the adapterhub registry registered against the served base model."""

    def __init__(self, registry: Any, registry_base: str) -> None:
        # `registry` is an `adapterhub.registry.Registry`; `registry_base` the base name it uses.
        self.registry = registry
        self.registry_base = registry_base

    def resolve(self, base: str, name: str) -> AdapterSpec | None:
        try:
            record = self.registry.resolve(name, base=self.registry_base)
        except AmbiguousRefError:
            raise
        except AdapterhubError:
            return None  # a malformed reference names nothing
        if record is None:
            return None
        registry = self.registry
        # `materialize` hashes a blob once; later hot loads only compare its stat stamp.
        return AdapterSpec(key=record.ref, locate=lambda: Path(registry.materialize(record)))

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
                        "rank": record.rank,
                        "size_bytes": record.size_bytes,
                        "sha256": record.sha256,
                        "tags": list(record.tags),
                    },
                )
            )
        return listings
