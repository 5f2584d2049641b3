"""Reconciliation: the registry catches up with the run directories and the schedulers.

One round (`satrl status`, `satrl sync`, each tick of `--watch` and `dispatch --wait`):

1. interrupted submissions are recovered (dispatching.recover_pending), when no dispatch runs;
2. the active runs (submitted, running) and the lost ones are read with their newest job;
3. each backend with active jobs is asked once, for all of them, unless it was asked less than
   its `poll_interval_s` ago by any satrl process (the last poll time is in scheduler_polls);
4. each run's exit.json / status.json and the scheduler's answer go through lifecycle.decide;
5. the changes are written in one transaction, each transition with an event, each ended attempt
   with its reason, exit status, node and provenance on its jobs row;
6. with `[dispatch] auto_requeue = true`, runs that hit their walltime or were lost go back to
   queued and are dispatched again, up to `max_attempts` submissions each.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update

from orchestrator import lifecycle
from orchestrator.errors import SatrlError
from orchestrator.lifecycle import NOT_ASKED, Decision, FileView, SchedulerView
from orchestrator.registry.db import Registry
from orchestrator.registry.models import (
    Event,
    Experiment,
    Job,
    Reason,
    Run,
    RunState,
    SchedulerPoll,
    epoch,
    from_epoch,
)
from orchestrator.registry.queries import RunFilter
from orchestrator.schedulers import get_scheduler
from orchestrator.schedulers.base import JobState, PollResult, config_flag, config_number

#: Default seconds a job may go unlisted by its scheduler, with no heartbeat, before it is lost.
DEFAULT_LOST_GRACE_S = 600.0
#: Default submissions of a run auto-requeue makes at most.
DEFAULT_MAX_ATTEMPTS = 3
#: Clock slack between the login node and compute nodes when matching files to a submission.
CLOCK_SLACK_S = 5.0


@dataclass
class Transition:
    run_id: int
    key: str
    from_state: str
    to_state: str
    why: str
    reason: str | None = None


@dataclass
class ReconcileResult:
    """What one round did."""

    #: backend -> whether its scheduler was asked this round.
    polled: dict[str, bool] = field(default_factory=dict)
    transitions: list[Transition] = field(default_factory=list)
    #: job id -> why the scheduler's record of it could not be read.
    unreadable: dict[str, str] = field(default_factory=dict)
    requeued: list[int] = field(default_factory=list)
    recovered: int = 0
    #: Backends whose scheduler was asked and did not answer usably (see errors): the round
    #: went on with the run directories alone.
    poll_failed: list[str] = field(default_factory=list)
    #: What the round went past: scheduler failures (it went on with the run directories
    #: alone) and values of run-directory files it could not use (read as absent).
    errors: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"polled": self.polled, "poll_failed": self.poll_failed,
                "recovered": self.recovered, "requeued": self.requeued,
                "unreadable": self.unreadable, "errors": self.errors,
                "transitions": [t.__dict__ for t in self.transitions]}


@dataclass(frozen=True)
class Answer:
    """The scheduler's answer about one job: the view `decide` takes, and the raw words."""

    view: SchedulerView
    raw_state: str | None = None
    node: str | None = None
    #: For a job the reply omits: since when it has gone unlisted, as far as satrl knows.
    unlisted_since: float | None = None


NO_ANSWER = Answer(NOT_ASKED)
#: jobs.scheduler_state of an attempt satrl settled while its scheduler still listed it as
#: active, or did not list it (it is not asked about again).
ENDED_JOB_STATE = "ended"


@dataclass(frozen=True)
class _Round:
    run: _Tracked
    decision: Decision
    answer: Answer
    files: FileView


@dataclass
class _Tracked:
    """One run under reconciliation, with its newest job."""

    run_id: int
    key: str
    state: RunState
    run_dir: str | None
    attempts: int
    job_pk: int
    backend: str
    job_id: str | None
    submitted_at: float
    seen_at: float | None
    scheduler_state: str | None
    node: str | None = None
    started_at: datetime | None = None
    unlisted_since: float | None = None


