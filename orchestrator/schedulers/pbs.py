"""PBS Pro / OpenPBS: `qsub -J` arrays, one `qstat -f -F json -x -t` per poll, `qdel`.

An array needs at least two subjobs (`-J 0-0` is refused), so a batch of one run is a plain job.
qstat is called without job ids: some versions answer only the first of several ids, and a poll
must cover every active job in one call. Finished jobs appear only where the server keeps job
history; the run directory's exit.json carries completion either way.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from orchestrator.errors import SchedulerError
from orchestrator.resources import pbs_flags, pbs_gpu_resource
from orchestrator.schedulers.base import (
    Batch,
    JobState,
    JobStatus,
    PollResult,
    Scheduler,
    Submission,
    run_command,
)
from orchestrator.schedulers.qstat import parse_qstat_json

QSTAT_COMMAND = ["qstat", "-f", "-F", "json", "-x", "-t"]
#: PBS's own exit status of a job killed for exceeding its walltime.
EXIT_WALLTIME = -29
#: 256 + SIGTERM: what a qdel of a running job ends with (and any other SIGTERM).
EXIT_SIGTERM = 256 + 15
#: Comments PBS leaves on a job a user or an operator deleted.
_DELETED = re.compile(r"terminated by|deleted by|job deleted|qdel", re.IGNORECASE)
_JOB_ID = re.compile(r"^\d+(\[\])?\.\S+$")

_ACTIVE = {"Q": JobState.PENDING, "H": JobState.PENDING, "W": JobState.PENDING,
           "T": JobState.PENDING, "M": JobState.PENDING, "R": JobState.RUNNING,
           "E": JobState.RUNNING, "B": JobState.RUNNING, "S": JobState.RUNNING,
           "U": JobState.RUNNING}


def job_state(job_id: str, job: dict[str, Any]) -> JobStatus:
    """satrl's view of one qstat job record."""
    raw = str(job.get("job_state", "?"))
    exit_status = job.get("Exit_status")
    # (bool is an int to Python, not to PBS)
    exit_status = exit_status if type(exit_status) is int else None
    comment = str(job.get("comment", ""))
    host = job.get("exec_host")
    node = str(host).split("/")[0] if host else None
    if raw in _ACTIVE:
        state = _ACTIVE[raw]
    elif raw in ("F", "X"):
        state = finished_state(exit_status, comment)
    else:
        state = JobState.UNKNOWN
    name = job.get("Job_Name")
    # Another user's odd record must not reach find_by_names as an unhashable name.
    return JobStatus(job_id, state, raw, exit_status, node,
                     name if isinstance(name, str) else None, comment)


def finished_state(exit_status: int | None, comment: str) -> JobState:
    """A finished job's outcome from its Exit_status and the server's comment."""
    if exit_status is None:
        # F and X are terminal: UNKNOWN would count as active for ever. Without an exit status
        # (a job deleted before it ran, a server that dropped the attribute) only the comment
        # tells a deletion from a failure.
        return JobState.CANCELLED if _DELETED.search(comment) else JobState.FAILED
    if exit_status == 0:
        return JobState.COMPLETED
    if exit_status == EXIT_WALLTIME:
        return JobState.TIMEOUT
    if exit_status == EXIT_SIGTERM and _DELETED.search(comment):
        return JobState.CANCELLED
    return JobState.FAILED


class PbsScheduler(Scheduler):
    name = "pbs"
    index_variable = "PBS_ARRAY_INDEX"

    def check_config(self) -> None:
        super().check_config()
        pbs_gpu_resource(self.config)

    def submit_command(self, batch: Batch) -> list[str]:
        command = ["qsub", "-N", batch.token]
        max_running = self.max_running  # checked even for a plain job: the setting is wrong
        if len(batch.members) > 1:
            array = f"0-{len(batch.members) - 1}"
            if max_running is not None:
                array += f"%{max_running}"
            command += ["-J", array]
        command += [*pbs_flags(batch.resources, self.config), "-r", "y", "-j", "oe",
                    "-o", f"{batch.folder}/", str(batch.script_path)]
        return command

    def submit(self, batch: Batch) -> Submission:
        script = self.write_script(batch)
        command = self.submit_command(batch)
        return parse_qsub_output(run_command(command, script=script).stdout,
                                 len(batch.members), command)

    def qstat(self) -> tuple[dict[str, JobStatus], dict[str, str]]:
        # Exit 35 ("job has finished") and 153 (unknown job) still print what they know.
        completed = run_command(QSTAT_COMMAND, ok_codes=(0, 35, 153))
        document = parse_qstat_json(completed.stdout)
        return ({job_id: job_state(job_id, job) for job_id, job in document.jobs.items()},
                document.unreadable)

    def poll(self, job_ids: Sequence[str]) -> PollResult:
        wanted = set(job_ids)
        jobs, unreadable = self.qstat()
        return PollResult({k: v for k, v in jobs.items() if k in wanted},
                          {k: v for k, v in unreadable.items() if k in wanted})

    def cancel(self, job_ids: Sequence[str]) -> None:
        if not job_ids:
            return
        # qdel exits 35 for a job that already finished: not an error here.
        completed = run_command(["qdel", *job_ids], ok_codes=(0, 35, 153, 1))
        if completed.returncode == 1 and "finished" not in completed.stderr.lower():
            raise SchedulerError("qdel failed", command=["qdel", *job_ids],
                                 stderr=completed.stderr)

    def find_by_names(self, names: Sequence[str],
                      sizes: dict[str, int] | None = None) -> dict[str, dict[int, str]]:
        if not names:
            return {}
        wanted = set(names)
        jobs, _ = self.qstat()
        found: dict[str, dict[int, str]] = {}
        for job_id, status in jobs.items():
            if status.name in wanted and "[]" not in job_id:
                found.setdefault(status.name, {})[array_index(job_id)] = job_id
        return found


def array_index(job_id: str) -> int:
    """`12[3].server` -> 3; a plain job -> 0."""
    match = re.search(r"\[(\d+)\]", job_id)
    return int(match.group(1)) if match else 0


def parse_qsub_output(stdout: str, members: int, command: list[str] | None = None
                      ) -> Submission:
    """Member ids from qsub's output: `<n>.<server>` (plain) or `<n>[].<server>` (array)."""
    job_id = stdout.strip()
    if not _JOB_ID.match(job_id):
        raise SchedulerError(f"qsub printed {job_id[:200]!r}, not a job id", command=command)
    if "[]" in job_id:
        if members < 2:
            raise SchedulerError(f"qsub made an array {job_id} of one run", command=command)
        return Submission(tuple(job_id.replace("[]", f"[{i}]") for i in range(members)), job_id)
    if members != 1:
        raise SchedulerError(f"qsub printed a plain job id {job_id} for an array of {members}",
                             command=command)
    return Submission((job_id,), None)
