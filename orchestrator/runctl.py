"""Run control: requeue (and resubmit), cancel, and the job logs of an attempt."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update

from orchestrator.errors import NotFoundError, UsageError
from orchestrator.registry.db import Registry
from orchestrator.registry.models import Event, Job, Reason, Run, RunState
from orchestrator.registry.queries import RunFilter
from orchestrator.resources import Resources, resolve_resources
from orchestrator.schedulers import get_scheduler
from orchestrator.schedulers.base import JobState

REQUEUABLE = (RunState.FAILED, RunState.LOST, RunState.CANCELLED)


@dataclass
class RequeueResult:
    #: (run id, key) of the runs moved back to queued.
    requeued: list[tuple[int, str]] = field(default_factory=list)
    #: key -> why it was left alone.
    skipped: dict[str, str] = field(default_factory=dict)
    #: run ids dispatched again.
    dispatched: list[int] = field(default_factory=list)
    #: How they go out: (backend, the resources resolved as dispatch will, run keys).
    groups: list[tuple[str, Resources, list[str]]] = field(default_factory=list)
    dry_run: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"requeued": [{"id": rid, "run": key} for rid, key in self.requeued],
                "skipped": self.skipped, "dispatched": self.dispatched,
                "groups": [{"backend": backend, "resources": resources.to_json(), "runs": keys}
                           for backend, resources, keys in self.groups],
                "dry_run": self.dry_run}


def _newest_jobs(session: Any, run_ids: list[int]) -> dict[int, Job]:
    if not run_ids:
        return {}
    newest = (select(func.max(Job.id)).where(Job.run_id.in_(run_ids))
              .group_by(Job.run_id))
    return {job.run_id: job for job in session.scalars(select(Job).where(Job.id.in_(newest)))}


def requeue(registry: Registry, settings: Any, run_filter: RunFilter, *,
            states: tuple[str, ...] = (), walltime_only: bool = False,
            backend: str | None = None, dry_run: bool = False,
            dispatch_now: bool = True, resources: dict[str, Any] | None = None
            ) -> RequeueResult:
    """Move ended runs back to queued and submit them again; the worker resumes from its
    newest checkpoint. `states` picks among failed, lost and cancelled (default: all three);
    `walltime_only` keeps the failed runs whose last attempt hit its time limit. `resources`
    (satrl.toml's names; None = not given) change those of each run's last dispatch."""
    from orchestrator.registry.queries import select_runs

    explicit = set(states) if states or walltime_only else {s.value for s in REQUEUABLE}
    wanted = explicit | ({RunState.FAILED.value} if walltime_only else set())
    result = RequeueResult(dry_run=dry_run)
    with registry.session() as session:
        runs = list(session.scalars(select_runs(run_filter).where(Run.state.in_(wanted))))
        jobs = _newest_jobs(session, [run.id for run in runs])
        candidates = []
        for run in runs:
            job = jobs.get(run.id)
            hit_walltime = job is not None and job.reason == Reason.WALLTIME.value
            if run.state in explicit or (walltime_only and hit_walltime):
                candidates.append((run.id, run.key, job.backend if job else None,
                                   job.job_id if job else None))
        # A run named on the command line that is not requeued says why, not "0 run(s)".
        chosen = {c[0] for c in candidates}
        for run in _named_runs(session, run_filter):
            if run.id in chosen:
                continue
            if run.state == RunState.FAILED.value and walltime_only:
                result.skipped[run.key] = "failed, but its last attempt did not hit its walltime"
            else:
                kinds = [*sorted(explicit), *(["walltime-killed"] if walltime_only else [])]
                listed = ", ".join(kinds[:-1]) + (" or " if len(kinds) > 1 else "") + kinds[-1]
                result.skipped[run.key] = f"it is {run.state}; requeue takes {listed} runs"
    still_running = _still_in_scheduler(settings, candidates)
    ready = []
    for run_id, key, job_backend, job_id in candidates:
        if job_id in still_running:
            result.skipped[key] = (f"job {job_id} is still {still_running[job_id]} in "
                                   f"{job_backend}: requeue it once it has stopped")
        else:
            ready.append((run_id, key, job_backend))
    result.requeued = [(rid, key) for rid, key, _ in ready]
    if not ready:
        return result
    by_backend: dict[str, list[int]] = {}
    for rid, _, job_backend in ready:
        by_backend.setdefault(backend or job_backend or settings.backend, []).append(rid)
    groups = [group for name, run_ids in by_backend.items()
              for group in dispatch_groups(registry, settings, run_ids, name, resources)]
    keys = {rid: key for rid, key, _ in ready}
    result.groups = [(group.backend, resolve_resources(settings, group.backend, group.resources),
                      [keys[rid] for rid in group.run_ids]) for group in groups]
    if dispatch_now:
        from orchestrator.dispatching import check_dispatchable

        # The move to queued is committed before the dispatch: what dispatch would refuse
        # (resources, walltime, satrl.toml's numbers) must be refused while nothing changed,
        # and a dry run refuses it too.
        for group in groups:
            check_dispatchable(registry, settings, group.backend, group.run_ids,
                               group.resources)
    if dry_run:
        return result
    moved = move_to_queued(registry, [rid for rid, _, _ in ready], "requeued by the user")
    result.requeued = [(rid, key) for rid, key, _ in ready if rid in moved]
    if dispatch_now:
        for group in groups:
            result.dispatched += _dispatch_group(registry, settings, group, moved)
    return result


@dataclass(frozen=True)
class DispatchGroup:
    """Runs that go out together again: one backend, the resources of their last dispatch."""

    backend: str
    resources: dict[str, Any]
    run_ids: list[int]


def dispatch_groups(registry: Registry, settings: Any, run_ids: list[int], backend: str,
                    overrides: dict[str, Any] | None = None) -> list[DispatchGroup]:
    """`run_ids` grouped by the command-line resources of their newest job's batch (when that
    job ran on `backend`): a run dispatched with --gpus 1 --walltime-min 600 is resubmitted so,
    not with satrl.toml's defaults. `overrides` (None = not given) replace those named."""
    from orchestrator.dispatching import requested_resources

    with registry.session() as session:
        last_batch = {run_id: job.batch for run_id, job in _newest_jobs(session, run_ids).items()
                      if job.backend == backend}
    groups: dict[str, DispatchGroup] = {}
    for run_id in run_ids:
        resources = {**requested_resources(settings, last_batch.get(run_id)),
                     **{k: v for k, v in (overrides or {}).items() if v is not None}}
        key = json.dumps(resources, sort_keys=True)
        groups.setdefault(key, DispatchGroup(backend, resources, [])).run_ids.append(run_id)
    return list(groups.values())


