"""Broken configuration and unreachable registries: one line, non-zero exit, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def _satrl(workspace: Path, *args: str, env: dict[str, str] | None = None
           ) -> subprocess.CompletedProcess[str]:
    import os

    environment = {k: v for k, v in os.environ.items()
                   if not k.startswith("SATRL_")} | {"SATRL_HOME": str(workspace)} | (env or {})
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True,
                          text=True, env=environment, timeout=120)


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('registry = "x"\n', "[registry] must be a table"),
        ("[registry]\nurl = 5\n", "url must be a string"),
        ('paths = ["a"]\n', "[paths] must be a table"),
        ("experiment = 3\n", "experiment must be a string"),
        ("[registry\n", "not valid TOML"),
        # A typo'd name would silently drop its setting (a walltime, auto-requeue, a queue).
        ("[resources]\nwalltim_min = 30\n",
         "[resources] has no setting 'walltim_min' (did you mean walltime_min?)"),
        ("[dispatchh]\nauto_requeue = true\n",
         "unknown setting 'dispatchh' (did you mean dispatch?)"),
        ("[dispatch]\nwalltime_min = 30\n", "[dispatch] has no setting 'walltime_min'"),
        ("[pbs]\ngres = 'gpu'\n", "[pbs] has no setting 'gres'"),
        ("experment = 'x'\n", "unknown setting 'experment' (did you mean experiment?)"),
    ],
)
def test_broken_satrl_toml_is_one_line(tmp_path: Path, toml: str, message: str) -> None:
    (tmp_path / "satrl.toml").write_text(toml)
    result = _satrl(tmp_path, "status")
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgresql://postgres@127.0.0.1:1/nothing", "cannot use the registry at"),
        ("sqlite:////proc/no-such-folder/satrl.db", "cannot create the registry's folder"),
    ],
)
def test_unreachable_registry_is_one_line(tmp_path: Path, url: str, message: str) -> None:
    result = _satrl(tmp_path, "status", env={"SATRL_DATABASE_URL": url})
    assert result.returncode == 1
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def _one_line(text: str) -> str:
    """The single line of `text`; the test fails on a traceback or on more lines."""
    assert "Traceback" not in text
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("garbage", "is not a database URL"),
        ("foo://bar", "names 'foo'"),
        ("mysql://u@h/db", "names 'mysql'"),
        ("postgresql+psycopg2://u@127.0.0.1/db", "driver is not installed"),
        ("postgresql://u:secret@h:notaport/db", "is not a database URL"),
        ("sqlite://", "in-memory database"),
        ("sqlite:///:memory:", "in-memory database"),
    ],
)
def test_bad_database_url_is_one_line(tmp_path: Path, url: str, message: str) -> None:
    result = _satrl(tmp_path, "runs", env={"SATRL_DATABASE_URL": url})
    assert result.returncode == 2
    line = _one_line(result.stderr)
    assert message in line and "secret" not in line
    assert not (tmp_path / ".satrl").exists()


def test_a_file_that_is_no_database_is_one_line(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not a database, just some notes\n" * 10)
    result = _satrl(tmp_path, "runs", env={"SATRL_DATABASE_URL": f"sqlite:///{notes}"})
    assert result.returncode == 1
    assert "file is not a database" in _one_line(result.stderr)
    assert notes.read_text() == "not a database, just some notes\n" * 10


def test_registry_of_a_newer_satrl_is_one_line(tmp_path: Path) -> None:
    assert _satrl(tmp_path, "queue", "--games", "Pong", "--attn", "NA", "--seeds", "1"
                  ).returncode == 0
    database = tmp_path / ".satrl" / "satrl.db"
    import sqlite3

    with sqlite3.connect(database) as connection:
        connection.execute("UPDATE alembic_version SET version_num = 'f00dfeed'")
    result = _satrl(tmp_path, "runs")
    assert result.returncode == 1
    assert "a newer satrl made it" in _one_line(result.stderr)
    result = _satrl(tmp_path, "db", "upgrade")
    assert result.returncode == 1 and "f00dfeed" in _one_line(result.stderr)
    with sqlite3.connect(database) as connection:
        assert connection.execute("SELECT version_num FROM alembic_version").fetchall() == [
            ("f00dfeed",)]


def test_unreadable_satrl_toml_is_one_line_naming_it(tmp_path: Path) -> None:
    (tmp_path / "satrl.toml").symlink_to("/proc/self/mem")
    result = _satrl(tmp_path, "runs")
    assert result.returncode == 2
    line = _one_line(result.stderr)
    assert str(tmp_path / "satrl.toml") in line and "cannot be read" in line
    assert not (tmp_path / ".satrl").exists()


# --- in-process, on both databases --------------------------------------------------------
def _queued_run(capsys: pytest.CaptureFixture[str]) -> None:
    from orchestrator.cli import run

    assert run(["queue", "--games", "Pong", "--attn", "NA", "--seed-list", "0",
                "--preset", "smoke"]) == 0
    capsys.readouterr()


def _states(capsys: pytest.CaptureFixture[str]) -> list[tuple[str, int]]:
    """(state, events) of every run: what a refused command must leave as it was."""
    import json

    from orchestrator.cli import run

    capsys.readouterr()
    assert run(["sql", "SELECT r.state, COUNT(e.id) AS events FROM runs r JOIN events e "
                "ON e.run_id = r.id GROUP BY r.id, r.state ORDER BY r.id", "--json"]) == 0
    return [(row["state"], row["events"]) for row in json.loads(capsys.readouterr().out)]


@pytest.mark.parametrize("command", [["show"], ["cancel"], ["logs"], ["requeue"],
                                     ["requeue", "--dry-run"], ["cancel", "--dry-run"]])
@pytest.mark.parametrize(("ref", "message"), [
    ("99999999999999999999", "no run with id 99999999999999999999"),
    ("9223372036854775808", "no run with id 9223372036854775808"),  # 2**63: one past BIGINT
    ("²", "no run with id ²"),
    ("Pong/NA/99999999999999999999", "seeds are 0..2147483647"),
    ("Pong/NA/²", "not a non-negative integer"),
])
def test_run_ids_and_seeds_no_run_can_have_are_one_line(
        workspace: Path, capsys: pytest.CaptureFixture[str], command: list[str], ref: str,
        message: str) -> None:
    from orchestrator.cli import run

    _queued_run(capsys)
    before = _states(capsys)
    assert run([*command, ref]) == 2
    assert message in _one_line(capsys.readouterr().err)
    assert _states(capsys) == before


def test_fetch_and_image_use_with_ids_no_row_can_have_are_one_line(
        workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from orchestrator.cli import run

    _queued_run(capsys)
    assert run(["fetch", "Pong", "NA", "99999999999999999999"]) == 2
    assert "no run Pong/NA/99999999999999999999" in _one_line(capsys.readouterr().err)
    for ref in ("99999999999999999999", "²"):
        assert run(["image", "use", ref]) == 2
        assert f"no image with id {ref}" in _one_line(capsys.readouterr().err)


def test_show_prints_registry_text_as_it_is(workspace: Path, database_url: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Reasons carry "[command: ...]": rich must not read them as markup tags."""
    from sqlalchemy import select

    from orchestrator.cli import run
    from orchestrator.registry.db import Registry
    from orchestrator.registry.models import Event, Run

    _queued_run(capsys)
    registry = Registry(database_url)
    try:
        with registry.write() as session:
            run_id = session.scalar(select(Run.id))
            session.add(Event(run_id=run_id, from_state="queued", to_state="failed",
                              why="failed [command: qsub -N x] [/]"))
    finally:
        registry.dispose()
    assert run(["show", "Pong/NA/0"]) == 0
    assert "failed [command: qsub -N x] [/]" in capsys.readouterr().out


