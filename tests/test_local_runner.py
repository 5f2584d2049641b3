"""The local backend's runner enforces a batch's walltime as Slurm does: SIGTERM, then SIGKILL."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.schedulers.base import JobState
from orchestrator.schedulers.local import LocalScheduler
from orchestrator.schedulers.local_runner import member_path


def _run_batch(folder: Path, job: str, walltime_s: float, kill_wait_s: float) -> float:
    """Run a one-member batch whose job script is `job` to its end; returns the seconds taken."""
    folder.mkdir(parents=True)
    (folder / "job.sh").write_text(f"#!/bin/bash\n{job}\n")
    (folder / "batch.json").write_text(json.dumps({
        "token": folder.name, "count": 1, "max_parallel": 1, "walltime_s": walltime_s,
        "kill_wait_s": kill_wait_s}))
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "orchestrator.schedulers.local_runner", str(folder)],
                   check=True, timeout=60)
    return time.monotonic() - start


@pytest.mark.parametrize(("job", "exit_code"), [
    ("exec sleep 30", 128 + 15),                     # ends on SIGTERM
    ("trap '' TERM\nsleep 30 & wait $!\nsleep 30", 128 + 9),  # ignores it: SIGKILL follows
])
def test_a_member_past_its_walltime_is_terminated_then_killed(tmp_path: Path, job: str,
                                                              exit_code: int) -> None:
    folder = tmp_path / "batches" / "satrl-eeeeeeeeee"
    taken = _run_batch(folder, job, walltime_s=1.0, kill_wait_s=1.0)
    assert taken < 15
    record = json.loads(member_path(folder, 0).read_text())
    assert record["timed_out"] is True and record["exit_code"] == exit_code
    status = LocalScheduler({}, tmp_path / "batches").status(f"{folder.name}[0]")
    assert status is not None and status.state == JobState.TIMEOUT
    assert status.exit_status == exit_code


def test_a_cancelled_member_that_ignores_sigterm_is_killed_kill_wait_s_later(
        tmp_path: Path) -> None:
    """satrl cancel of a hung worker said 'cancelled' while it kept its slot for good."""
    folder = tmp_path / "batches" / "satrl-dddddddddd"
    folder.mkdir(parents=True)
    (folder / "job.sh").write_text("#!/bin/bash\ntrap '' TERM\nsleep 60 & wait $!\nsleep 60\n")
    (folder / "batch.json").write_text(json.dumps({
        "token": folder.name, "count": 1, "max_parallel": 1, "walltime_s": 0,
        "kill_wait_s": 1.0}))
    start = time.monotonic()
    runner = subprocess.Popen([sys.executable, "-m", "orchestrator.schedulers.local_runner",
                               str(folder)])
    try:
        scheduler = LocalScheduler({}, tmp_path / "batches")
        job_id = f"{folder.name}[0]"
        deadline = time.monotonic() + 20
        while not (member_path(folder, 0).exists() and "pid" in json.loads(
                member_path(folder, 0).read_text())):
            assert time.monotonic() < deadline, "the member never started"
            time.sleep(0.1)
        scheduler.cancel([job_id])
        assert runner.wait(timeout=30) == 0
    finally:
        runner.kill()
    assert time.monotonic() - start < 20  # not the job's 60 s
    record = json.loads(member_path(folder, 0).read_text())
    assert record["cancelled"] is True and record["exit_code"] == 128 + 9
    status = scheduler.status(job_id)
    assert status is not None and status.state == JobState.CANCELLED


def test_a_member_within_its_walltime_ends_as_it_does(tmp_path: Path) -> None:
    folder = tmp_path / "batches" / "satrl-ffffffffff"
    _run_batch(folder, "exit 3", walltime_s=30.0, kill_wait_s=1.0)
    record = json.loads(member_path(folder, 0).read_text())
    assert "timed_out" not in record and record["exit_code"] == 3
    status = LocalScheduler({}, tmp_path / "batches").status(f"{folder.name}[0]")
    assert status is not None and status.state == JobState.FAILED


def _records(tmp_path: Path, token: str, members: dict[int, dict], count: object = 2) -> Path:
    """A batch folder as a runner that has died leaves it, with these member records."""
    folder = tmp_path / "batches" / token
    (folder / "members").mkdir(parents=True)
    (folder / "batch.json").write_text(json.dumps({"token": token, "count": count,
                                                   "max_parallel": 1}))
    (folder / "runner.json").write_text(json.dumps({"pid": 2**22 + 7, "start_ticks": 1}))
    for index, record in members.items():
        member_path(folder, index).write_text(json.dumps(record))
    return folder


@pytest.mark.parametrize("bad", ["x", 1.5, True, [0]])
def test_a_malformed_member_record_is_listed_unreadable_and_the_others_are_read(
        tmp_path: Path, bad: object) -> None:
    token = "satrl-1212121212"
    _records(tmp_path, token, {0: {"index": 0, "pid": 1, "exit_code": bad},
                               1: {"index": 1, "pid": 1, "exit_code": 0}})
    scheduler = LocalScheduler({}, tmp_path / "batches")
    reply = scheduler.poll([f"{token}[0]", f"{token}[1]"])
    assert list(reply.jobs) == [f"{token}[1]"]
    assert reply.jobs[f"{token}[1]"].state == JobState.COMPLETED
    assert list(reply.unreadable) == [f"{token}[0]"]
    assert f"exit_code {bad!r} is not a whole number" in reply.unreadable[f"{token}[0]"]


def test_a_batch_record_with_a_malformed_count_keeps_its_batch_pending(tmp_path: Path) -> None:
    from orchestrator.errors import SchedulerError

    token = "satrl-1313131313"
    _records(tmp_path, token, {}, count="x")
    scheduler = LocalScheduler({}, tmp_path / "batches")
    # Not "not found" (which would queue runs whose runner started): an error recovery reports.
    with pytest.raises(SchedulerError, match="count 'x' is not a number of runs"):
        scheduler.find_by_names([token])


def test_the_runner_refuses_an_unreadable_batch_record_in_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "batches" / "satrl-1414141414"
    folder.mkdir(parents=True)
    (folder / "batch.json").write_text(json.dumps({"count": "x", "max_parallel": 1}))
    done = subprocess.run([sys.executable, "-m", "orchestrator.schedulers.local_runner",
                           str(folder)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"local runner: {folder}/batch.json is unreadable: invalid literal for int() with "
        "base 10: 'x'"]
    assert not (folder / "runner.json").exists()


def test_a_local_runner_whose_interpreter_cannot_be_started_submits_nothing(
        tmp_path: Path, workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sqlalchemy import select

    from orchestrator import dispatching
    from orchestrator.registry.db import Registry
    from orchestrator.registry.models import Job, Run
    from orchestrator.schedulers.base import CommandNotStarted
    from orchestrator.settings import settings
    from tests.test_dispatch_recovery import _planned, _queue_four

    run_ids = _queue_four(workspace, capsys)
    registry = Registry(settings().database_url)
    scheduler = LocalScheduler({}, tmp_path / "batches", str(tmp_path / "no-such-python"))
    with pytest.raises(CommandNotStarted, match="nothing was submitted: 4 run"):
        dispatching.submit_batch(registry, scheduler, _planned(run_ids, "satrl-1515151515",
                                                               tmp_path))
    with registry.session() as session:
        assert set(session.scalars(select(Run.state))) == {"queued"}
        assert list(session.scalars(select(Job))) == []
    registry.dispose()