def reconcile(registry: Registry, settings: Any, run_filter: RunFilter | None = None, *,
              force: bool = False, now: float | None = None,
              auto_requeue: bool | None = None) -> ReconcileResult:
    """One reconciliation round over the runs matching `run_filter` (module docstring)."""
    from orchestrator.dispatching import dispatch_lock, recover_pending

    result = ReconcileResult()
    recovered_all = False
    unasked: dict[str, str] = {}  # backends recovery could not ask (their claims stay pending)
    with dispatch_lock(settings, blocking=False, registry=registry) as locked:
        if locked:
            try:
                recovery = recover_pending(registry, settings, report=result.errors.append)
            except SatrlError as error:
                result.errors.append(f"recovering interrupted dispatches: {error}")
            else:
                result.recovered, unasked = recovery.recovered, recovery.skipped
                recovered_all = True
    now = time.time() if now is None else now
    grace_s = float(config_number(settings.section("dispatch"), "lost_grace_s",
                                  DEFAULT_LOST_GRACE_S, "satrl.toml [dispatch]", kind=float))
    tracked = _load(registry, run_filter or RunFilter())
    if not tracked:
        return result
    answers = _poll(registry, settings, tracked, result, now, force)
    decisions: list[_Round] = []
    for run in tracked:
        answer = answers.get(run.job_pk, NO_ANSWER)
        if recovered_all and run.backend not in unasked and run.job_id is None \
                and run.state.is_active():
            # Recovery asked the scheduler for its batch by name and it was not listed: like
            # an omitted job, lost once the grace period since the claim or the last heartbeat
            # has passed. (While a dispatch holds the lock, its claims are left alone; so are
            # those of a scheduler recovery could not ask.)
            answer = Answer(SchedulerView(True, None))
        files = read_files(run.run_dir, run.submitted_at, problems=result.errors)
        since = answer.unlisted_since or max(run.seen_at or 0.0, run.submitted_at)
        decision = lifecycle.decide(run.state, files, answer.view, now=now, since=since,
                                    grace_s=grace_s)
        decisions.append(_Round(run, decision, answer, files))
    _write(registry, decisions, result, now)
    if auto_requeue is None:
        auto_requeue = config_flag(settings.section("dispatch"), "auto_requeue", False,
                                   "satrl.toml [dispatch]")
    if auto_requeue:
        _auto_requeue(registry, settings, decisions, result)
    return result


def settle_exited(registry: Registry, run_ids: list[int], *, now: float | None = None,
                  dry_run: bool = False) -> list[Transition]:
    """The runs among `run_ids` (submitted or running) whose worker already wrote a final
    exit.json (done, failed, walltime) go where it says, as a reconciliation round takes them
    (events, the attempt's reason, exit code and provenance), without asking a scheduler: the
    transitions, not written with `dry_run`.

    For `cancel`: a run that finished must not become cancelled, which nothing undoes.
    exit.json reason signal is left alone (only the scheduler tells cancel from walltime).
    """
    if not run_ids:
        return []
    now = time.time() if now is None else now
    rounds: list[_Round] = []
    for run in _load(registry, RunFilter(run_ids=tuple(run_ids))):
        if not run.state.is_active():
            continue
        files = read_files(run.run_dir, run.submitted_at)
        # Not asked, the scheduler cannot move the run; only a heartbeat could (-> running),
        # which is not a settlement: keep the decisions that end the attempt.
        decision = lifecycle.decide(run.state, files, NOT_ASKED, now=now,
                                    since=run.submitted_at, grace_s=DEFAULT_LOST_GRACE_S)
        if decision.ended:
            rounds.append(_Round(run, decision, NO_ANSWER, files))
    result = ReconcileResult()
    if dry_run:
        return [_transition(item) for item in rounds]
    _write(registry, rounds, result, now)
    return result.transitions


def _load(registry: Registry, run_filter: RunFilter) -> list[_Tracked]:
    newest = (select(Job.run_id, func.max(Job.id).label("job_pk"))
              .group_by(Job.run_id).subquery())
    states = [RunState.SUBMITTED.value, RunState.RUNNING.value, RunState.LOST.value]
    statement = run_filter.apply(
        select(Run.id, Run.game, Run.attn, Run.seed, Run.state, Run.run_dir, Run.attempts,
               Job.id, Job.backend, Job.job_id, Job.submitted_at, Job.seen_at,
               Job.scheduler_state, Job.node, Job.started_at, Job.unlisted_since)
        .join(Experiment, Run.experiment_id == Experiment.id)
        .join(newest, newest.c.run_id == Run.id)
        .join(Job, Job.id == newest.c.job_pk)
        .where(Run.state.in_(states))
        .order_by(Run.id))
    tracked = []
    with registry.session() as session:
        for (rid, game, attn, seed, state, run_dir, attempts, job_pk, backend, job_id,
             submitted_at, seen_at, sched_state, node, started_at,
             unlisted_since) in session.execute(statement):
            tracked.append(_Tracked(rid, f"{game}/{attn}/{seed}", RunState(state), run_dir,
                                    attempts, job_pk, backend, job_id,
                                    epoch(submitted_at) or 0.0, epoch(seen_at), sched_state,
                                    node, started_at, epoch(unlisted_since)))
    return tracked


