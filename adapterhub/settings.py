"""Where adapterhub keeps its state.

`ADAPTERHUB_HOME` (default `~/.adapterhub`) holds the registry database, the blob store and
the base models; `ADAPTERHUB_DATABASE_URL` points the metadata at any SQLAlchemy URL
(PostgreSQL for a team) while blobs stay on a shared disk.
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
