"""`satrl sql` cannot change anything, whatever the statement."""

from __future__ import annotations

import json
import shutil
import tempfile
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


def test_json_keeps_every_column_and_is_strict_json(
        workspace: Path, database_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Repeated names kept only the last column; NaN/Infinity and PostgreSQL's numeric
    (a string) were not JSON a strict parser or another language reads."""
    assert run(["queue", "--games", "Pong,Breakout", "--attn", "NA", "--seed-list", "0,1"]) == 0
    capsys.readouterr()
    assert run(["sql", "--json", "SELECT COUNT(*) AS n, COUNT(DISTINCT game) AS n, "
                "1 AS n_2, AVG(seed) AS mean FROM runs"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out, parse_constant=lambda c: pytest.fail(f"{c} is not JSON")) == [
        {"n": 4, "n_3": 2, "n_2": 1, "mean": 0.5}]
    huge = "'NaN'::float8 AS a, 'Infinity'::float8 AS b" if database_url.startswith(
        "postgresql") else "1e999 AS a, -1e999 AS b"
    capsys.readouterr()
    assert run(["sql", "--json", f"SELECT {huge}, 1.5 AS c"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out, parse_constant=lambda c: pytest.fail(f"{c} is not JSON")) == [
        {"a": None, "b": None, "c": 1.5}]


def test_the_table_stops_at_its_rows_and_says_so_csv_prints_all(
        workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A table of every metrics row took minutes (420k rows: 4 min 21 s) and all the memory."""
    many = ("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 1500) "
            "SELECT x FROM c")
    capsys.readouterr()
    assert run(["sql", many]) == 0
    captured = capsys.readouterr()
    values = [line.strip() for line in captured.out.splitlines()[1:] if line.strip()]
    assert values == [str(x) for x in range(1, 1001)]
    assert captured.err.strip() == "(first 1,000 rows; --csv or --json prints them all)"
    assert run(["sql", many, "--csv"]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[-1] == "1500" and captured.err == ""
    assert run(["sql", "SELECT 1 AS x"]) == 0
    assert capsys.readouterr().err == ""  # no note when nothing was left out


def test_values_and_names_print_as_they_are(workspace: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Cells are data, not rich markup: '[/]' used to be a traceback, '[command: ...]' vanished."""
    capsys.readouterr()
    assert run(["sql", "SELECT '[/]' AS x, 'failed [command: qsub -N x]' AS why, "
                "'a\\' AS \"[bold]col\""]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert "[/]" in captured.out and "failed [command: qsub -N x]" in captured.out
    assert "[bold]col" in captured.out and "a\\ " in captured.out


def test_piped_output_is_whole_and_csv_lines_end_in_newline(
        workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Redirected, rich cut tables to 80 columns ('685.\u2026', 'run_\u2026')."""
    long_value = "x" * 150
    columns = ", ".join(f"{i * 1.25} AS column_number_{i}" for i in range(12))
    capsys.readouterr()
    assert run(["sql", f"SELECT '{long_value}' AS value, 10000000 AS steps, {columns}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and "\u2026" not in "".join(lines)
    assert lines[0].split() == ["value", "steps", *(f"column_number_{i}" for i in range(12))]
    assert lines[1].split() == [long_value, "10000000", *(str(i * 1.25) for i in range(12))]
    assert run(["sql", "SELECT 1 AS a, 'b' AS b", "--csv"]) == 0
    assert capsys.readouterr().out == "a,b\n1,b\n"


def _file_statements(database_url: str, target: Path) -> list[tuple[str, str]]:
    """(statement, the keyword it is refused by)."""
    if database_url.startswith("sqlite"):
        return [(f"ATTACH DATABASE '{target}' AS x", "ATTACH"),
                ("DETACH DATABASE main", "DETACH"), (f"VACUUM INTO '{target}'", "VACUUM"),
                (f"  /* why */ -- not\n(ATTACH '{target}' AS y)", "ATTACH")]
    return [(f"COPY (SELECT 1) TO '{target}'", "COPY"),
            (f"/* /* nested */ */ COPY runs TO '{target}'", "COPY"),
            (f"DO $$ BEGIN EXECUTE 'COPY (SELECT 1) TO ''{target}'''; END $$", "DO"),
            # An empty statement first: PostgreSQL drops it and runs one COPY.
            (f"; COPY (SELECT 42) TO '{target}'", "COPY"),
            (f" ;; /* x */ ; DO $$ BEGIN EXECUTE 'COPY (SELECT 1) TO ''{target}'''; END $$",
             "DO")]


def test_statements_that_write_files_are_refused(workspace: Path, database_url: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A read-only transaction still lets ATTACH create a file (SQLite) and COPY ... TO write
    one on the server (PostgreSQL): refused, and no file appears."""
    # A folder the PostgreSQL server's user may write in too, so that a COPY that got through
    # would leave its file there (where the server runs on this machine).
    folder = Path(tempfile.mkdtemp(prefix="satrl-sql-"))
    folder.chmod(0o777)
    target = folder / "outside.db"
    try:
        assert run(["queue", "--games", "Pong", "--attn", "NA", "--seeds", "1"]) == 0
        for statement, keyword in _file_statements(database_url, target):
            capsys.readouterr()
            assert run(["sql", statement]) == 2, statement
            err = capsys.readouterr().err.strip()
            assert f"SQL refused: {keyword} is not allowed" in err
            assert len(err.splitlines()) == 1
            assert not target.exists(), statement
        assert _rows(capsys, "SELECT COUNT(*) AS n FROM runs") == [{"n": 1}]
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ATTACH is SQLite's: this one runs on SQLite only (no skip on PostgreSQL to hide anything).
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_sqlite_authorizer_denies_attach_past_the_keyword_check(
        workspace: Path, database_url: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert database_url.startswith("sqlite")
    from orchestrator import sqlquery
    from orchestrator.errors import UsageError
    from orchestrator.registry.db import open_registry

    monkeypatch.setattr(sqlquery, "REFUSED_STATEMENTS", ())
    registry = open_registry()
    target = tmp_path / "outside.db"
    with pytest.raises(UsageError, match="SQL refused: not authorized"):
        sqlquery.run_readonly_sql(registry, f"ATTACH DATABASE '{target}' AS x")
    assert not target.exists()
    # The authorizer goes with the statement: the pooled connection answers queries as before.
    assert sqlquery.run_readonly_sql(registry, "SELECT COUNT(*) FROM runs").rows == [(0,)]
    registry.dispose()
