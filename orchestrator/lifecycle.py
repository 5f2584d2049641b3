"""The run state machine, and the pure decision of a run's next state from what was observed.

    queued -> submitted -> running -> succeeded | failed | cancelled | lost
    failed | cancelled | lost -> queued          (requeue, auto-requeue)

No database and no files here: `decide` takes what reconciliation observed (the run directory's
files and, when the scheduler was asked this round, its record of the job) and returns the run's
next state and the attempt's reason. Rules, in order of precedence:

1. exit.json is the truth for what the worker did: done -> succeeded; failed -> failed; walltime
   (the worker saw SATRL_DEADLINE or the scheduler's warning signal) -> failed/walltime.
2. A worker that only saw a signal (exit.json reason signal) ended as the scheduler says: a user's
   scancel/qdel -> cancelled; Slurm TIMEOUT or PBS -29 -> failed/walltime; preemption or node
   failure (LOST) -> lost, so that (auto-)requeue resumes it as it would without exit.json;
   otherwise failed/signal, once the scheduler has ended the job or forgot it a grace period ago.
3. Without exit.json: the scheduler's TIMEOUT -> failed/walltime (the worker was killed hard);
   CANCELLED -> cancelled; ended with a failure -> failed (reason signal for a signal exit
   status); LOST (node failure) -> lost; running -> running. Ended successfully (COMPLETED, exit
   status 0) the worker did write exit.json, which the login node may not see yet (NFS caches
   a directory's entries): the run waits a grace period after the worker's last heartbeat (or,
   without one, after the scheduler last listed the job), then goes lost, from which the exit
   file still settles it. Failed would be final and wrong once exit.json says done.
4. A job the scheduler does not list, with no exit.json and no fresh heartbeat, becomes lost only
   a grace period after the first reply that omitted it (or after its submission): one reply
   that omits jobs never makes them lost, however long nobody asked before it.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.errors import ConflictError
from orchestrator.registry.models import Reason, RunState
from orchestrator.schedulers.base import JobState

S = RunState
#: Every allowed move; anything else is a bug or a race, and is refused.
TRANSITIONS: dict[RunState, frozenset[RunState]] = {
    S.QUEUED: frozenset({S.SUBMITTED, S.CANCELLED}),
    # submitted -> queued: the submission failed or was never made (crash before the scheduler).
    S.SUBMITTED: frozenset({S.RUNNING, S.SUCCEEDED, S.FAILED, S.CANCELLED, S.LOST, S.QUEUED}),
    S.RUNNING: frozenset({S.SUCCEEDED, S.FAILED, S.CANCELLED, S.LOST}),
    S.SUCCEEDED: frozenset(),
    S.FAILED: frozenset({S.QUEUED}),
    S.CANCELLED: frozenset({S.QUEUED}),
    # A run declared lost whose worker turns up with an exit.json after all.
    S.LOST: frozenset({S.QUEUED, S.SUCCEEDED, S.FAILED}),
}

#: Exit statuses above this mean "killed by a signal" (shells: 128 + n; PBS: 256 + n).
SIGNAL_EXIT_BASE = 128


def can_transition(from_state: RunState | str, to_state: RunState | str) -> bool:
    return RunState(to_state) in TRANSITIONS[RunState(from_state)]


def check_transition(from_state: RunState | str, to_state: RunState | str) -> None:
    """Raise ConflictError unless from_state -> to_state is allowed."""
    if not can_transition(from_state, to_state):
        raise ConflictError(f"a run cannot go from {RunState(from_state).value} to "
                            f"{RunState(to_state).value}")


@dataclass(frozen=True)
class FileView:
    """What the run directory says about the current attempt (None: no such file)."""

    exit_reason: str | None = None
    exit_code: int | None = None
    exit_message: str = ""
    #: exit.json's ended_at (epoch s).
    exit_at: float | None = None
    #: status.json's updated_at (epoch s), only if written after this job was submitted.
    heartbeat_at: float | None = None


@dataclass(frozen=True)
class SchedulerView:
    """The scheduler's answer about one job this round."""

    #: Whether the scheduler was asked this round (False when rate-limited or not submitted).
    asked: bool
    #: The job's state if it was listed, else None.
    state: JobState | None = None
    exit_status: int | None = None
    detail: str = ""

    @property
    def listed(self) -> bool:
        return self.asked and self.state is not None


NOT_ASKED = SchedulerView(asked=False)


@dataclass(frozen=True)
class Decision:
    """The run's next state (maybe unchanged), the attempt's reason if it ended, and why."""

    state: RunState
    reason: Reason | None = None
    why: str = ""

    @property
    def ended(self) -> bool:
        return self.reason is not None


