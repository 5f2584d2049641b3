"""The local backend end to end with the real worker: dispatch --wait, a killed worker, a killed
runner (lost, auto-requeued), cancel and logs. On SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from agents.rundir import read_json
from orchestrator.schedulers.procs import is_alive
from tests.dispatch_support import (
    LONGER,
    TINY,
    assert_complete,
    checkpoints,
    cli,
    configure,
    show,
    states,
    wait_for,
)

pytestmark = pytest.mark.slow


def _member(run_dir: Path, capsys: pytest.CaptureFixture[str], ref: str) -> tuple[Path, dict]:
    """The local runner's record of the run's newest job."""
    job = show(capsys, ref)["jobs"][-1]
    token, index = job["job_id"].rstrip("]").split("[")
    folder = run_dir.parents[4] / "runs" / ".batches" / token
    return folder, read_json(folder / "members" / f"{index}.json") or {}


def test_local_dispatch_wait_runs_a_study_to_completion(workspace: Path,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    configure(workspace, "[local]\nmax_parallel = 2\n")
    code, _, err = cli(capsys, "queue", "--games", "Pong,Breakout", "--attn", "NA,CWCA",
                       "--seed-list", "0", *TINY)
    assert code == 0, err
    code, out, err = cli(capsys, "dispatch", "--dry-run")
    assert code == 0 and "orchestrator.schedulers.local_runner" in out
    assert "INDEX=${SATRL_ARRAY_INDEX:-0}" in out and "agents.train" in out
    assert not (workspace / "runs").exists()  # the dry run changed nothing
    assert set(states(capsys).values()) == {"queued"}
    code, out, err = cli(capsys, "dispatch", "--backend", "local", "--wait")
    assert code == 0, err + out
    assert "dispatched 4 run(s) to local" in out
    assert set(states(capsys).values()) == {"succeeded"}
    for ref in ("Pong/NA/0", "Pong/CWCA/0", "Breakout/NA/0", "Breakout/CWCA/0"):
        data = show(capsys, ref)
        assert_complete(Path(data["run_dir"]), 256)
        assert [j["reason"] for j in data["jobs"]] == ["done"]
        assert data["jobs"][0]["exit_status"] == 0 and data["jobs"][0]["node"]
        assert [e["to"] for e in data["events"]][:2] == ["queued", "submitted"]
        assert data["events"][-1]["to"] == "succeeded"
    # Nothing queued is left: a second dispatch submits nothing.
    assert cli(capsys, "dispatch")[1].startswith("no queued runs match")
    code, out, _ = cli(capsys, "logs", "Pong/NA/0", "--stream", "out", "--tail", "1")
    assert code == 0 and out.strip() == "satrl worker: exit 0 (done): trained 256 of 256 steps"
    assert cli(capsys, "logs", "Pong/NA/0", "--attempt", "2")[0] == 2


def test_local_killed_worker_fails_then_requeue_and_lost_runner_resume(
        workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    configure(workspace, "[local]\nmax_parallel = 1\n",
              dispatch="auto_requeue = true\nlost_grace_s = 3")
    assert cli(capsys, "queue", "--games", "Pong", "--attn", "CWRA", "--seed-list", "1",
               *LONGER)[0] == 0
    assert cli(capsys, "dispatch")[0] == 0
    run_dir = Path(show(capsys, "Pong/CWRA/1")["run_dir"])
    wait_for(lambda: checkpoints(run_dir), 240, "a first checkpoint")
    _, record = _member(run_dir, capsys, "Pong/CWRA/1")
    os.kill(record["pid"], signal.SIGKILL)  # the worker dies without a word
    wait_for(lambda: states(capsys)["Pong/CWRA/1"] == "failed", 60, "the run to fail")
    job = show(capsys, "Pong/CWRA/1")["jobs"][-1]
    assert job["reason"] == "signal" and job["exit_status"] == 128 + signal.SIGKILL
    assert not (run_dir / "exit.json").exists()

    code, out, err = cli(capsys, "requeue", "--failed", "Pong/CWRA/1")
    assert code == 0 and "requeued 1 run(s); dispatched 1" in out, err
    wait_for(lambda: (run_dir / "logs" / "attempt-2.out").exists()
             and len(checkpoints(run_dir)) >= 2, 240, "attempt 2 to checkpoint")
    folder, record = _member(run_dir, capsys, "Pong/CWRA/1")
    runner = read_json(folder / "runner.json")
    # The whole batch dies: runner and worker. Nothing records an end: lost after the grace,
    # then auto-requeued (attempt 3 of at most 3), and it finishes from its checkpoint.
    os.kill(runner["pid"], signal.SIGKILL)
    os.killpg(record["pid"], signal.SIGKILL)
    wait_for(lambda: not is_alive(record["pid"], record["start_ticks"]), 30, "the worker to die")
    final = wait_for(lambda: states(capsys)["Pong/CWRA/1"] in ("succeeded", "failed"), 300,
                     "the run to end after auto-requeue", interval_s=1.0)
    assert final
    data = show(capsys, "Pong/CWRA/1")
    assert data["state"] == "succeeded", json.dumps(data["events"], indent=1, default=str)
    assert [j["reason"] for j in data["jobs"]] == ["signal", "lost", "done"]
    assert data["attempts"] == 3
    whys = [e["why"] for e in data["events"]]
    assert any("requeued by the user" in w for w in whys)
    assert any("auto-requeue" in w for w in whys)
    assert any("has not listed the job" in w for w in whys)
    assert_complete(run_dir, 1536, attempts=3)
    resumed = [a["resumed_from_step"] for a in read_json(run_dir / "provenance.json")["attempts"]]
    assert resumed[0] is None and resumed[1] > 0 and resumed[2] >= resumed[1]


def test_local_cancel_stops_running_and_queued_members(workspace: Path,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    configure(workspace, "[local]\nmax_parallel = 1\n")
    assert cli(capsys, "queue", "--games", "Pong", "--attn", "NA,SWA", "--seed-list", "3",
               *LONGER)[0] == 0
    assert cli(capsys, "dispatch")[0] == 0
    first = Path(show(capsys, "Pong/NA/3")["run_dir"])
    wait_for(lambda: (first / "status.json").exists(), 120, "the first worker to start")
    assert cli(capsys, "cancel")[0] == 2  # no filter: refused
    code, out, _ = cli(capsys, "cancel", "--dry-run", "--all")
    assert code == 0 and "would cancel 2 run(s)" in out
    assert set(states(capsys).values()) <= {"submitted", "running"}
    code, out, err = cli(capsys, "cancel", "--all")
    assert code == 0 and "cancelled 2 run(s) (2 scheduler job(s))" in out, err
    assert set(states(capsys).values()) == {"cancelled"}
    exit_info = wait_for(lambda: read_json(first / "exit.json"), 60, "the worker's exit.json")
    assert exit_info["reason"] == "signal"
    folder, _ = _member(first, capsys, "Pong/NA/3")
    wait_for(lambda: read_json(folder / "members" / "1.json"), 10, "the runner's record")
    assert read_json(folder / "members" / "1.json")["cancelled"] is True
    assert not (folder.parents[1] / "main" / "Pong" / "SWA" / "3" / "status.json").exists()
    assert [j["reason"] for j in show(capsys, "Pong/SWA/3")["jobs"]] == ["cancelled"]
