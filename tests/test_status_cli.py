"""status, runs and show over a queued study."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from orchestrator.cli import run


def _json(capsys: pytest.CaptureFixture[str], *args: str) -> object:
    capsys.readouterr()
    assert run([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_status_counts_grid_and_json(workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["queue", "--games", "Pong,Breakout", "--attn", "NA,CWCA", "--seeds", "2"]) == 0
    assert run(["queue", "--games", "Pong", "--attn", "SWA", "--seeds", "1", "-e", "other"]) == 0
    status = _json(capsys, "status")
    assert status["total"] == 9 and status["counts"]["queued"] == 9
    assert status["counts"]["succeeded"] == 0
    assert {name: part["total"] for name, part in status["experiments"].items()} == {
        "main": 8, "other": 1}
    assert status["experiments"]["other"]["counts"]["queued"] == 1
    first = status["runs"][0]
    assert {"id", "experiment", "game", "attn", "seed", "state"} <= set(first)
    filtered = _json(capsys, "status", "--experiment", "main", "--game", "Pong")
    assert filtered["total"] == 4
    assert {(r["game"], r["attn"], r["seed"]) for r in filtered["runs"]} == {
        ("Pong", "NA", 0), ("Pong", "NA", 1), ("Pong", "CWCA", 0), ("Pong", "CWCA", 1)}
    assert _json(capsys, "status", "--state", "running")["total"] == 0
    capsys.readouterr()
    assert run(["status"]) == 0
    out = capsys.readouterr().out
    assert "2 experiments, 9 runs" in out and "Breakout" in out and "CWCA" in out
    # One grid per experiment: other's Pong/SWA run is not pooled into main's grid.
    main_block, other_block = out.split("experiment main: 8 runs")[1].split(
        "experiment other: 1 run ")
    assert "0/2" in main_block and "SWA" not in main_block and "Breakout" in main_block
    assert "SWA" in other_block and "0/1" in other_block and "Breakout" not in other_block
    assert run(["status", "-e", "main"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("8 runs") and "experiment" not in out and "SWA" not in out
    assert run(["status", "--state", "runing"]) == 2
    assert "did you mean running" in capsys.readouterr().err


def test_watch_into_a_pipe_prints_one_snapshot_per_round(
        workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """rich's Live shows nothing on a non-terminal until it stops: a log needs snapshots."""
    assert run(["queue", "--games", "Pong", "--attn", "NA", "--seeds", "1"]) == 0
    watcher = subprocess.Popen([sys.executable, "-m", "orchestrator", "status", "--watch",
                                "--interval", "0.2", "--no-sync"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # A watcher that prints nothing would block readline: killed, it ends the lines instead.
    deadline = threading.Timer(30, watcher.kill)
    deadline.start()
    try:
        lines = [watcher.stdout.readline() for _ in range(8)]  # type: ignore[union-attr]
    finally:
        deadline.cancel()
        watcher.kill()
        watcher.wait()
    snapshots = [i for i, line in enumerate(lines) if line.startswith("1 run ")]
    assert len(snapshots) == 2, lines  # two rounds: date, counts, grid header, Pong, blank
    assert lines[snapshots[0] + 2].split() == ["Pong", "0/1"]


def test_runs_and_show(workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["queue", "--games", "Pong", "--attn", "CWCA", "--seed-list", "42"]) == 0
    listed = _json(capsys, "runs")
    assert len(listed) == 1 and listed[0]["game"] == "Pong"
    shown = _json(capsys, "show", "Pong/CWCA/42")
    assert shown["spec"]["seed"] == 42 and shown["state"] == "queued"
    assert shown["events"][0]["to"] == "queued"
    assert _json(capsys, "show", str(listed[0]["id"]))["id"] == listed[0]["id"]
    capsys.readouterr()
    assert run(["show", "Pong/CWCA/7"]) == 2
    assert "no run Pong/CWCA/7" in capsys.readouterr().err
    assert run(["show", "Pong/XX/42"]) == 2
    assert run(["show", "nonsense"]) == 2


def test_runs_json_lists_every_run_and_the_table_says_when_it_stops_short(
        workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--json stopped at the table's 200 rows without a word to the script reading it."""
    assert run(["queue", "--games", "all", "--attn", "all", "--seeds", "1"]) == 0
    assert len(_json(capsys, "runs")) == 280  # type: ignore[arg-type]
    assert len(_json(capsys, "runs", "--limit", "7")) == 7  # type: ignore[arg-type]
    for limit, note in ((None, "(first 200; --limit 0 lists all)"), ("279", "(first 279;"),
                        ("280", None), ("0", None)):
        capsys.readouterr()
        assert run(["runs", *(["--limit", limit] if limit else [])]) == 0
        out = capsys.readouterr().out
        assert (note in out) if note else "--limit 0 lists all" not in out, (limit, out[-200:])


def test_help_is_fast_because_it_imports_neither_torch_nor_sqlalchemy() -> None:
    code = ("import sys\nfrom orchestrator.cli import run\nrc = run(['--help'])\n"
            "print(rc, 'torch' in sys.modules, 'sqlalchemy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip().splitlines()[-1] == "0 False False"
