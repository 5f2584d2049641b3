"""The local backend: one detached runner process per batch, on this machine (local_runner.py).

Job ids are `<token>[<index>]`; the batch folder `<batches>/<token>/` holds the runner's records,
which `poll` reads: a member is pending until its record has a pid, running while that pid with
that start time lives, and ended with the exit code the runner recorded. A member whose runner
died without recording its end is not listed, so it becomes lost after the grace period.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from orchestrator.errors import SchedulerError
from orchestrator.schedulers.base import (
    Batch,
    CommandNotStarted,
    JobState,
    JobStatus,
    PollResult,
    Scheduler,
    Submission,
    config_number,
)
from orchestrator.schedulers.local_runner import (
    DEFAULT_KILL_WAIT_S,
    TICK_S,
    cancel_path,
    member_path,
)
from orchestrator.schedulers.procs import is_alive, read_json, write_json_atomic

_LOCAL_ID = re.compile(r"^(?P<token>[A-Za-z0-9_.-]+)\[(?P<index>\d+)\]$")
#: Seconds `submit` waits for the runner to announce itself.
RUNNER_START_TIMEOUT_S = 30.0
#: Runners this process started and has not reaped yet. A short-lived `satrl dispatch` leaves
#: them to init when it exits; a long `dispatch --wait` or `status --watch` reaps them as they
#: end (`poll`), or each would stay a zombie until satrl exits.
_STARTED_RUNNERS: list[subprocess.Popen[bytes]] = []


class UnreadableRecord(ValueError):
    """A runner's record of a member holding what no runner writes (a corrupt or edited file)."""


def reap_runners() -> int:
    """Collect the exit status of runners of this process that have ended; returns how many."""
    ended = [process for process in _STARTED_RUNNERS if process.poll() is not None]
    for process in ended:
        _STARTED_RUNNERS.remove(process)
    return len(ended)