def decide(current: RunState, files: FileView, scheduler: SchedulerView, *, now: float,
           since: float, grace_s: float) -> Decision:
    """The next state of a run in `current` (submitted, running or lost).

    :param since: since when the scheduler has not listed the job (its first omitting reply),
        or when it was last listed or submitted (epoch s).
    :param grace_s: how long a job may go unlisted, with no heartbeat, before it is lost.
    """
    stay = Decision(current)
    if current not in (S.SUBMITTED, S.RUNNING, S.LOST):
        return stay
    by_file = _from_exit_file(files, scheduler, now, grace_s)
    if by_file is not None:
        return by_file if can_transition(current, by_file.state) else stay
    if current == S.LOST or files.exit_reason == "signal":
        # Lost: only an exit.json brings it back. Signal: wait for the scheduler's word.
        return stay
    state = scheduler.state if scheduler.listed else None
    if state == JobState.TIMEOUT:
        return Decision(S.FAILED, Reason.WALLTIME, _said("killed at its time limit", scheduler))
    if state == JobState.CANCELLED:
        return Decision(S.CANCELLED, Reason.CANCELLED, _said("cancelled", scheduler))
    if state == JobState.LOST:
        return Decision(S.LOST, Reason.LOST, _said("given up by the scheduler", scheduler))
    if state == JobState.COMPLETED and scheduler.exit_status in (None, 0):
        return _completed_without_exit_file(current, files, scheduler, now=now, since=since,
                                            grace_s=grace_s)
    if state in (JobState.COMPLETED, JobState.FAILED):
        code = scheduler.exit_status
        reason = Reason.SIGNAL if code is not None and (code > SIGNAL_EXIT_BASE or code < 0) \
            else Reason.FAILED
        return Decision(S.FAILED, reason, _said(
            f"the job ended{f' with exit status {code}' if code is not None else ''} "
            "and the worker left no exit.json", scheduler))
    heartbeat = files.heartbeat_at is not None and now - files.heartbeat_at < grace_s
    if state == JobState.RUNNING or (current == S.SUBMITTED and heartbeat):
        if current == S.SUBMITTED:
            return Decision(S.RUNNING, None, "started" if state == JobState.RUNNING
                            else "started (heartbeat in status.json)")
        return stay
    if scheduler.asked and state is None and not heartbeat and now - since > grace_s:
        return Decision(S.LOST, Reason.LOST, f"the scheduler has not listed the job for "
                        f"{now - since:.0f} s and the worker left no exit.json")
    return stay


def _completed_without_exit_file(current: RunState, files: FileView, scheduler: SchedulerView,
                                 *, now: float, since: float, grace_s: float) -> Decision:
    """A job the scheduler ended successfully while its exit.json is not visible (rule 3)."""
    # The worker writes exit.json before it exits 0, so the file exists; only our view of the
    # shared filesystem may lag. Its last heartbeat says when it was last alive; without one,
    # the scheduler's last listing is the newest sign of the job, as for an omitted job.
    last_seen = files.heartbeat_at if files.heartbeat_at is not None else since
    if now - last_seen <= grace_s:
        return Decision(current)
    return Decision(S.LOST, Reason.LOST, _said(
        f"the job completed with exit status 0 but its exit.json is still not visible "
        f"{now - last_seen:.0f} s after the worker was last seen", scheduler))


def _from_exit_file(files: FileView, scheduler: SchedulerView, now: float,
                    grace_s: float) -> Decision | None:
    reason = files.exit_reason
    message = f": {files.exit_message}" if files.exit_message else ""
    if reason == "done":
        return Decision(S.SUCCEEDED, Reason.DONE, f"finished{message}")
    if reason == "walltime":
        return Decision(S.FAILED, Reason.WALLTIME, f"stopped at its time limit{message}")
    if reason == "failed":
        return Decision(S.FAILED, Reason.FAILED, f"failed{message}")
    if reason != "signal":
        return None  # no exit.json (or one this version does not know): ask the scheduler
    state = scheduler.state if scheduler.listed else None
    if state == JobState.CANCELLED:
        return Decision(S.CANCELLED, Reason.CANCELLED, _said("cancelled", scheduler))
    if state == JobState.TIMEOUT:
        return Decision(S.FAILED, Reason.WALLTIME,
                        _said("killed at its time limit (the worker saw SIGTERM)", scheduler))
    if state == JobState.LOST:
        # Preemption or a node failure sent the SIGTERM: the scheduler's word wins, and a lost
        # run is requeued (auto-requeue too) to resume from its newest checkpoint.
        return Decision(S.LOST, Reason.LOST,
                        _said(f"given up by the scheduler (the worker saw a signal{message})",
                              scheduler))
    if state in (JobState.COMPLETED, JobState.FAILED):
        return Decision(S.FAILED, Reason.SIGNAL, f"stopped by a signal{message}")
    ended_long_ago = files.exit_at is not None and now - files.exit_at > grace_s
    if scheduler.asked and state is None and ended_long_ago:
        return Decision(S.FAILED, Reason.SIGNAL,
                        f"stopped by a signal{message} (the scheduler no longer lists the job)")
    return None  # wait for the scheduler's word: a user's cancel, or a walltime kill?


def _said(what: str, scheduler: SchedulerView) -> str:
    return f"{what} (scheduler: {scheduler.detail})" if scheduler.detail else what