def _dispatch_group(registry: Registry, settings: Any, group: DispatchGroup,
                    moved: set[int]) -> list[int]:
    from orchestrator.dispatching import DispatchRequest, dispatch

    run_ids = tuple(rid for rid in group.run_ids if rid in moved)
    if not run_ids:
        return []
    request = DispatchRequest(RunFilter(run_ids=run_ids), backend=group.backend,
                              resources=group.resources)
    return dispatch(registry, settings, request).run_ids


def _named_runs(session: Any, run_filter: RunFilter) -> list[Run]:
    """The runs the command line named (RUN arguments), in the filter's experiment."""
    if not run_filter.run_ids:
        return []
    return list(session.scalars(select(Run).where(Run.id.in_(run_filter.run_ids))))


def _still_in_scheduler(settings: Any, candidates: list[tuple[int, str, str | None, str | None]]
                        ) -> dict[str, str]:
    """job id -> what it still is, for the candidates' jobs their scheduler still has pending
    or running (one call per backend): a second worker must not start in a directory still in
    use. A job listed in a state satrl does not know, or whose record could not be read, may
    be running too: it counts as busy (an UNKNOWN job is never a reason to change anything)."""
    by_backend: dict[str, list[str]] = {}
    for _, _, backend, job_id in candidates:
        if backend and job_id:
            by_backend.setdefault(backend, []).append(job_id)
    busy: dict[str, str] = {}
    for backend, job_ids in by_backend.items():
        reply = get_scheduler(backend, settings).poll(job_ids)
        for job_id, status in reply.jobs.items():
            if status.state == JobState.UNKNOWN:
                busy[job_id] = f"listed in state {status.raw_state!r}"
            elif status.state.is_active():
                busy[job_id] = status.state.value
        for job_id in reply.unreadable:
            busy.setdefault(job_id, "listed (its record could not be read)")
    return busy


#: The states a requeue may move to queued (submitted -> queued is only a released claim).
REQUEUEABLE = frozenset({RunState.FAILED.value, RunState.LOST.value, RunState.CANCELLED.value})