class LocalScheduler(Scheduler):
    name = "local"
    index_variable = "SATRL_ARRAY_INDEX"
    default_poll_interval_s = 0.0  # reading a few local files costs nothing

    def __init__(self, config: dict | None = None, batches: Path | None = None,
                 python: str | None = None) -> None:
        super().__init__(config)
        self.batches = batches or Path(".satrl-batches")
        self.python = python or sys.executable

    def check_config(self) -> None:
        super().check_config()
        _ = self.max_parallel, self.kill_wait_s

    @property
    def max_parallel(self) -> int:
        return int(config_number(self.config, "max_parallel", 1, "satrl.toml [local]",
                                 minimum=1))

    @property
    def kill_wait_s(self) -> float:
        return float(config_number(self.config, "kill_wait_s", DEFAULT_KILL_WAIT_S,
                                   "satrl.toml [local]", kind=float, minimum=0))

    def submit_command(self, batch: Batch) -> list[str]:
        return [self.python, "-m", "orchestrator.schedulers.local_runner", str(batch.folder)]

    def submit(self, batch: Batch) -> Submission:
        self.write_script(batch)
        write_json_atomic(batch.folder / "batch.json", {
            "token": batch.token, "count": len(batch.members), "max_parallel": self.max_parallel,
            "walltime_s": batch.resources.walltime_s, "kill_wait_s": self.kill_wait_s,
        })
        with (batch.folder / "runner.log").open("ab") as log:
            try:
                process = subprocess.Popen(self.submit_command(batch),
                                           stdin=subprocess.DEVNULL, stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True,
                                           close_fds=True)
            except (FileNotFoundError, PermissionError) as error:
                # No runner started: nothing of the batch can run (dispatch releases it).
                raise CommandNotStarted(
                    f"the local runner's interpreter {self.python} cannot be started "
                    f"({error.strerror}); set [dispatch] python in satrl.toml",
                    command=self.submit_command(batch)) from None
        _STARTED_RUNNERS.append(process)
        # Submitted means the runner is up (its record exists), like a scheduler's accept.
        deadline = time.monotonic() + RUNNER_START_TIMEOUT_S
        while not (batch.folder / "runner.json").exists():
            if process.poll() is not None:
                raise SchedulerError(f"the local runner exited with code {process.returncode}"
                                     f"; see {batch.folder / 'runner.log'}",
                                     command=self.submit_command(batch),
                                     script=str(batch.script_path))
            if time.monotonic() > deadline:
                # Stop it, or it may announce itself after the claim was released and run
                # runs that are queued again (a second worker in the same run directory).
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                raise SchedulerError("the local runner did not start",
                                     command=self.submit_command(batch))
            time.sleep(0.05)
        return Submission(tuple(f"{batch.token}[{i}]" for i in range(len(batch.members))),
                          batch.token)

    def _folder(self, job_id: str) -> tuple[Path, int] | None:
        match = _LOCAL_ID.match(job_id)
        if match is None:
            return None
        return self.batches / match.group("token"), int(match.group("index"))

    def status(self, job_id: str) -> JobStatus | None:
        """One member's state from the runner's records (None: not known, e.g. runner died).

        UnreadableRecord where the member's record holds what no runner writes: the member is
        listed (its record exists) but its state cannot be told.
        """
        located = self._folder(job_id)
        if located is None:
            return None
        folder, index = located
        runner = read_json(folder / "runner.json")
        if runner is None:
            return None
        runner_alive = is_alive(runner.get("pid"), runner.get("start_ticks"))
        record = read_json(member_path(folder, index))
        if record is None:
            if cancel_path(folder, index).exists():
                return JobStatus(job_id, JobState.CANCELLED, "cancelled")
            return JobStatus(job_id, JobState.PENDING, "pending") if runner_alive else None
        if record.get("cancelled") and record.get("exit_code") is None:
            return JobStatus(job_id, JobState.CANCELLED, "cancelled")
        code = record.get("exit_code")
        if code is not None and (isinstance(code, bool) or not isinstance(code, int)):
            raise UnreadableRecord(f"{member_path(folder, index)}: exit_code {code!r} is not "
                                   "a whole number")
        if code is not None:
            if record.get("cancelled"):
                state, raw = JobState.CANCELLED, "cancelled"
            elif record.get("timed_out"):
                state, raw = JobState.TIMEOUT, "timeout"
            else:
                state = JobState.COMPLETED if code == 0 else JobState.FAILED
                raw = "completed" if code == 0 else "failed"
            return JobStatus(job_id, state, raw, code, os.uname().nodename)
        if is_alive(record.get("pid"), record.get("start_ticks")) or runner_alive:
            # A worker that just exited is still RUNNING until its runner records the end.
            return JobStatus(job_id, JobState.RUNNING, "running", None, os.uname().nodename)
        return None

    def poll(self, job_ids: Sequence[str]) -> PollResult:
        reap_runners()
        result = PollResult()
        for job_id in job_ids:
            try:
                status = self.status(job_id)
            except UnreadableRecord as error:
                # One bad record must not stop the poll of every other job.
                result.unreadable[job_id] = str(error)
                continue
            if status is not None:
                result.jobs[job_id] = status
        return result

    def cancel(self, job_ids: Sequence[str]) -> None:
        members = [located for located in map(self._folder, job_ids) if located is not None]
        for folder, index in members:
            marker = cancel_path(folder, index)
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
        if not members:
            return
        # A runner may have been starting a member as its marker appeared: let it record it.
        time.sleep(TICK_S * 2)
        for folder, index in members:
            record = read_json(member_path(folder, index))
            if record and record.get("exit_code") is None and is_alive(
                    record.get("pid"), record.get("start_ticks")):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(int(record["pid"]), signal.SIGTERM)

    def find_by_names(self, names: Sequence[str],
                      sizes: dict[str, int] | None = None) -> dict[str, dict[int, str]]:
        found: dict[str, dict[int, str]] = {}
        for name in names:
            folder = self.batches / name
            batch = read_json(folder / "batch.json")
            if batch is not None and (folder / "runner.json").exists():
                count = batch.get("count")
                if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                    # Its runner started, so "not found" would put running runs back in the
                    # queue: the batch stays pending instead.
                    raise SchedulerError(f"{folder / 'batch.json'}: count {count!r} is not a "
                                         "number of runs")
                found[name] = {i: f"{name}[{i}]" for i in range(count)}
        return found