#: How far another process's clock may run ahead before its poll stamp is disbelieved.
CLOCK_SKEW_S = 5.0


def claim_poll(registry: Registry, backend: str, interval_s: float, now: float,
               force: bool) -> bool:
    """Whether this process may ask `backend`'s scheduler now (and if so, note that it does)."""
    with registry.write() as session:
        # Create the row first (a no-op when it exists): SELECT ... FOR UPDATE locks nothing
        # on a missing row, and two first polls would both INSERT and one would fail.
        registry.insert_ignoring_conflicts(
            session, SchedulerPoll, [{"backend": backend, "polled_at": from_epoch(0), "calls": 0}],
            ["backend"], SchedulerPoll.backend)
        row = session.scalars(select(SchedulerPoll).where(SchedulerPoll.backend == backend)
                              .with_for_update()).one()
        last = epoch(row.polled_at) or 0.0
        # A poll stamped a little later than `now` (another host's clock, microsecond rounding
        # of the stored time) is recent; only one far in the future is ignored.
        if not force and -CLOCK_SKEW_S <= now - last < interval_s:
            return False
        row.polled_at = from_epoch(now)
        row.calls = row.calls + 1
        return True


def _poll(registry: Registry, settings: Any, tracked: list[_Tracked], result: ReconcileResult,
          now: float, force: bool) -> dict[int, Answer]:
    """One scheduler call per backend for all of its active jobs; job pk -> its answer."""
    by_backend: dict[str, list[_Tracked]] = {}
    for run in tracked:
        if run.job_id and run.state.is_active():
            by_backend.setdefault(run.backend, []).append(run)
    answers: dict[int, Answer] = {}
    for backend, runs in by_backend.items():
        try:
            scheduler = get_scheduler(backend, settings)
            if not claim_poll(registry, backend, scheduler.poll_interval_s, now, force):
                result.polled[backend] = False
                continue
            reply: PollResult = scheduler.poll([run.job_id for run in runs if run.job_id])
        except SatrlError as error:
            result.polled[backend] = False
            result.poll_failed.append(backend)
            result.errors.append(f"{backend}: {error}")
            continue
        result.polled[backend] = True
        result.unreadable.update(reply.unreadable)
        for run in runs:
            status = reply.jobs.get(run.job_id or "")
            if status is not None:
                answers[run.job_pk] = Answer(SchedulerView(
                    True, status.state, status.exit_status, status.detail),
                    status.raw_state, status.node)
            elif run.job_id in reply.unreadable:
                # Listed but unreadable: seen (so never lost for it), state unknown.
                answers[run.job_pk] = Answer(SchedulerView(True, JobState.UNKNOWN),
                                             "unreadable")
            else:
                # Unlisted since the first reply that omitted it (this one, or an earlier one
                # recorded on the job): not since its last listing, which after a quiet hour
                # with no status would make one omitting reply enough to lose it.
                answers[run.job_pk] = Answer(SchedulerView(True, None), unlisted_since=(
                    run.unlisted_since if run.unlisted_since is not None else now))
    return answers


#: Epoch seconds a time in a run-directory file must lie between (2000-01-01 and 2200-01-01
#: UTC): anything else is a corrupt or hand-edited value, and some (1e20, Infinity) would crash
#: the conversion to a stored datetime, for every run of the round.
EARLIEST_FILE_TIME_S = 946_684_800
LATEST_FILE_TIME_S = 7_258_118_400
#: The exit codes the registry can store (a 32-bit INTEGER on PostgreSQL), inclusive.
EXIT_CODE_MIN, EXIT_CODE_MAX = -2**31, 2**31 - 1


def is_exit_code(value: Any) -> bool:
    """Whether `value` is a whole number the jobs table can hold as an exit status."""
    return isinstance(value, int) and not isinstance(value, bool) \
        and EXIT_CODE_MIN <= value <= EXIT_CODE_MAX


