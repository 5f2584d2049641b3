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


def test_0005_scores_existing_runs_on_their_grid_and_down_again(database_url: str) -> None:
    """Runs recorded under 0004 are rescored by 0005's views; a downgrade brings 0003's back.

    Four runs of one cell, grid 256 .. 1024: complete (1 at every point), complete with an
    evaluation past the budget (2, and 1000 at 1280), short of its first point (3 at the other
    three, 1000 at 1280), and one seed complete of another cell of the game.
    """
    import pytest

    from agents.spec import PAPER
    from orchestrator.registry.models import Evaluation, Experiment, Run

    registry = Registry(database_url, upgrade=False)
    upgrade(registry.engine, "0004")
    spec = PAPER.replace(total_timesteps=1024, eval_every_steps=256)
    grid = [256, 512, 768, 1024]
    evaluations = {("NA", 0): {t: 1.0 for t in grid},
                   ("NA", 1): {**{t: 2.0 for t in grid}, 1280: 1000.0},
                   ("NA", 2): {**{t: 3.0 for t in grid[1:]}, 1280: 1000.0},
                   ("CWCA", 0): {t: 5.0 for t in grid}}
    with registry.engine.begin() as connection:
        connection.execute(Experiment.__table__.insert(), [
            {"id": 1, "name": "old", "preset": "paper", "overrides": {}, "notes": "",
             "imported": False}])
        connection.execute(Run.__table__.insert(), [
            {"id": i, "experiment_id": 1, "game": "Pong", "attn": attn, "seed": seed,
             "spec": spec.replace(attn=attn, seed=seed).to_dict(), "spec_hash": "h",
             "state": "succeeded", "attempts": 1}
            for i, (attn, seed) in enumerate(evaluations, start=1)])
        connection.execute(Evaluation.__table__.insert(), [
            {"run_id": i, "timestep": t, "episode": None, "score": score, "length": None,
             "n_episodes": 5}
            for i, by_step in enumerate(evaluations.values(), start=1)
            for t, score in by_step.items()])

    def rows(sql: str) -> list[dict]:
        with registry.engine.connect() as connection:
            return [dict(r) for r in connection.execute(text(sql)).mappings()]

    # 0004 (0003's views): every evaluation averaged, every evaluated run a seed.
    assert rows("SELECT n_seeds FROM game_table WHERE attn = 'NA'") == [{"n_seeds": 3}]
    upgrade(registry.engine, "head")
    scores = rows("SELECT seed, mean_score, last_score, n_evaluations, last_timestep, "
                  "expected_evaluations, n_off_grid, complete FROM run_scores "
                  "WHERE attn = 'NA' ORDER BY seed")
    assert scores == [
        {"seed": 0, "mean_score": 1.0, "last_score": 1.0, "n_evaluations": 4,
         "last_timestep": 1024, "expected_evaluations": 4, "n_off_grid": 0, "complete": 1},
        {"seed": 1, "mean_score": 2.0, "last_score": 2.0, "n_evaluations": 4,
         "last_timestep": 1024, "expected_evaluations": 4, "n_off_grid": 1, "complete": 1},
        {"seed": 2, "mean_score": 3.0, "last_score": 3.0, "n_evaluations": 3,
         "last_timestep": 1024, "expected_evaluations": 4, "n_off_grid": 1, "complete": 0}]
    table = rows("SELECT attn, n_seeds, mean_score, std_error, expected_seeds, n_left_out, "
                 "complete FROM game_table ORDER BY attn")
    assert table[0] == {"attn": "CWCA", "n_seeds": 1, "mean_score": 5.0, "std_error": None,
                        "expected_seeds": 3, "n_left_out": 0, "complete": 0}
    assert table[1].pop("attn") == "NA"
    assert table[1] == pytest.approx({
        "n_seeds": 2, "mean_score": 1.5, "std_error": 0.5 / 2 ** 0.5,
        "expected_seeds": 3, "n_left_out": 1, "complete": 0}, rel=1e-12)
    downgrade(registry.engine, "0004")
    assert rows("SELECT n_seeds, mean_score FROM game_table WHERE attn = 'NA'") == [
        {"n_seeds": 3,
         "mean_score": pytest.approx((1.0 + (8 + 1000) / 5 + (9 + 1000) / 4) / 3, rel=1e-12)}]
    assert "complete" not in rows("SELECT * FROM run_scores WHERE seed = 0")[0]
    registry.dispose()
