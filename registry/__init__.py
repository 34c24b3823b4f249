"""The adapter registry: metadata in SQLAlchemy (SQLite WAL by default), content in a blob store.

Importing it never imports torch (a test checks), so listing and resolving stay fast.
"""

from adapterhub.registry.records import (
    AdapterRecord,
    BaseModelRecord,
    Evaluation,
    GcReport,
    HubTransfer,
    Lineage,
    PutResult,
    RemoveResult,
)
from adapterhub.registry.datasets import DatasetRecord
from adapterhub.registry.store import Registry

__all__ = [
    "AdapterRecord", "BaseModelRecord", "DatasetRecord", "Evaluation", "GcReport", "HubTransfer", "Lineage", "PutResult", "Registry", "RemoveResult",
]
