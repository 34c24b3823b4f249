"""The registry's tables (SQLAlchemy 2.x declarative), the single source for Alembic migrations.

Design notes:
- Versions are monotonic per name and never reused: `adapter_names.last_version` is bumped
  inside the inserting transaction, so a removed `x:3` never comes back as a different `x:3`.
- Files of a record are rows (`adapter_files`) pointing at content-addressed blobs, so identical
  files are stored once across records and GC is one anti-join.
- Lineage is both a JSON document on the record (the full story: config, recipe, dataset
  fingerprint) and parent edges (`lineage_parents`) so "what was made from X" is a query.
- JSON columns hold what is only ever read whole (config, tags are rows because they are filtered).
- Where a record went on the Hugging Face Hub and where it came from are rows (`hub_transfers`),
  one per push or pull (repo, revision, commit sha, endpoint): a later card names a parent by the
  repo it was published to, and `show` lists them. A base model's Hub id is a column, since a
  card's `base_model` and a pull's base lookup both need it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class BaseModelRow(Base):
    __tablename__ = "base_models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    fingerprint: Mapped[str] = mapped_column(String(64), unique=True)
    architecture: Mapped[str] = mapped_column(String(128))
    path: Mapped[str] = mapped_column(Text)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    source: Mapped[str] = mapped_column(Text, default="")
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # The model's id on the Hugging Face Hub (`HuggingFaceTB/SmolLM2-135M-Instruct`), when it has one:
    # a pushed card's `base_model` must be a Hub id, and a pull finds its base by it.
    hub_id: Mapped[str | None] = mapped_column(String(200), nullable=True, index=True)


class AdapterNameRow(Base):
    __tablename__ = "adapter_names"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    last_version: Mapped[int] = mapped_column(Integer, default=0)


class AdapterRow(Base):
    __tablename__ = "adapters"
    __table_args__ = (
        UniqueConstraint("name", "version", name="uq_adapters_name_version"),
        Index("ix_adapters_sha256", "sha256"),
        Index("ix_adapters_base_model_id", "base_model_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), ForeignKey("adapter_names.name"))
    version: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    base_model_id: Mapped[int] = mapped_column(ForeignKey("base_models.id"))
    peft_type: Mapped[str] = mapped_column(String(32))
    task_type: Mapped[str | None] = mapped_column(String(64), nullable=True)
    rank: Mapped[int | None] = mapped_column(Integer, nullable=True)
    alpha: Mapped[float | None] = mapped_column(Float, nullable=True)
    target_modules: Mapped[list[str]] = mapped_column(JSON)
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    lineage: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # The lineage kind, denormalised so listings need not parse the lineage document.
    origin: Mapped[str | None] = mapped_column(String(16), nullable=True)


class AdapterFileRow(Base):
    __tablename__ = "adapter_files"

    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"), primary_key=True)
    path: Mapped[str] = mapped_column(String(512), primary_key=True)
    blob_sha256: Mapped[str] = mapped_column(String(64), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)


class TagRow(Base):
    __tablename__ = "tags"

    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"), primary_key=True)
    tag: Mapped[str] = mapped_column(String(128), primary_key=True, index=True)


class EvaluationRow(Base):
    __tablename__ = "evaluations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # Exactly one of the two is set: an evaluation of an adapter, or of a base model alone.
    adapter_id: Mapped[int | None] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"), index=True, nullable=True)
    base_model_id: Mapped[int | None] = mapped_column(ForeignKey("base_models.id", ondelete="CASCADE"), index=True, nullable=True)
    metric: Mapped[str] = mapped_column(String(64))
    value: Mapped[float] = mapped_column(Float)
    dataset: Mapped[str] = mapped_column(Text)
    split: Mapped[str | None] = mapped_column(String(64), nullable=True)
    details: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class LineageParentRow(Base):
    __tablename__ = "lineage_parents"

    child_id: Mapped[int] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"), primary_key=True)
    parent_ref: Mapped[str] = mapped_column(String(200), primary_key=True)
    # The parent may be removed later; the edge keeps its ref text, and its id while it exists.
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("adapters.id", ondelete="SET NULL"), nullable=True, index=True)


class HubTransferRow(Base):
    """One push of a record to a Hub repo, or one pull of a record from it."""

    __tablename__ = "hub_transfers"
    __table_args__ = (
        UniqueConstraint("adapter_id", "direction", "endpoint", "repo_id", "revision", "commit_sha", name="uq_hub_transfers"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"), index=True)
    direction: Mapped[str] = mapped_column(String(8))  # "push" or "pull"
    endpoint: Mapped[str] = mapped_column(String(200))  # https://huggingface.co, or HF_ENDPOINT's value
    repo_id: Mapped[str] = mapped_column(String(200), index=True)
    revision: Mapped[str] = mapped_column(String(255))  # the branch, or refs/pr/N for a pull request
    commit_sha: Mapped[str] = mapped_column(String(64))
    pr_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class DatasetRow(Base):
    """A dataset file as a data verb wrote it (or as training read it): identity, counts, card."""

    __tablename__ = "datasets"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_datasets_name_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), index=True)
    version: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    path: Mapped[str] = mapped_column(Text)
    rows: Mapped[int] = mapped_column(BigInteger)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    verb: Mapped[str] = mapped_column(String(32))
    parameters: Mapped[dict[str, Any]] = mapped_column(JSON)
    stats: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class DatasetParentRow(Base):
    __tablename__ = "dataset_parents"

    child_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), primary_key=True)
    parent_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), primary_key=True, index=True)
