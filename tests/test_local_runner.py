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


def test_a_member_within_its_walltime_ends_as_it_does(tmp_path: Path) -> None:
    folder = tmp_path / "batches" / "satrl-ffffffffff"
    _run_batch(folder, "exit 3", walltime_s=30.0, kill_wait_s=1.0)
    record = json.loads(member_path(folder, 0).read_text())
    assert "timed_out" not in record and record["exit_code"] == 3
    status = LocalScheduler({}, tmp_path / "batches").status(f"{folder.name}[0]")
    assert status is not None and status.state == JobState.FAILED
