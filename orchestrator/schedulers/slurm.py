"""Slurm: `sbatch --array`, one `squeue -j <arrays>` per poll, `scancel`.

`squeue -h -o` with explicit fields is stable across releases (its --json is not). squeue forgets
finished jobs after the cluster's MinJobAge; the run directory's exit.json carries completion.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace

from orchestrator.errors import SchedulerError
from orchestrator.resources import slurm_flags, slurm_gres
from orchestrator.schedulers.base import (
    Batch,
    JobState,
    JobStatus,
    PollResult,
    Scheduler,
    Submission,
    run_command,
)

#: squeue's long state names -> satrl's (anything else: UNKNOWN).
STATES: dict[str, JobState] = {
    "PENDING": JobState.PENDING, "CONFIGURING": JobState.PENDING, "REQUEUED": JobState.PENDING,
    "REQUEUE_HOLD": JobState.PENDING, "REQUEUE_FED": JobState.PENDING,
    "RESV_DEL_HOLD": JobState.PENDING, "SPECIAL_EXIT": JobState.PENDING,
    "RUNNING": JobState.RUNNING, "COMPLETING": JobState.RUNNING, "SUSPENDED": JobState.RUNNING,
    "STOPPED": JobState.RUNNING, "SIGNALING": JobState.RUNNING, "STAGE_OUT": JobState.RUNNING,
    "RESIZING": JobState.RUNNING,
    "COMPLETED": JobState.COMPLETED,
    "FAILED": JobState.FAILED, "OUT_OF_MEMORY": JobState.FAILED,
    "CANCELLED": JobState.CANCELLED, "REVOKED": JobState.CANCELLED,
    "TIMEOUT": JobState.TIMEOUT, "DEADLINE": JobState.TIMEOUT,
    "NODE_FAIL": JobState.LOST, "BOOT_FAIL": JobState.LOST, "PREEMPTED": JobState.LOST,
}
#: One line per job (array tasks expanded); `|` cannot occur in ids, states or node lists.
SQUEUE_FORMAT = "%i|%T|%N|%j|%r"
#: Fields of a job line: a line with fewer is an error message, not a job.
SQUEUE_FIELDS = SQUEUE_FORMAT.count("|") + 1
#: Array ids per squeue call: a study dispatched a few runs at a time has thousands of arrays.
POLL_CHUNK = 500
#: squeue's answer to `-j ID` for a single id it has forgotten (a list of ids just omits it).
FORGOTTEN_JOB = "Invalid job id specified"


def _reason(reason: str, state: JobState) -> str | None:
    """squeue's %r as an event's detail: "None" is no reason, and a cancelled job keeps the
    reason it was pending for (JobArrayTaskLimit), which is not why it ended."""
    reason = reason.strip()
    if not reason or reason == "None" or state == JobState.CANCELLED:
        return None
    return reason


class SlurmScheduler(Scheduler):
    name = "slurm"
    index_variable = "SLURM_ARRAY_TASK_ID"

    def check_config(self) -> None:
        super().check_config()
        slurm_gres(self.config)

    def submit_command(self, batch: Batch) -> list[str]:
        last = len(batch.members) - 1
        array = f"0-{last}"
        max_running = self.max_running
        if max_running is not None:
            array += f"%{max_running}"
        return [
            "sbatch", "--parsable", f"--job-name={batch.token}", f"--array={array}",
            f"--output={batch.folder}/slurm-%A_%a.out",
            f"--signal=B:USR1@{batch.signal_margin_s}",
            *slurm_flags(batch.resources, self.config),
            str(batch.script_path),
        ]

    def submit(self, batch: Batch) -> Submission:
        script = self.write_script(batch)
        out = run_command(self.submit_command(batch), script=script).stdout
        job_id = out.strip().split(";")[0].strip()
        if not job_id.isdigit():
            raise SchedulerError(f"sbatch printed {out.strip()!r}, not a job id",
                                 command=self.submit_command(batch), script=str(script))
        return Submission(tuple(f"{job_id}_{i}" for i in range(len(batch.members))), job_id)

    def _squeue(self, extra: Sequence[str] = ()) -> list[list[str]]:
        """squeue's lines split into SQUEUE_FORMAT's fields; SchedulerError for any other line.

        squeue may exit 0 and print an error instead of jobs ("slurm_load_jobs error: Unable
        to contact slurm controller"): skipping such a line would read as "no jobs", and every
        run would go lost after the grace period.
        """
        # Any user's jobs, not --me: with a lab's shared registry, a colleague's satrl status
        # reconciles runs that you dispatched, and would take your jobs for lost. The callers
        # narrow the listing by job or name instead, so a busy cluster is not listed whole.
        command = ["squeue", "-h", "-r", "-t", "all", *extra, "-o", SQUEUE_FORMAT]
        completed = run_command(command, ok_codes=(0, 1))
        if completed.returncode:
            # `-j` with one forgotten id is an error, not an empty listing: Slurm purged it.
            forgotten = FORGOTTEN_JOB in completed.stderr and "-j" in extra \
                and "," not in extra[extra.index("-j") + 1]
            if forgotten:
                return []
            raise SchedulerError(f"squeue failed with exit code {completed.returncode}",
                                 command=command, stderr=completed.stderr)
        rows = []
        for line in completed.stdout.splitlines():
            if not line.strip():
                continue
            fields = line.split("|")
            # A job name may hold `|` (more fields); fewer is never a job line.
            if len(fields) < SQUEUE_FIELDS or not fields[0].strip() or not fields[1].strip():
                raise SchedulerError(f"squeue printed a line that is not a job: {line[:120]!r}",
                                     command=command, stderr=completed.stderr)
            rows.append(fields)
        return rows

    def poll(self, job_ids: Sequence[str]) -> PollResult:
        # Only the arrays asked about (their ids, any user's): a list of ids omits the ones
        # Slurm has forgotten, where `squeue` alone would list every job on the cluster.
        wanted = set(job_ids)
        result = PollResult()
        # An id of another shape was never sbatch's; squeue would refuse the whole list for it.
        arrays = sorted({array for array in (job_id.partition("_")[0] for job_id in wanted)
                         if is_slurm_job_id(array)})
        rows = [fields for start in range(0, len(arrays), POLL_CHUNK)
                for fields in self._squeue(["-j", ",".join(arrays[start:start + POLL_CHUNK])])]
        whole_arrays: dict[str, JobStatus] = {}
        for fields in rows:
            raw = fields[1].strip()
            state = STATES.get(raw, JobState.UNKNOWN)
            template = JobStatus("", state, raw, None, fields[2].strip() or None, fields[3],
                                 _reason(fields[4], state))
            for job_id in expand_ids(fields[0].strip()):
                if job_id.isdigit():
                    # A whole array in one record (e.g. every task cancelled while pending).
                    whole_arrays[job_id] = template
                elif job_id in wanted:
                    result.jobs[job_id] = replace(template, job_id=job_id)
        for job_id in wanted - set(result.jobs):
            array = job_id.partition("_")[0]
            if array in whole_arrays:
                result.jobs[job_id] = replace(whole_arrays[array], job_id=job_id)
        return result

    def cancel(self, job_ids: Sequence[str]) -> None:
        if job_ids:
            # scancel exits 1 for jobs that already ended; that is what we want anyway.
            completed = run_command(["scancel", *job_ids], ok_codes=(0, 1))
            errors = [line for line in completed.stderr.splitlines()
                      if "error" in line.lower() and "already completing or completed" not in line
                      and "Invalid job id" not in line]
            if completed.returncode and errors:
                raise SchedulerError("scancel failed", command=["scancel", *job_ids],
                                     stderr="\n".join(errors))

    def find_by_names(self, names: Sequence[str],
                      sizes: dict[str, int] | None = None) -> dict[str, dict[int, str]]:
        if not names:
            return {}
        found: dict[str, dict[int, str]] = {}
        for fields in self._squeue(["-n", ",".join(names)]):
            if fields[3] not in names:
                continue
            for job_id in expand_ids(fields[0].strip()):
                array, _, index = job_id.partition("_")
                if index.isdigit():
                    found.setdefault(fields[3], {})[int(index)] = job_id
                else:  # the whole array in one record: its tasks are array_index
                    size = (sizes or {}).get(fields[3], 1)
                    found.setdefault(fields[3], {}).update(
                        {i: f"{array}_{i}" for i in range(size)})
        return found


def is_slurm_job_id(text: str) -> bool:
    """A number squeue -j takes (Slurm's ids are 32-bit, from 1): anything else makes it refuse
    the whole list ("Invalid job id: 4294967296")."""
    return text.isascii() and text.isdigit() and 0 < int(text) < 2**32


def expand_ids(job_id: str) -> list[str]:
    """squeue's id field: `12_3`, `12`, or a pending remainder `12_[4-6,9%2]` -> its tasks."""
    match = re.match(r"^(\d+)_\[([^\]]+)\]$", job_id)
    if match is None:
        return [job_id]
    array, spec = match.groups()
    ids = []
    for part in spec.split("%")[0].split(","):
        low, _, high = part.partition("-")
        if low.isdigit() and (not high or high.isdigit()):
            ids += [f"{array}_{i}" for i in range(int(low), int(high or low) + 1)]
    return ids