def file_time(value: Any) -> float | None:
    """An epoch time read from a file, or None unless it is a number in 2000..2200."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    # Compared before any float(): NaN and Infinity fail it, and so does a huge int.
    return float(value) if EARLIEST_FILE_TIME_S <= value <= LATEST_FILE_TIME_S else None


def read_files(run_dir: str | None, submitted_at: float, *,
               problems: list[str] | None = None) -> FileView:
    """exit.json and status.json of a run directory, as far as they belong to this job.

    A value of the wrong type or out of range (a time outside 2000..2200, an exit code beyond
    32 bits) is read as absent, with one line on `problems`: one bad file must not stop the
    round for every other run.
    """
    from agents.rundir import EXIT_JSON, STATUS_JSON, read_json

    if not run_dir:
        return FileView()
    folder = Path(run_dir)
    exit_info = read_json(folder / EXIT_JSON)
    status = read_json(folder / STATUS_JSON)
    report: Callable[[str], None] = problems.append if problems is not None \
        else (lambda line: None)
    heartbeat = None
    if isinstance(status, dict) and status.get("updated_at") is not None:
        updated_at = _checked_time(status["updated_at"], folder / STATUS_JSON, "updated_at",
                                   report)
        if updated_at is not None and updated_at >= submitted_at - CLOCK_SLACK_S:
            heartbeat = updated_at
    if not isinstance(exit_info, dict):
        return FileView(heartbeat_at=heartbeat)
    code = exit_info.get("exit_code")
    if code is not None and not is_exit_code(code):
        report(f"{folder / EXIT_JSON}: exit_code {_shown(code)} is not an exit code; ignored")
        code = None
    ended = exit_info.get("ended_at")
    return FileView(
        exit_reason=str(exit_info.get("reason")) if exit_info.get("reason") else None,
        exit_code=code,
        exit_message=str(exit_info.get("message", ""))[:500],
        exit_at=None if ended is None else _checked_time(ended, folder / EXIT_JSON, "ended_at",
                                                          report),
        heartbeat_at=heartbeat,
    )


def _checked_time(value: Any, path: Path, key: str,
                  report: Callable[[str], None]) -> float | None:
    """file_time(value), reporting a value that is not one."""
    seconds = file_time(value)
    if seconds is None:
        report(f"{path}: {key} {_shown(value)} is not a time between 2000 and 2200; ignored")
    return seconds


def _shown(value: Any) -> str:
    """A file's value for a one-line message (a huge number or string cut short)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def attempt_provenance(run_dir: str | None, submitted_at: float, *,
                       problems: list[str] | None = None) -> dict[str, Any] | None:
    """provenance.json's entry of the newest attempt started since this job's submission.

    An entry the registry cannot store (NaN or Infinity, which PostgreSQL's JSON refuses, and
    the whole round's transaction with it) is read as absent, with one line on `problems`.
    """
    import json

    from agents.rundir import PROVENANCE_JSON, read_json

    if not run_dir:
        return None
    path = Path(run_dir) / PROVENANCE_JSON
    data = read_json(path)
    attempts = data.get("attempts") if isinstance(data, dict) else None
    if not isinstance(attempts, list):
        return None
    # An entry without a plausible start time is not one this job can be matched to.
    mine = [a for a in attempts if isinstance(a, dict)
            and (started := file_time(a.get("started_at"))) is not None
            and started >= submitted_at - CLOCK_SLACK_S]
    if not mine:
        return None
    try:
        json.dumps(mine[-1], allow_nan=False)
    except ValueError:
        if problems is not None:
            problems.append(f"{path}: the newest attempt's entry holds NaN or Infinity; ignored")
        return None
    return mine[-1]


