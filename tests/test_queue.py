"""`satrl queue`: the cross product recorded once, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from orchestrator import catalog
from orchestrator.cli import run
from orchestrator.registry.db import Registry
from orchestrator.registry.models import Event, Experiment, Run


def _count(url: str, model: type = Run) -> int:
    registry = Registry(url)
    with registry.session() as session:
        count = session.scalar(select(func.count()).select_from(model))
    registry.dispose()
    return int(count or 0)


def _queue_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    capsys.readouterr()
    assert run(["queue", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_full_grid_is_recorded_once(workspace: Path, database_url: str,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    first = _queue_json(capsys, "--games", "all", "--attn", "all", "--seeds", "5")
    assert (first["requested"], first["added"], first["existing"]) == (1400, 1400, 0)
    assert _count(database_url) == 1400
    assert _count(database_url, Event) == 1400
    second = _queue_json(capsys, "--games", "all", "--attn", "all", "--seeds", "5")
    assert (second["added"], second["existing"]) == (0, 1400)
    assert _count(database_url) == 1400
    # the human form says so too
    assert run(["queue", "--games", "all", "--attn", "all", "--seeds", "5"]) == 0
    assert "nothing to add" in capsys.readouterr().out


def test_runs_store_their_resolved_spec_and_hash(workspace: Path, database_url: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from agents.spec import RunSpec

    _queue_json(capsys, "--games", "Pong", "--attn", "CWCA", "--seed-list", "42",
                "--set", "total_timesteps=2e6", "--set", "n_envs=8", "-e", "short")
    registry = Registry(database_url)
    with registry.session() as session:
        stored = session.scalars(select(Run)).one()
        spec = RunSpec.from_dict(stored.spec)
        experiment = session.scalars(select(Experiment)).one()
        assert (spec.game, spec.attn, spec.seed, spec.experiment) == ("Pong", "CWCA", 42, "short")
        assert (spec.total_timesteps, spec.n_envs) == (2_000_000, 8)
        assert stored.spec_hash == spec.spec_hash()
        assert (experiment.name, experiment.preset) == ("short", "paper")
        assert experiment.overrides == {"total_timesteps": 2_000_000, "n_envs": 8}
    registry.dispose()


def test_same_key_with_another_spec_is_refused_naming_both_hashes(
        workspace: Path, database_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    _queue_json(capsys, "--games", "Pong", "--attn", "NA", "--seeds", "1", "-e", "x",
                "--preset", "smoke")
    registry = Registry(database_url)
    with registry.write() as session:
        # The stored spec of one run no longer matches what queueing it again would produce.
        stored = session.scalars(select(Run)).one()
        stored.spec_hash = "f" * 64
    registry.dispose()
    capsys.readouterr()
    assert run(["queue", "--games", "Pong,Breakout", "--attn", "NA", "--seeds", "1", "-e", "x",
                "--preset", "smoke"]) == 3
    err = capsys.readouterr().err
    assert "ffffffffffff" in err and "Pong/NA/0" in err
    assert _count(database_url) == 1  # Breakout was not added: the transaction rolled back


def test_other_settings_in_an_existing_experiment_are_refused(
        workspace: Path, database_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    _queue_json(capsys, "--games", "Pong", "--attn", "NA", "--seeds", "1")
    capsys.readouterr()
    for dry_run in (["--dry-run"], []):  # a dry run refuses what the real queue refuses
        assert run(["queue", "--games", "Pong", "--attn", "NA", "--seeds", "1",
                    "--set", "ent_coef=0.02", *dry_run]) == 3
        err = capsys.readouterr().err
        assert "another --experiment" in err and len(err.strip().splitlines()) == 1
        assert "(spec " in err  # both base specs' hashes are named
    assert run(["queue", "--games", "Breakout", "--attn", "NA", "--seeds", "1",
                "--preset", "smoke", "--dry-run"]) == 3
    assert _count(database_url) == 1


def test_the_same_science_in_other_words_joins_an_existing_experiment(
        workspace: Path, database_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    _queue_json(capsys, "--games", "Pong", "--attn", "NA", "--seeds", "1", "--preset", "smoke")
    # The preset's own value, and an execution field (not in the spec hash), add runs.
    same = _queue_json(capsys, "--games", "Breakout", "--attn", "NA", "--seeds", "1",
                       "--preset", "smoke", "--set", "engine=sb3")
    execution = _queue_json(capsys, "--games", "Qbert", "--attn", "NA", "--seeds", "1",
                            "--preset", "smoke", "--set", "checkpoint_every_steps=2048")
    assert (same["added"], execution["added"]) == (1, 1)
    assert _count(database_url) == 3
    assert same["kept"] == execution["kept"] == {}  # nothing recorded was asked for again
    # Runs already recorded keep their execution settings, and the command says so.
    again = _queue_json(capsys, "--games", "Pong,Qbert", "--attn", "NA", "--seeds", "1",
                        "--preset", "smoke", "--set", "checkpoint_every_steps=4096")
    smoke = catalog.preset("smoke").checkpoint_every_steps
    assert again["added"] == 0 and again["kept"] == {"checkpoint_every_steps": [smoke, 2048]}
    capsys.readouterr()
    assert run(["queue", "--games", "Pong", "--attn", "NA", "--seeds", "1", "--preset", "smoke",
                "--set", "checkpoint_every_steps=4096"]) == 0
    assert capsys.readouterr().err.strip() == (
        f"note: the runs already recorded keep their own checkpoint_every_steps {smoke}; only "
        "runs added now take this command's settings")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--games", "Pongg", "--attn", "all"], "did you mean Pong"),
        (["--games", "all", "--attn", "CWAC"], "did you mean CWCA"),
        (["--games", "axis:vertcal", "--attn", "NA"], "did you mean vertical"),
        (["--games", "Pong", "--attn", "NA", "--set", "n_env=8"], "did you mean n_envs"),
        (["--games", "Pong", "--attn", "NA", "--set", "n_envs=0"], "n_envs must be >= 1"),
        (["--games", "Pong", "--attn", "NA", "--set", "seed=3"], "cannot change seed"),
        (["--games", "Pong", "--attn", "NA", "--preset", "papr"], "did you mean paper"),
        (["--games", "Pong", "--attn", "NA", "--seeds", "9"], "1..5"),
        # Experiment names become folders under scratch and the store.
        (["--games", "Pong", "--attn", "NA", "-e", "../../escaped"], "not valid"),
        (["--games", "Pong", "--attn", "NA", "-e", "/tmp/abs"], "not valid"),
        (["--games", "Pong", "--attn", "NA", "-e", "[/x]"], "not valid"),
        (["--games", "Pong", "--attn", "NA", "-e", "x@LAUNCH@y"], "not valid"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
        workspace: Path, database_url: str, capsys: pytest.CaptureFixture[str],
        args: list[str], message: str) -> None:
    capsys.readouterr()
    assert run(["queue", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert _count(database_url) == 0


def test_dry_run_writes_nothing(workspace: Path, database_url: str,
                                capsys: pytest.CaptureFixture[str]) -> None:
    result = _queue_json(capsys, "--games", "axis:horizontal", "--attn", "all", "--seeds", "2",
                         "--dry-run")
    assert (result["requested"], result["added"], result["dry_run"]) == (120, 120, True)
    assert _count(database_url) == 0


QUEUE_BEHIND_BARRIER = """
import json, os, sys, time
from pathlib import Path
ready, go = Path(sys.argv[1]), Path(sys.argv[2])
ready.touch()
while not go.exists():
    time.sleep(0.005)
