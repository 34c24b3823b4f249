"""Where adapterhub keeps its state.

`ADAPTERHUB_HOME` (default `~/.adapterhub`) holds the registry database, the blob store and
the base models; `ADAPTERHUB_DATABASE_URL` points the metadata at any SQLAlchemy URL
(PostgreSQL for a team) and `ADAPTERHUB_BLOB_DIR` the blobs and base models at a directory
every machine mounts (docs/scaling.md).
"""

from __future__ import annotations

import os
from pathlib import Path


def adapterhub_home() -> Path:
    """The state directory, from `ADAPTERHUB_HOME` or `~/.adapterhub`."""
    configured = os.environ.get("ADAPTERHUB_HOME")
    return Path(configured).expanduser() if configured else Path.home() / ".adapterhub"


def database_url(home: Path) -> str:
    """The metadata database: `ADAPTERHUB_DATABASE_URL`, else SQLite inside `home`."""
    return os.environ.get("ADAPTERHUB_DATABASE_URL") or f"sqlite:///{home / 'registry.db'}"


def blob_dir() -> Path | None:
    """The shared store (`ADAPTERHUB_BLOB_DIR`): blobs and base models of every home on one
    database; None keeps them inside the home."""
    configured = os.environ.get("ADAPTERHUB_BLOB_DIR")
    return Path(configured).expanduser() if configured else None
