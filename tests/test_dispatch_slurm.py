"""A real single-node Slurm (tests/fixtures/slurm.py) end to end with the real worker: a study
dispatched and finished, scancel -> cancelled -> requeue finishes from its checkpoint, a walltime
stop auto-requeued, and crash safety of dispatch. On SQLite and PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agents.rundir import read_json
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
from tests.fixtures.slurm import SlurmCluster

pytestmark = pytest.mark.slow

TOML = "[slurm]\npoll_interval_s = 0\nwalltime_min = 10\ncpus = 1\n"


def _backend_slurm(workspace: Path, toml: str = TOML, dispatch: str = "") -> None:
    configure(workspace, toml, dispatch=f'backend = "slurm"\n{dispatch}')


def test_slurm_study_runs_to_completion(slurm_cluster: SlurmCluster, workspace: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    _backend_slurm(workspace)
    assert cli(capsys, "queue", "--games", "Pong,Breakout", "--attn", "NA,CWCA", "--seed-list",
               "0", *TINY)[0] == 0
    before = slurm_cluster.squeue()
    code, out, _ = cli(capsys, "dispatch", "--dry-run")
    assert code == 0 and "sbatch --parsable --job-name=satrl-" in out
    assert "--array=0-3" in out and "--signal=B:USR1@30" in out and "--time=00:10:00" in out
    assert slurm_cluster.squeue() == before  # a dry run submits nothing
    code, out, err = cli(capsys, "dispatch", "--wait")
    assert code == 0, out + err
    assert "dispatched 4 run(s) to slurm" in out
    assert set(states(capsys).values()) == {"succeeded"}
    ours = [job for job in slurm_cluster.squeue() if job not in before]
    assert len(ours) == 4 and len({name for _, name, _ in ours}) == 1  # one array
    # exit.json is written just before the worker exits: Slurm says COMPLETED a moment later.
    wait_for(lambda: {j[2] for j in slurm_cluster.squeue() if j[0] in {o[0] for o in ours}}
             == {"COMPLETED"}, 30, "Slurm to list the jobs as COMPLETED")
    for ref in ("Pong/NA/0", "Pong/CWCA/0", "Breakout/NA/0", "Breakout/CWCA/0"):
        data = show(capsys, ref)
        assert_complete(Path(data["run_dir"]), 256)
        job = data["jobs"][0]
        assert job["reason"] == "done" and job["backend"] == "slurm"
        assert job["job_id"].split("_")[1].isdigit() and job["node"] == "localhost"
        provenance = read_json(Path(data["run_dir"]) / "provenance.json")["attempts"][0]
        assert provenance["scheduler_job_id"]  # the worker ran inside a Slurm job


def test_slurm_scancel_is_cancelled_and_requeue_resumes(slurm_cluster: SlurmCluster,
                                                        workspace: Path,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    _backend_slurm(workspace)
    assert cli(capsys, "queue", "--games", "Pong", "--attn", "SWA", "--seed-list", "5",
               *LONGER)[0] == 0
    assert cli(capsys, "dispatch")[0] == 0
    data = show(capsys, "Pong/SWA/5")
    run_dir, job_id = Path(data["run_dir"]), data["jobs"][0]["job_id"]
    wait_for(lambda: checkpoints(run_dir), 240, "a first checkpoint")
    assert states(capsys)["Pong/SWA/5"] == "running"
    slurm_cluster.run("scancel", job_id)  # the user's own scancel, not satrl's
    wait_for(lambda: read_json(run_dir / "exit.json"), 60, "the worker's exit.json")
    assert read_json(run_dir / "exit.json")["reason"] == "signal"
    wait_for(lambda: states(capsys)["Pong/SWA/5"] == "cancelled", 60, "cancelled")
    job = show(capsys, "Pong/SWA/5")["jobs"][0]
    assert job["reason"] == "cancelled" and job["state"] == "CANCELLED"
    step = read_json(run_dir / "exit.json")["timesteps"]
    assert step > 0

    code, out, err = cli(capsys, "requeue", "--cancelled", "Pong/SWA/5")
    assert code == 0 and "dispatched 1" in out, err
    assert (run_dir / "logs" / "exit-attempt-1.json").is_file()  # the old exit.json, kept
    wait_for(lambda: states(capsys)["Pong/SWA/5"] == "succeeded", 300, "the requeued run",
             interval_s=1.0)
    assert_complete(run_dir, 1536, attempts=2)
    attempts = read_json(run_dir / "provenance.json")["attempts"]
    assert attempts[1]["resumed_from_step"] == step
    data = show(capsys, "Pong/SWA/5")
    assert [j["reason"] for j in data["jobs"]] == ["cancelled", "done"]
    assert data["jobs"][1]["job_id"] != job_id


def test_slurm_walltime_stop_is_requeued_automatically(slurm_cluster: SlurmCluster,
                                                       workspace: Path,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    # One minute of walltime and a 57 s margin: the worker stops ~3 s in (SATRL_DEADLINE or
    # Slurm's USR1, whichever first), checkpoints what it has and exits with reason walltime.
    short = TOML.replace("walltime_min = 10", "walltime_min = 1")
    _backend_slurm(workspace, short, dispatch="auto_requeue = true\nmax_attempts = 3")
    assert cli(capsys, "queue", "--games", "Pong", "--attn", "CWCA", "--seed-list", "7",
               *LONGER, "--set", "deadline_margin_s=57")[0] == 0
    code, out, _ = cli(capsys, "dispatch", "--dry-run", "--json")
    assert "--signal=B:USR1@57" in out and "--time=00:01:00" in out
    assert cli(capsys, "dispatch")[0] == 0
    run_dir = Path(show(capsys, "Pong/CWCA/7")["run_dir"])
    wait_for(lambda: read_json(run_dir / "exit.json"), 120, "the first attempt's exit.json")
    assert read_json(run_dir / "exit.json")["reason"] == "walltime"
    # Later attempts get a longer limit (an operator raising walltime_min in satrl.toml).
    _backend_slurm(workspace, TOML, dispatch="auto_requeue = true\nmax_attempts = 3")
    wait_for(lambda: states(capsys)["Pong/CWCA/7"] == "succeeded", 300, "the auto-requeued run",
             interval_s=1.0)
    data = show(capsys, "Pong/CWCA/7")
    assert [j["reason"] for j in data["jobs"]] == ["walltime", "done"]
    assert data["jobs"][0]["exit_status"] == 75
    assert any("auto-requeue" in e["why"] for e in data["events"])
    assert [e["to"] for e in data["events"]].count("queued") == 2
    assert_complete(run_dir, 1536, attempts=2)


def test_slurm_dispatch_killed_after_sbatch_submits_each_run_once(
        slurm_cluster: SlurmCluster, workspace: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    _backend_slurm(workspace)
    assert cli(capsys, "queue", "--games", "Pong", "--attn", "NA,CWRCA", "--seed-list", "9",
               *LONGER)[0] == 0
    # An sbatch that kills its caller (satrl dispatch) right after the real sbatch printed the id.
    wrapper_dir = tmp_path / "bin"
    wrapper_dir.mkdir()
    real = subprocess.run(["which", "sbatch"], capture_output=True, text=True).stdout.strip()
    (wrapper_dir / "sbatch").write_text(
        f'#!/bin/bash\nout=$({real} "$@") || exit $?\necho "$out"\n'
        f'echo "$out" > {tmp_path}/sbatch.out\nkill -9 $PPID\n')
    (wrapper_dir / "sbatch").chmod(0o755)
    env = dict(os.environ, PATH=f"{wrapper_dir}:{os.environ['PATH']}")
    satrl = [sys.executable, "-c", "from orchestrator.cli import main; main()"]
    crashed = subprocess.run([*satrl, "dispatch"], env=env, capture_output=True, text=True,
                             timeout=120)
    assert crashed.returncode == -9, crashed.stderr
    array_id = (tmp_path / "sbatch.out").read_text().strip()
    submitted = [j for j in slurm_cluster.squeue() if j[0].split("_")[0] == array_id]
    assert len(submitted) == 2
    jobs = [show(capsys, ref)["jobs"] for ref in ("Pong/NA/9", "Pong/CWRCA/9")]
    assert all(len(j) == 1 and j[0]["job_id"] is None for j in jobs)  # the ids never recorded

    again = subprocess.run([*satrl, "dispatch"], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert "recovered 2 run(s)" in again.stdout and "no queued runs match" in again.stdout
    ours = [j for j in slurm_cluster.squeue() if j[1] == submitted[0][1]]
    assert sorted(j[0] for j in ours) == sorted(j[0] for j in submitted)  # one job per run
    assert len(slurm_cluster.squeue()) == len({j[0] for j in slurm_cluster.squeue()})
    recorded = sorted(show(capsys, ref)["jobs"][0]["job_id"]
                      for ref in ("Pong/NA/9", "Pong/CWRCA/9"))
    assert recorded == sorted(j[0] for j in submitted)
    code, out, _ = cli(capsys, "cancel", "--all")
    assert code == 0 and "cancelled 2 run(s) (2 scheduler job(s))" in out
