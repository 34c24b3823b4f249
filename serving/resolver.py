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
        if "/" in name or "\\" in name or name.startswith(".") or "\0" in name:
            return None
        adapter_dir = self.root / name
        if not (adapter_dir / "adapter_config.json").is_file():
            return None
        return AdapterSpec(key=name, locate=lambda: adapter_dir, name=name)

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
        # `materialize` hashes a blob once; later hot loads only compare its stat stamp. The
        # record's kind travels along, so the backend refuses a kind it cannot serve unread.
        return AdapterSpec(
            key=record.ref, locate=lambda: Path(registry.materialize(record)), name=record.ref,
            peft_type=record.peft_type, task_type=record.task_type, config=dict(record.config or {}) or None,
        )

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
                        "task_type": record.task_type,
                        "rank": record.rank,
                        "size_bytes": record.size_bytes,
                        "sha256": record.sha256,
                        "tags": list(record.tags),
                    },
                )
            )
        return listings