def move_to_queued(registry: Registry, run_ids: list[int], why: str) -> set[int]:
    """failed | lost | cancelled -> queued, each with an event; the ids actually moved."""
    moved: set[int] = set()
    with registry.write() as session:
        read = list(session.execute(select(Run.id, Run.state).where(Run.id.in_(run_ids))))
        for run_id, state in read:
            if state not in REQUEUEABLE:
                continue
            # Conditional on the state read: a run another process resubmitted meanwhile
            # (submitted, which may also go to queued, but only by releasing its own claim)
            # must not be requeued, or two jobs would share its run directory.
            changed = session.execute(
                update(Run).where(Run.id == run_id, Run.state == state)
                .values(state=RunState.QUEUED.value)
                .execution_options(synchronize_session=False)).rowcount
            if changed:
                session.add(Event(run_id=run_id, from_state=state,
                                  to_state=RunState.QUEUED.value, why=why))
                moved.add(run_id)
    return moved


def requeue_and_dispatch(registry: Registry, settings: Any, run_ids: list[int], *,
                         backend: str, why: str) -> list[int]:
    """Auto-requeue: back to queued and submitted again on `backend`, with the resources of
    each run's last dispatch; the ids dispatched."""
    groups = dispatch_groups(registry, settings, run_ids, backend)
    moved = move_to_queued(registry, run_ids, why)
    return [rid for group in groups for rid in _dispatch_group(registry, settings, group, moved)]


@dataclass
class CancelResult:
    cancelled: list[tuple[int, str]] = field(default_factory=list)
    #: Runs named on the command line that were not open: key -> why.
    skipped: dict[str, str] = field(default_factory=dict)
    #: (run id, key, state) of the runs whose worker had already written its final exit.json:
    #: settled as reconciliation would (succeeded, failed), not cancelled.
    settled: list[tuple[int, str, str]] = field(default_factory=list)
    #: backend -> job ids the scheduler was asked to cancel.
    jobs: dict[str, list[str]] = field(default_factory=dict)
    dry_run: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"cancelled": [{"id": rid, "run": key} for rid, key in self.cancelled],
                "settled": [{"id": rid, "run": key, "state": state}
                            for rid, key, state in self.settled],
                "skipped": self.skipped,
                "jobs": self.jobs, "dry_run": self.dry_run}


def _settle_exited(registry: Registry, result: CancelResult, run_ids: list[int]) -> None:
    """Settle those of `run_ids` whose worker wrote its final exit.json, and take them out of
    `result.cancelled`: cancelled -> succeeded is not a move, and no round reconciles a
    cancelled run, so cancelling a run that had finished would lose its result for good."""
    from orchestrator.reconcile import settle_exited

    settled = settle_exited(registry, run_ids, dry_run=result.dry_run)
    result.settled += [(t.run_id, t.key, t.to_state) for t in settled]
    done = {t.run_id for t in settled}
    result.cancelled = [(rid, key) for rid, key in result.cancelled if rid not in done]


