"""Schema migrations with Alembic, run programmatically when the registry opens.

The migration scripts ship inside the package (`registry/migrations/`), so an installed
adapterhub migrates its own database without an `alembic.ini` on disk. Opening an up-to-date
database costs one query of `alembic_version`.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, text

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# Any fixed 64-bit number; every adapterhub process migrating one PostgreSQL database takes it.
_MIGRATION_LOCK_KEY = 0x61646170746572


def alembic_config(engine: Engine) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    return config


def upgrade_to_head(engine: Engine) -> None:
    """Bring the database to the newest schema (no-op when it already is)."""
    config = alembic_config(engine)
    head = ScriptDirectory.from_config(config).get_current_head()
    with engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
    if current == head:
        return
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # Homes on other machines share this database, so the registry's file lock does not
            # cover them: a transaction-scoped advisory lock does. PostgreSQL's DDL is
            # transactional, so a migration that fails leaves the previous schema whole.
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
            if MigrationContext.configure(conn).get_current_revision() == head:
                return
        config.attributes["connection"] = conn
        command.upgrade(config, "head")
