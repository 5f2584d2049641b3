"""`satrl sql` cannot change anything, whatever the statement."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.cli import run

WRITES = [
    "INSERT INTO experiments (name, preset, overrides, notes, imported, created_at) "
    "VALUES ('evil', 'paper', '{}', '', false, CURRENT_TIMESTAMP)",
    "DELETE FROM runs",
    "UPDATE runs SET state = 'failed'",
    "DROP TABLE runs",
    "WITH d AS (DELETE FROM runs RETURNING id) SELECT * FROM d",
    "CREATE TABLE sneaky (x int)",
    # Ending the read-only transaction inside the statement must not let the rest run.
    "COMMIT; DELETE FROM runs",
    "ROLLBACK; DELETE FROM runs",
    "SELECT 1; DELETE FROM runs",
]


def _rows(capsys: pytest.CaptureFixture[str], sql: str) -> list[dict]:
    capsys.readouterr()
    assert run(["sql", sql, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("statement", WRITES)
def test_writes_are_refused_and_rows_unchanged(workspace: Path, statement: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["queue", "--games", "Pong,Breakout", "--attn", "NA,CWCA", "--seeds", "2"]) == 0
    before = _rows(capsys, "SELECT id, state FROM runs ORDER BY id")
    assert len(before) == 8
    capsys.readouterr()
    assert run(["sql", statement]) == 2
    assert "SQL refused" in capsys.readouterr().err
    assert _rows(capsys, "SELECT id, state FROM runs ORDER BY id") == before
    assert _rows(capsys, "SELECT name FROM experiments") == [{"name": "main"}]


def test_queries_and_views_answer(workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["queue", "--games", "axis:no-axis", "--attn", "all", "--seeds", "1"]) == 0
    rows = _rows(capsys, "SELECT game, COUNT(*) AS n FROM runs GROUP BY game ORDER BY game")
    assert rows[0] == {"game": "Hero", "n": 5} and len(rows) == 5
    assert _rows(capsys, "SELECT * FROM run_scores") == []
    assert _rows(capsys, "SELECT * FROM game_table") == []
    capsys.readouterr()
    assert run(["sql", "SELECT nope FROM runs"]) == 2
    assert "SQL refused" in capsys.readouterr().err
    # Casts and percent signs reach the database untouched.
    rows = _rows(capsys, "SELECT COUNT(*) AS n FROM runs WHERE game LIKE 'H%'")
    assert rows == [{"n": 5}]