def _write(registry: Registry, decisions: list[_Round], result: ReconcileResult,
           now: float) -> None:
    """Every change of the round in one transaction, with a handful of bulk statements."""
    stamp = from_epoch(now)
    job_rows: dict[int, dict[str, Any]] = {}
    for item in decisions:
        if item.answer.view.listed:
            row: dict[str, Any] = {"id": item.run.job_pk, "seen_at": stamp,
                                   "unlisted_since": None,
                                   "scheduler_state": (item.answer.raw_state or "")[:32]}
            if item.answer.node:
                row["node"] = item.answer.node[:200]
            job_rows[item.run.job_pk] = row
        elif item.answer.unlisted_since is not None and item.run.unlisted_since is None:
            job_rows[item.run.job_pk] = {"id": item.run.job_pk,
                                         "unlisted_since": from_epoch(item.answer.unlisted_since)}
    changes = [item for item in decisions if item.decision.state != item.run.state]
    if not job_rows and not changes:
        return
    with registry.write() as session:
        if changes:
            # Another process may have moved a run since we read it: its view wins. (SQLite
            # writers hold the lock from BEGIN; PostgreSQL rows are locked here.)
            current = dict(session.execute(
                select(Run.id, Run.state).where(Run.id.in_([c.run.run_id for c in changes]))
                .with_for_update()).all())
            # ... and so does a newer attempt: a run requeued and resubmitted meanwhile has the
            # same state again, but its newest job is no longer the one this round judged.
            newest = dict(session.execute(
                select(Job.run_id, func.max(Job.id))
                .where(Job.run_id.in_([c.run.run_id for c in changes])).group_by(Job.run_id)
            ).all())
            changes = [c for c in changes if current.get(c.run.run_id) == c.run.state.value
                       and newest.get(c.run.run_id) == c.run.job_pk]
        if changes:
            session.execute(update(Run), [
                {"id": c.run.run_id, "state": c.decision.state.value, "updated_at": stamp}
                for c in changes])
            session.execute(Event.__table__.insert(), [
                {"run_id": c.run.run_id, "at": stamp, "from_state": c.run.state.value,
                 "to_state": c.decision.state.value, "why": c.decision.why} for c in changes])
        for item in changes:
            job_rows.setdefault(item.run.job_pk, {"id": item.run.job_pk}).update(
                _job_changes(item, stamp, result.errors))
            result.transitions.append(_transition(item))
        if job_rows:
            # executemany groups rows by their set of keys; keep the groups few.
            by_keys: dict[tuple[str, ...], list[dict[str, Any]]] = {}
            for row in job_rows.values():
                by_keys.setdefault(tuple(sorted(row)), []).append(row)
            for rows in by_keys.values():
                session.execute(update(Job), rows)


def _transition(item: _Round) -> Transition:
    run, decision = item.run, item.decision
    return Transition(run.run_id, run.key, run.state.value, decision.state.value, decision.why,
                      decision.reason.value if decision.reason else None)


def _job_changes(item: _Round, stamp: datetime, problems: list[str]) -> dict[str, Any]:
    """The jobs-row columns a transition sets: provenance, node, start, end, reason, exit."""
    run, decision = item.run, item.decision
    values: dict[str, Any] = {}
    started = run.started_at
    provenance = attempt_provenance(run.run_dir, run.submitted_at, problems=problems)
    if provenance is not None:
        values["provenance"] = provenance
        if not run.node and provenance.get("host") and not item.answer.node:
            values["node"] = str(provenance["host"])[:200]
        if provenance.get("image_digest"):
            values["image_digest"] = str(provenance["image_digest"])[:128]
        if started is None and isinstance(provenance.get("started_at"), int | float):
            started = from_epoch(provenance["started_at"])
    if started is None and decision.state == RunState.RUNNING:
        started = stamp
    if started is not None and run.started_at is None:
        values["started_at"] = started
    if decision.ended:
        files = item.files
        values["reason"] = decision.reason.value if decision.reason else None
        values["ended_at"] = from_epoch(files.exit_at) if files.exit_at is not None else stamp
        # The worker's exit code, else the scheduler's exit status (a worker killed hard); one
        # the column cannot hold would fail the whole round's transaction.
        status = files.exit_code if files.exit_code is not None else item.answer.view.exit_status
        values["exit_status"] = status if is_exit_code(status) else None
        # The run is settled and never polled again: a job still listed as pending or running
        # (its exit.json came first) or never listed would keep that word for good.
        state = item.answer.view.state
        if state is None or state.is_active():
            values["scheduler_state"] = ENDED_JOB_STATE
    return values


def _auto_requeue(registry: Registry, settings: Any, decisions: list[_Round],
                  result: ReconcileResult) -> None:
    from orchestrator.runctl import requeue_and_dispatch

    max_attempts = int(config_number(settings.section("dispatch"), "max_attempts",
                                     DEFAULT_MAX_ATTEMPTS, "satrl.toml [dispatch]", minimum=1))
    moved = {t.run_id for t in result.transitions}
    candidates: dict[str, list[int]] = {}
    for item in decisions:
        if item.run.run_id not in moved or item.run.attempts >= max_attempts:
            continue
        if item.decision.reason in (Reason.WALLTIME, Reason.LOST):
            candidates.setdefault(item.run.backend, []).append(item.run.run_id)
    for backend, run_ids in candidates.items():
        try:
            requeued = requeue_and_dispatch(
                registry, settings, run_ids, backend=backend,
                why=f"auto-requeue (at most {max_attempts} attempts)")
        except SatrlError as error:
            result.errors.append(f"auto-requeue on {backend}: {error}")
            continue
        result.requeued.extend(requeued)