@pytest.mark.parametrize(("args", "message"), [
    (["runs", "--limit", "-1"], "--limit takes a number of rows >= 0"),
    (["runs", "--limit", "99999999999999999999"], "--limit takes a number of rows >= 0"),
    (["dispatch", "--limit", "99999999999999999999", "--dry-run"], "--limit must be at most"),
    (["status", "--watch", "--interval", "nan"], "--interval must be a number of seconds > 0"),
    (["status", "--watch", "--interval", "0"], "--interval must be a number of seconds > 0"),
    (["fetch", "Pong", "NA", "0", "--checkpoints", "inf"], "whole step counts, not 'inf'"),
    (["fetch", "Pong", "NA", "0", "--checkpoints", "128.7"], "whole step counts, not '128.7'"),
    (["fetch", "Pong", "NA", "0", "--checkpoints", "128,nan"], "whole step counts, not 'nan'"),
])
def test_bad_numbers_in_options_are_one_line(workspace: Path, capsys: pytest.CaptureFixture[str],
                                             args: list[str], message: str) -> None:
    from orchestrator.cli import run

    _queued_run(capsys)
    before = _states(capsys)
    assert run(args) == 2
    assert message in _one_line(capsys.readouterr().err)
    assert _states(capsys) == before


def test_requeue_with_an_unknown_backend_changes_nothing(
        workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from orchestrator.cli import run

    _queued_run(capsys)
    assert run(["cancel", "Pong/NA/0"]) == 0
    before = _states(capsys)
    assert before == [("cancelled", 2)]
    for args in (["requeue", "Pong/NA/0", "--backend", "bogus"],
                 ["requeue", "--backend", "slurmm"]):
        assert run(args) == 2
        assert "unknown backend" in _one_line(capsys.readouterr().err)
        assert _states(capsys) == before


def test_attention_refuses_an_output_folder_that_is_a_file(
        workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from orchestrator.cli import run

    (workspace / "afile").write_text("x")
    assert run(["attention", "Pong", "NA", "0", "--out", str(workspace / "afile")]) == 2
    assert "exists and is not a folder" in _one_line(capsys.readouterr().err)
    assert run(["attention", "Pong", "NA", "0", "--out", str(workspace / "afile" / "sub")]) == 2
    assert "is not a folder" in _one_line(capsys.readouterr().err)
    assert (workspace / "afile").read_text() == "x"


def test_requeue_checks_the_dispatch_config_of_the_backend_it_names(
        workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from orchestrator.cli import run
    from orchestrator.settings import settings

    _queued_run(capsys)
    assert run(["cancel", "Pong/NA/0"]) == 0
    before = _states(capsys)
    for toml, message in (("[slurm]\nwalltime_min = 0\n", "walltime_min must be > 0"),
                          ("[dispatch]\nmax_array = 0\n", "max_array")):
        (workspace / "satrl.toml").write_text(toml)
        settings.cache_clear()
        assert run(["requeue", "Pong/NA/0", "--backend", "slurm"]) == 2
        assert message in _one_line(capsys.readouterr().err)
        assert _states(capsys) == before


@pytest.mark.parametrize("command", [["runs"], ["status"], ["sync"], ["fetch", "--all"],
                                     ["cancel", "--all"], ["dispatch", "--dry-run"]])
def test_an_experiment_the_registry_does_not_hold_is_one_line(
        workspace: Path, capsys: pytest.CaptureFixture[str], command: list[str]) -> None:
    # A typo'd --experiment selected no runs and looked like an empty (or finished) study.
    from orchestrator.cli import run

    _queued_run(capsys)
    before = _states(capsys)
    assert run([*command, "--experiment", "mian"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "no experiment 'mian'" in line and "did you mean main" in line
    assert _states(capsys) == before
    # An empty name is refused too, never read as "no option" (the workspace's experiment).
    assert run([*command, "--experiment", ""]) == 2
    assert "experiment name '' is not valid" in _one_line(capsys.readouterr().err)
    assert _states(capsys) == before
    assert run([*command, "--experiment", "main"]) in (0, 1)  # the real name still works


def test_a_database_holding_tables_satrl_did_not_create_is_one_line(
        workspace: Path, database_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """On PostgreSQL this was a 130-line traceback (psycopg's DuplicateTable is a
    ProgrammingError); on SQLite it was one line already."""
    from sqlalchemy import create_engine, text

    from orchestrator.cli import run

    if database_url.startswith("sqlite:///"):
        Path(database_url.removeprefix("sqlite:///")).parent.mkdir(parents=True)
    engine = create_engine(database_url)
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE events (x INTEGER)"))
    engine.dispose()
    capsys.readouterr()
    assert run(["db", "upgrade"]) == 1
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("satrl: cannot use the registry at ") and "events" in line, line


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_role_without_write_rights_is_one_line_on_postgresql(
        workspace: Path, database_url: str, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A lab's read-only role (GRANT SELECT only): psycopg's InsufficientPrivilege."""
    import uuid

    from sqlalchemy import create_engine, make_url, text

    from orchestrator.cli import run
    from orchestrator.settings import settings

    assert run(["db", "upgrade"]) == 0
    role = f"satrl_ro_{uuid.uuid4().hex[:8]}"
    engine = create_engine(database_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(text(f"CREATE ROLE {role} LOGIN"))
        connection.execute(text(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}"))
    try:
        monkeypatch.setenv("SATRL_DATABASE_URL", make_url(database_url).set(
            username=role).render_as_string(hide_password=False))
        settings.cache_clear()
        capsys.readouterr()
        assert run(["queue", "--games", "Pong", "--attn", "NA", "--seeds", "1"]) == 1
        line = _one_line(capsys.readouterr().err)
        assert "cannot use the registry at " in line and "permission denied" in line, line
    finally:
        settings.cache_clear()
        with engine.connect() as connection:
            connection.execute(text(f"REASSIGN OWNED BY {role} TO postgres"))
            connection.execute(text(f"DROP OWNED BY {role}"))
            connection.execute(text(f"DROP ROLE {role}"))
        engine.dispose()


@pytest.mark.parametrize(("url", "expected"), [
    ("sqlite:///reg.db", "sqlite:///{ws}/reg.db"),
    ("sqlite:///db/reg.db?timeout=5", "sqlite:///{ws}/db/reg.db?timeout=5"),
    ("sqlite:////abs/reg.db", "sqlite:////abs/reg.db"),
    ("sqlite:///~/reg.db", "sqlite:///{home}/reg.db"),
    ("sqlite:///:memory:", "sqlite:///:memory:"),
])
def test_a_relative_sqlite_url_in_satrl_toml_is_the_workspaces_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str, expected: str) -> None:
    """Run from a subfolder, `sqlite:///reg.db` made a second, empty registry there."""
    from orchestrator.settings import load_settings

    (tmp_path / "satrl.toml").write_text(f'[registry]\nurl = "{url}"\n')
    deeper = tmp_path / "sub" / "deeper"
    deeper.mkdir(parents=True)
    for name in ("SATRL_HOME", "SATRL_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert load_settings(deeper).database_url == expected.format(ws=tmp_path.resolve(),
                                                                 home=tmp_path / "home")


def test_a_sqlite_uri_url_opens_the_file_and_makes_no_folder_here(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`sqlite:///file:/x/satrl.db?uri=true` created ./file:/x/ in the current folder."""
    from orchestrator.cli import run
    from orchestrator.settings import settings

    database = tmp_path / "reg" / "satrl.db"
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    monkeypatch.setenv("SATRL_HOME", str(here))
    for url in (f"sqlite:///{database}", f"sqlite:///file:{database}?uri=true"):
        monkeypatch.setenv("SATRL_DATABASE_URL", url)
        settings.cache_clear()
        assert run(["queue", "--games", "Pong", "--attn", "NA", "--seeds", "1"]) == 0
    settings.cache_clear()
    assert "already recorded" in capsys.readouterr().out  # the same registry, twice
    assert not (here / "file:").exists()
