"""The registry schema: Alembic up and down, models and migrations in agreement, views."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from orchestrator.registry.db import (
    Registry,
    current_revision,
    downgrade,
    ensure_schema,
    head_revision,
    upgrade,
)
from orchestrator.registry.models import Base

TABLES = {"experiments", "runs", "jobs", "images", "artifacts", "evaluations", "metrics",
          "events"}


def test_upgrade_from_empty_to_head_and_down_to_base(database_url: str) -> None:
    registry = Registry(database_url, upgrade=False)
    assert current_revision(registry.engine) is None
    upgrade(registry.engine, "head")
    assert current_revision(registry.engine) == head_revision()
    inspector = inspect(registry.engine)
    assert set(inspector.get_table_names()) >= TABLES
    assert {"run_scores", "game_table"} <= set(inspector.get_view_names())
    downgrade(registry.engine, "base")
    inspector = inspect(registry.engine)
    assert not TABLES & set(inspector.get_table_names())
    assert not {"run_scores", "game_table"} & set(inspector.get_view_names())
    upgrade(registry.engine, "head")  # and up again from base
    assert current_revision(registry.engine) == head_revision()
    registry.dispose()


def test_models_and_migrations_agree(registry: Registry) -> None:
    with registry.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        differences = compare_metadata(context, Base.metadata)
    assert differences == []


def test_first_use_upgrades_once_and_then_is_a_no_op(database_url: str) -> None:
    registry = Registry(database_url)  # first use creates the schema
    assert current_revision(registry.engine) == head_revision()
    assert ensure_schema(registry.engine) is False
    registry.dispose()


def test_sqlite_runs_in_wal_mode(tmp_path) -> None:  # type: ignore[no-untyped-def]
    registry = Registry(f"sqlite:///{tmp_path / 'r.db'}")
    with registry.session() as session:
        assert session.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert session.execute(text("PRAGMA foreign_keys")).scalar() == 1
    registry.dispose()


def test_a_schema_revision_of_a_newer_satrl_is_refused_untouched(database_url: str) -> None:
    import pytest

    from orchestrator.errors import SatrlError

    Registry(database_url).dispose()
    registry = Registry(database_url, upgrade=False)
    with registry.engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = 'f00dfeed'"))
    with pytest.raises(SatrlError, match="revision f00dfeed, which this satrl does not know"):
        Registry(database_url)
    with pytest.raises(SatrlError, match="a newer satrl made it"):
        ensure_schema(registry.engine)
    assert current_revision(registry.engine) == "f00dfeed"
    registry.dispose()


def test_registry_urls_that_cannot_hold_a_registry_are_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import pytest

    from orchestrator.errors import SatrlError, UsageError
    from orchestrator.registry.db import open_registry

    for url, message in (("garbage", "not a database URL"), ("foo://bar", "names 'foo'"),
                         ("sqlite://", "in-memory"), ("sqlite:///:memory:", "in-memory")):
        with pytest.raises(UsageError, match=message):
            open_registry(url)
    (tmp_path / "notes.txt").write_text("no database here\n" * 100)
    with pytest.raises(SatrlError, match="file is not a database"):
        open_registry(f"sqlite:///{tmp_path / 'notes.txt'}")