def cancel(registry: Registry, settings: Any, run_filter: RunFilter, *,
           dry_run: bool = False) -> CancelResult:
    """Cancel the queued and active runs matching the filter: the scheduler first (one call per
    backend), then the registry (-> cancelled, reason cancelled on the attempt). Runs whose
    worker already wrote its final exit.json are settled by it instead, before and again after
    the scheduler's cancel (a job may end meanwhile)."""
    from orchestrator.dispatching import dispatch_lock, recover_pending
    from orchestrator.registry.models import utcnow
    from orchestrator.registry.queries import select_runs

    result = CancelResult(dry_run=dry_run)
    open_states = [RunState.QUEUED.value, RunState.SUBMITTED.value, RunState.RUNNING.value]
    with dispatch_lock(settings, registry=registry):
        if not dry_run:
            recover_pending(registry, settings)
        with registry.session() as session:
            runs = [(run.id, run.key, run.state) for run in session.scalars(
                select_runs(run_filter).where(Run.state.in_(open_states)))]
            result.skipped = {run.key: f"it is already {run.state}"
                              for run in _named_runs(session, run_filter)
                              if run.state not in open_states}
        result.cancelled = [(rid, key) for rid, key, _ in runs]
        active = [rid for rid, _, state in runs if state != RunState.QUEUED.value]
        _settle_exited(registry, result, active)
        open_ids = {rid for rid, _ in result.cancelled}
        with registry.session() as session:
            jobs = {rid: (job.id, job.backend, job.job_id, job.ended_at) for rid, job in
                    _newest_jobs(session, [rid for rid in active if rid in open_ids]).items()}
        for _pk, backend, job_id, ended_at in jobs.values():
            if job_id and ended_at is None:
                result.jobs.setdefault(backend, []).append(job_id)
        if dry_run or not result.cancelled:
            return result
        for backend, job_ids in result.jobs.items():
            get_scheduler(backend, settings).cancel(job_ids)
        # A job may end while it is being cancelled (the local backend waits for its
        # workers): one whose worker wrote its final exit.json meanwhile is settled too.
        _settle_exited(registry, result, list(jobs))
        now = utcnow()
        with registry.write() as session:
            for run in session.scalars(select(Run).where(
                    Run.id.in_([rid for rid, _ in result.cancelled]),
                    Run.state.in_(open_states))):
                session.add(Event(run_id=run.id, at=now, from_state=run.state,
                                  to_state=RunState.CANCELLED.value, why="cancelled by the user"))
                run.state = RunState.CANCELLED.value
                job = jobs.get(run.id)
                if job is not None:
                    session.execute(Job.__table__.update().where(Job.id == job[0]).values(
                        reason=Reason.CANCELLED.value, ended_at=now,
                        scheduler_state="cancelled"))
    return result


@dataclass
class LogFile:
    attempt: int
    stream: str
    path: Path
    text: str


#: The first line the job script writes into each log (templates/job.sh.tmpl).
_LOG_HEADER = re.compile(r"satrl job: batch (\S+), index")


def _log_batches(folder: Path, numbers: list[int]) -> dict[int, str]:
    """log number -> the batch its job script named in the log's first line."""
    found: dict[int, str] = {}
    for number in numbers:
        try:
            with (folder / f"attempt-{number}.out").open(errors="replace") as handle:
                match = _LOG_HEADER.match(handle.readline())
        except OSError:
            continue
        if match:
            found[number] = match.group(1)
    return found


def read_logs(registry: Registry, run_ref: str, experiment: str, *, attempt: int | None = None,
              tail: int | None = None, streams: tuple[str, ...] = ("out", "err")
              ) -> list[LogFile]:
    """The job logs of one attempt of a run (default: the newest), numbered as `satrl show`
    numbers its jobs. The job script names its files logs/attempt-<n>.out|.err with n the
    lowest number free, which falls behind the registry's attempts when a job never started
    (cancelled while pending); each log's first line names its batch, which says its job."""
    from orchestrator.registry.queries import resolve_run

    with registry.session() as session:
        run = resolve_run(session, run_ref, experiment)
        run_dir, key = run.run_dir, run.key
        batches = {job.batch: job.attempt for job in session.scalars(
            select(Job).where(Job.run_id == run.id).order_by(Job.attempt))}
    if not run_dir:
        raise NotFoundError(f"run {key} has not been dispatched: it has no run directory yet")
    folder = Path(run_dir) / "logs"
    numbers = sorted(int(p.stem.split("-")[1]) for p in folder.glob("attempt-*.out")
                     if p.stem.split("-")[1].isdigit()) if folder.is_dir() else []
    if not numbers:
        raise NotFoundError(f"run {key} has no job logs yet in {folder}")
    # attempt -> log number; a log without a known batch (an older satrl's) keeps its number.
    logs: dict[int, int] = {}
    named = _log_batches(folder, numbers)
    for number in numbers:
        logs[batches.get(named.get(number, ""), number)] = number
    if attempt is None:
        attempt = max(logs, key=lambda a: logs[a])
    elif attempt not in logs:
        never = " (its job never started)" if attempt in batches.values() else ""
        raise UsageError(f"run {key} has no logs of attempt {attempt}{never}; attempts with "
                         f"logs: {', '.join(map(str, sorted(logs)))}")
    if tail is not None and tail < 0:
        raise UsageError("--tail must be >= 0")
    files = []
    for stream in streams:
        path = folder / f"attempt-{logs[attempt]}.{stream}"
        text = path.read_text(errors="replace") if path.is_file() else ""
        if tail is not None:
            lines = text.splitlines(keepends=True)
            text = "".join(lines[-tail:]) if tail else ""
        files.append(LogFile(attempt, stream, path, text))
    return files