from orchestrator.cli import run
sys.exit(run(["queue", "--games", "all", "--attn", "all", "--seeds", "5", "--json"]))
"""


def test_two_processes_queueing_together_add_each_run_once(
        workspace: Path, database_url: str, tmp_path: Path) -> None:
    # A fresh workspace: both processes also race to create the schema.
    go = tmp_path / "go"
    procs, readies = [], []
    for i in range(2):
        ready = tmp_path / f"ready{i}"
        readies.append(ready)
        procs.append(subprocess.Popen(
            [sys.executable, "-c", QUEUE_BEHIND_BARRIER, str(ready), str(go)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy()))
    deadline = time.monotonic() + 60
    while not all(r.exists() for r in readies):
        assert time.monotonic() < deadline, "workers did not start"
        time.sleep(0.01)
    go.touch()
    added = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        added.append(json.loads(out)["added"])
    assert sum(added) == 1400
    assert _count(database_url) == 1400
    assert _count(database_url, Event) == 1400


@pytest.mark.parametrize("args", [["--set", "total_timesteps=abc"], ["--set", "n_env=8"],
                                  ["--set", "seed=3"], ["--preset", "papr"]])
def test_bad_spec_is_refused_before_the_registry_is_created(
        workspace: Path, database_url: str, capsys: pytest.CaptureFixture[str],
        args: list[str]) -> None:
    from orchestrator.registry.db import current_revision

    capsys.readouterr()
    assert run(["queue", "--games", "Pong", "--attn", "NA", *args]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    if database_url.startswith("sqlite"):
        assert not Path(database_url.removeprefix("sqlite:///")).parent.exists()
        return
    registry = Registry(database_url, upgrade=False)
    try:
        assert current_revision(registry.engine) is None  # no schema was made
    finally:
        registry.dispose()
