"""`satrl dispatch`: queued runs become scheduler jobs, without losing or doubling any.

For each batch (an array of at most `[dispatch] max_array` runs of one experiment):

1. claim: in one transaction, the runs go queued -> submitted (only those still queued), each
   gets a jobs row holding the batch token (the job's name) and no job id yet; committed;
2. the run directories get their run.json (atomically) and logs/; the job script is written;
3. submit (sbatch / qsub / the local runner);
4. record the job ids in a second transaction.

A crash between 3 and 4 leaves jobs rows with a token and no id. The next dispatch, sync or status
(`recover_pending`) asks the scheduler for jobs of that name: found, the ids are recorded; not
found and the run directory shows no sign of the job, the runs go back to queued. A failed
submission (a refusal, a timeout) is looked up by name at once the same way: found, its ids are
recorded; not found, the runs go back to queued with an event saying why; the scheduler not
answering, the claim stays for the next recovery. A submit command that could not even be started
(not installed, not executable) submitted nothing: the runs go back to queued at once. A recovery
whose scheduler cannot be asked leaves that backend's batches pending with a warning and goes on,
so that one unreachable scheduler blocks no dispatch or cancel of other runs. Dispatches of one
workspace are serialised by a file lock, so recovery never mistakes a submission in flight for a
crashed one.
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Select, func, select, update
from sqlalchemy.orm import aliased

from agents.spec import RunSpec
from orchestrator import lifecycle
from orchestrator.errors import SatrlError, SchedulerError, UsageError
from orchestrator.paths import run_dir as run_dir_path
from orchestrator.registry.db import Registry
from orchestrator.registry.models import Event, Experiment, Job, Run, RunState, epoch, utcnow
from orchestrator.registry.queries import RunFilter, select_runs
from orchestrator.resources import GENERIC_KEYS, Resources, resolve_resources
from orchestrator.schedulers import batches_folder, get_scheduler, python_interpreter
from orchestrator.schedulers.base import (
    Batch,
    BatchMember,
    CommandNotStarted,
    Scheduler,
    config_flag,
    config_number,
)
from orchestrator.schedulers.procs import read_json, write_json_atomic

#: Largest array by default (Slurm's default MaxArraySize is 1001; PBS's max_array_size 10000).
DEFAULT_MAX_ARRAY = 1000
#: Seconds between two rounds of `dispatch --wait` unless [dispatch] wait_interval_s says.
DEFAULT_WAIT_INTERVAL_S = 2.0
#: The worker's deadline margin of a spec without one (agents.spec.RunSpec's default), s.
DEFAULT_DEADLINE_MARGIN_S = 300.0
#: What Apptainer's --bind splits a value on (binds by ',', source:destination by ':').
BIND_SEPARATORS = (",", ":")


@dataclass(frozen=True)
class DispatchRequest:
    run_filter: RunFilter
    backend: str | None = None
    limit: int | None = None
    #: Resource overrides from the command line (None values are ignored).
    resources: dict[str, Any] = field(default_factory=dict)


@dataclass
class PlannedBatch:
    """A batch as `--dry-run` shows it and dispatch submits it."""

    batch: Batch
    runs: list[tuple[int, str]]
    command: list[str]
    script: str
    job_ids: tuple[str, ...] = ()
    #: The resources the command line asked for (kept with the batch for a requeue).
    overrides: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"token": self.batch.token, "runs": [rid for rid, _ in self.runs],
                "keys": [key for _, key in self.runs], "command": self.command,
                "script_path": str(self.batch.script_path), "job_ids": list(self.job_ids)}


@dataclass
class DispatchResult:
    backend: str
    resources: Resources
    batches: list[PlannedBatch]
    dry_run: bool
    recovered: int = 0
    #: Why interrupted dispatches could not be recovered (also warned on stderr).
    warnings: list[str] = field(default_factory=list)

    @property
    def run_ids(self) -> list[int]:
        return [rid for planned in self.batches for rid, _ in planned.runs]

    def to_json(self) -> dict[str, Any]:
        return {"backend": self.backend, "dry_run": self.dry_run, "recovered": self.recovered,
                "warnings": self.warnings,
                "resources": self.resources.to_json(), "runs": len(self.run_ids),
                "batches": [b.to_json() for b in self.batches]}


def new_token() -> str:
    """A batch token: the job name (letters first, as PBS wants; short, as squeue shows)."""
    return f"satrl-{secrets.token_hex(5)}"


#: PostgreSQL advisory lock key of dispatches (distinct from registry.db.PG_MIGRATION_LOCK).
PG_DISPATCH_LOCK = 0x5A7A2
#: Seconds a blocking dispatch lock waits.
LOCK_WAIT_S = 600.0


@contextlib.contextmanager
def dispatch_lock(settings: Any, *, blocking: bool = True,
                  registry: Registry | None = None) -> Iterator[bool]:
    """The dispatch lock; yields False when not blocking and someone holds it.

    A file lock in the workspace, and with a PostgreSQL registry (a lab's, shared by several
    workspaces or machines) also an advisory lock on the database, so that no two dispatchers
    of one registry ever take each other's claims for crashed ones.
    """
    with _file_lock(settings, blocking) as held:
        if not held or registry is None or registry.is_sqlite:
            yield held
            return
        with _pg_lock(registry, blocking) as pg_held:
            yield pg_held


@contextlib.contextmanager
def _pg_lock(registry: Registry, blocking: bool) -> Iterator[bool]:
    from sqlalchemy import text

    # Session-level lock on a connection of its own, in autocommit (never idle in a transaction).
    with registry.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        deadline = time.monotonic() + LOCK_WAIT_S
        while not conn.scalar(text("SELECT pg_try_advisory_lock(:key)"),
                              {"key": PG_DISPATCH_LOCK}):
            if not blocking:
                yield False
                return
            if time.monotonic() > deadline:
                raise SatrlError("another satrl dispatch of this registry holds its lock "
                                 f"(PostgreSQL advisory lock {PG_DISPATCH_LOCK})")
            time.sleep(0.5)
        try:
            yield True
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": PG_DISPATCH_LOCK})


@contextlib.contextmanager
def _file_lock(settings: Any, blocking: bool) -> Iterator[bool]:
    from filelock import FileLock, Timeout

    folder = Path(settings.workspace) / ".satrl"
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / "dispatch.lock"))
    try:
        lock.acquire(timeout=LOCK_WAIT_S if blocking else 0)
    except Timeout:
        if blocking:
            raise SatrlError(f"another satrl dispatch holds {folder / 'dispatch.lock'}") from None
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def dispatch(registry: Registry, settings: Any, request: DispatchRequest, *,
             dry_run: bool = False) -> DispatchResult:
    """Submit the queued runs matching the request; see the module's docstring."""
    backend = request.backend or settings.backend
    scheduler = get_scheduler(backend, settings)
    resources = resolve_resources(settings, backend, request.resources)
    if request.limit is not None and request.limit < 1:
        raise UsageError("--limit must be at least 1")
    check_config(settings, scheduler)
    with registry.session() as session:
        check_walltime(resources, list(session.scalars(queued_runs(request))))
    with dispatch_lock(settings, registry=registry):
        recovery = Recovery() if dry_run else recover_pending(registry, settings)
        planned = plan_batches(registry, settings, scheduler, resources, request)
        result = DispatchResult(backend, resources, planned, dry_run, recovery.recovered,
                                list(recovery.skipped.values()))
        if dry_run:
            return result
        for index, batch in enumerate(planned):
            try:
                submit_batch(registry, scheduler, batch)
            except SatrlError as error:
                message = _partial_dispatch_message(error, planned[:index], planned[index + 1:])
                if message is None:
                    raise
                raise SatrlError(message, exit_code=error.exit_code) from error
        result.batches = [b for b in planned if b.job_ids]
    return result


def _partial_dispatch_message(error: SatrlError, before: list[PlannedBatch],
                              after: list[PlannedBatch]) -> str | None:
    """`error`'s message saying which batches went out before it (recorded, running) and that
    later ones stay queued; None when none went out. A partial dispatch must not read as one
    that did nothing."""
    submitted = [b for b in before if b.job_ids]
    if not submitted:
        return None
    runs = sum(len(b.runs) for b in submitted)
    ids = ", ".join(b.job_ids[0] if len(b.job_ids) == 1 else f"{b.job_ids[0]} .. {b.job_ids[-1]}"
                    for b in submitted)
    waiting = sum(len(b.runs) for b in after)
    return (f"{error} (before it, {len(submitted)} batch(es) were submitted and recorded: "
            f"{runs} run(s) as {ids}"
            + (f"; {waiting} run(s) of later batches stay queued" if waiting else "")
            + "; `satrl dispatch` again submits what is still queued)")


def check_config(settings: Any, scheduler: Scheduler) -> None:
    """The dispatch area's numbers of satrl.toml, checked before anything is claimed."""
    from orchestrator.reconcile import DEFAULT_LOST_GRACE_S, DEFAULT_MAX_ATTEMPTS

    table, source = settings.section("dispatch"), "satrl.toml [dispatch]"
    config_number(table, "max_array", DEFAULT_MAX_ARRAY, source, minimum=1)
    config_number(table, "max_attempts", DEFAULT_MAX_ATTEMPTS, source, minimum=1)
    config_number(table, "lost_grace_s", DEFAULT_LOST_GRACE_S, source, kind=float)
    config_number(table, "wait_interval_s", DEFAULT_WAIT_INTERVAL_S, source, kind=float,
                  minimum=0.1)
    config_flag(table, "auto_requeue", False, source)
    python_interpreter(settings)
    scheduler.check_config()


def deadline_margin_s(run: Run) -> float:
    """How long before SATRL_DEADLINE the run's worker checkpoints and exits, s."""
    return float(run.spec.get("deadline_margin_s", DEFAULT_DEADLINE_MARGIN_S))


def check_walltime(resources: Resources, runs: list[Run]) -> None:
    """Refuse a walltime no longer than a run's deadline margin: the job script sets
    SATRL_DEADLINE walltime_s ahead and the worker stops margin_s before it, so every attempt
    would stop at once with reason walltime, and auto-requeue would burn max_attempts."""
    if resources.walltime_s <= 0 or not runs:
        return  # no time limit (local backend): no deadline either
    worst = max(runs, key=deadline_margin_s)
    margin_s = deadline_margin_s(worst)
    if resources.walltime_s > margin_s:
        return
    raise UsageError(
        f"walltime_min {resources.walltime_min:g} ({resources.walltime_s} s) must exceed the "
        f"worker's deadline margin of {margin_s:g} s (deadline_margin_s of run {worst.key}): "
        "every attempt would stop at once; raise --walltime-min (or walltime_min in satrl.toml)")


def queued_runs(request: DispatchRequest) -> Select[tuple[Run]]:
    """The select of the queued runs a dispatch of `request` submits."""
    statement = select_runs(request.run_filter).where(Run.state == RunState.QUEUED.value)
    return statement.limit(request.limit) if request.limit else statement


def plan_batches(registry: Registry, settings: Any, scheduler: Scheduler,
                 resources: Resources, request: DispatchRequest) -> list[PlannedBatch]:
    """The queued runs of the request, grouped into batches with their scripts and commands."""
    from orchestrator.images import resolve_job_image

    statement = queued_runs(request)
    max_array = int(config_number(settings.section("dispatch"), "max_array", DEFAULT_MAX_ARRAY,
                                  "satrl.toml [dispatch]", minimum=1))
    planned: list[PlannedBatch] = []
    with registry.session() as session:
        runs = list(session.scalars(statement))
        by_experiment: dict[int, list[Run]] = {}
        for run in runs:
            by_experiment.setdefault(run.experiment_id, []).append(run)
        for experiment_id, group in by_experiment.items():
            experiment = session.get(Experiment, experiment_id)
            image = resolve_job_image(session, settings, experiment)
            launch = launch_command(settings, image)
            for start in range(0, len(group), max_array):
                chunk = group[start:start + max_array]
                token = new_token()
                members = tuple(
                    BatchMember(run.id, run_dir_path(settings.scratch, experiment.name, run.game,
                                                     run.attn, run.seed)) for run in chunk)
                # Again per batch: recovery may have put more runs back in the queue.
                check_walltime(resources, chunk)
                margin = max(deadline_margin_s(run) for run in chunk)
                batch = Batch(token, members, resources, batches_folder(settings) / token,
                              launch, image.digest if image else None,
                              int(math.ceil(margin)))
                planned.append(PlannedBatch(batch, [(run.id, run.key) for run in chunk],
                                            scheduler.submit_command(batch),
                                            scheduler.render_script(batch),
                                            overrides=command_line_resources(request)))
    return planned


#: In a batch folder: the resources its dispatch took from the command line, so that a
#: requeue (by hand or automatic) asks for them again instead of satrl.toml's defaults.
REQUESTED_RESOURCES_JSON = "requested_resources.json"


def command_line_resources(request: DispatchRequest) -> dict[str, Any]:
    return {key: value for key, value in request.resources.items() if value is not None}


def requested_resources(settings: Any, token: str | None) -> dict[str, Any]:
    """The command-line resources batch `token` was dispatched with; {} when unknown (a batch
    of an older satrl, or a folder scratch lost): satrl.toml's then apply alone."""
    if not token:
        return {}
    data = read_json(batches_folder(settings) / token / REQUESTED_RESOURCES_JSON)
    # Checked again by resolve_resources; keys it does not know would be ignored there.
    return {k: v for k, v in (data or {}).items() if k in GENERIC_KEYS}


def check_dispatchable(registry: Registry, settings: Any, backend: str, run_ids: list[int],
                       overrides: dict[str, Any]) -> None:
    """What `dispatch` of these runs would refuse, refused now (before a requeue moves them)."""
    scheduler = get_scheduler(backend, settings)
    resources = resolve_resources(settings, backend, overrides)
    check_config(settings, scheduler)
    with registry.session() as session:
        check_walltime(resources, list(session.scalars(select(Run).where(Run.id.in_(run_ids)))))


def launch_command(settings: Any, image: Any) -> tuple[str, ...]:
    """The worker's command before RUN_DIR: the configured python, or `apptainer exec` of the
    image's python with scratch bound at the same path (run directories keep their paths)."""
    if image is None:
        return (python_interpreter(settings), "-m", "agents.train")
    from orchestrator.images import apptainer_exec_argv

    section = settings.section("image")
    scratch = str(settings.scratch)
    for separator in BIND_SEPARATORS:
        if separator in scratch:
            raise UsageError(
                f"the scratch path {scratch} contains {separator!r}, on which apptainer splits "
                "--bind: jobs in an image cannot bind it; choose a scratch path without ',' or "
                "':' ([paths] scratch in satrl.toml, or SATRL_SCRATCH)")
    binds = [f"{scratch}:{scratch}", *[str(b) for b in section.get("binds", [])]]
    return tuple(apptainer_exec_argv(image, binds, [str(section.get("python", "python")), "-m",
                                                    "agents.train"]))


def submit_batch(registry: Registry, scheduler: Scheduler, planned: PlannedBatch) -> None:
    """Claim, prepare, submit and record one batch (module docstring, steps 1-4)."""
    batch = planned.batch
    claimed = claim_runs(registry, scheduler.name, batch)
    if not claimed:
        return
    if len(claimed) < len(batch.members):  # another dispatcher took some: submit the rest
        batch = Batch(batch.token, tuple(m for m in batch.members if m.run_id in claimed),
                      batch.resources, batch.folder, batch.launch, batch.image_digest,
                      batch.signal_margin_s)
        planned.batch = batch
        planned.runs = [(rid, key) for rid, key in planned.runs if rid in claimed]
    try:
        with registry.session() as session:
            specs = {run.id: run.spec for run in session.scalars(
                select(Run).where(Run.id.in_(list(claimed))))}
        for member in batch.members:
            prepare_run_dir(member.run_dir, specs[member.run_id], member.run_id)
    except (SatrlError, OSError) as error:
        release_claim(registry, batch.token, f"submission failed: {error}")
        raise
    try:
        batch.folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(batch.folder / REQUESTED_RESOURCES_JSON, planned.overrides)
    except OSError as error:
        release_claim(registry, batch.token, f"submission failed: {error}")
        raise SatrlError(f"cannot write {batch.folder / REQUESTED_RESOURCES_JSON}: {error}"
                         ) from None
    try:
        submission = scheduler.submit(batch)
    except CommandNotStarted as error:
        # The submit command never ran (not installed, not executable): certainly nothing was
        # submitted, and asking the scheduler (whose tools are likely missing too) is moot.
        released = release_claim(registry, batch.token, f"submission failed: {error.reason}")
        raise CommandNotStarted(f"{error.reason} (nothing was submitted: {len(released)} "
                                "run(s) stay queued)", command=error.command,
                                script=error.script) from None
    except (SatrlError, OSError) as error:
        # A timeout (or an answer we could not read) does not say the scheduler refused the
        # job: look for it by name before putting the runs back in the queue.
        planned.job_ids = resolve_unclear_submission(registry, scheduler, batch, error)
        return
    record_submission(registry, batch.token, dict(enumerate(submission.job_ids)),
                      submission.array_job_id)
    planned.job_ids = submission.job_ids


def resolve_unclear_submission(registry: Registry, scheduler: Scheduler, batch: Batch,
                               error: Exception) -> tuple[str, ...]:
    """After a failed submit: the ids if the scheduler has the batch after all (recorded);
    else the claim is released and `error` raised. When the scheduler cannot be asked, the
    claim stays (token, no id) for recover_pending and a SchedulerError says so."""
    try:
        found = scheduler.find_by_names([batch.token], {batch.token: len(batch.members)})
    except SatrlError as lookup_error:
        raise SchedulerError(
            f"{error}; whether {scheduler.name} accepted batch {batch.token} is unknown "
            f"({lookup_error}); the next dispatch, sync or status looks for it again") from error
    members = found.get(batch.token)
    if not members:
        release_claim(registry, batch.token, f"submission failed: {error}")
        raise error
    array_id = _array_id(scheduler.name, [members[i] for i in sorted(members)])
    record_submission(registry, batch.token, members, array_id)
    return tuple(members[i] for i in sorted(members))


def claim_runs(registry: Registry, backend: str, batch: Batch) -> set[int]:
    """Transaction 1: queued -> submitted with a jobs row (token, no id); the runs claimed."""
    claimed: set[int] = set()
    now = utcnow()
    with registry.write() as session:
        for member in batch.members:
            changed = session.execute(
                update(Run).where(Run.id == member.run_id, Run.state == RunState.QUEUED.value)
                .values(state=RunState.SUBMITTED.value, attempts=Run.attempts + 1,
                        run_dir=str(member.run_dir), updated_at=now)
                .execution_options(synchronize_session=False)
            ).rowcount
            if not changed:
                continue
            attempts = session.scalar(select(Run.attempts).where(Run.id == member.run_id))
            session.add(Job(run_id=member.run_id, attempt=attempts, backend=backend,
                            batch=batch.token, array_index=len(claimed),
                            scheduler_state="submitting",
                            submitted_at=now))
            session.add(Event(run_id=member.run_id, at=now, from_state=RunState.QUEUED.value,
                              to_state=RunState.SUBMITTED.value,
                              why=f"dispatched to {backend} in batch {batch.token}"))
            claimed.add(member.run_id)
    return claimed


def prepare_run_dir(run_dir: Path, spec: dict[str, Any], run_id: int) -> None:
    """run.json (atomically), logs/, and a previous attempt's exit.json moved into logs/."""
    from agents.rundir import EXIT_JSON, LOGS_DIR, read_json, write_bytes

    (run_dir / LOGS_DIR).mkdir(parents=True, exist_ok=True)
    old_exit = run_dir / EXIT_JSON
    if old_exit.exists():
        # exit.json describes the attempt that ended; the next one must not be judged by it.
        data = read_json(old_exit)
        attempt = data.get("attempt") if isinstance(data, dict) else None
        target = run_dir / LOGS_DIR / f"exit-attempt-{attempt or int(time.time())}.json"
        os.replace(old_exit, target)
    import json

    body = RunSpec.from_dict(spec).replace(run_id=run_id).to_dict()
    write_bytes(run_dir / "run.json", (json.dumps(body, indent=2) + "\n").encode())


def record_submission(registry: Registry, token: str, job_ids: Mapping[int, str],
                      array_job_id: str | None) -> int:
    """Transaction 2: the scheduler's ids ({array index: job id}) on the batch's jobs rows.

    Only the rows whose index has an id change: a scheduler may list just some of an array's
    tasks (Slurm forgets finished ones, PBS keeps no history). submitted_at stays the claim
    time, the earliest moment files of this job can date from. Returns the rows updated.
    """
    now = utcnow()
    updated = 0
    with registry.write() as session:
        for job in session.scalars(select(Job).where(Job.batch == token,
                                                     Job.array_index.in_(list(job_ids)))):
            job.job_id = job_ids[job.array_index]
            job.array_job_id = array_job_id
            job.scheduler_state = "submitted"
            job.seen_at = now
            updated += 1
    return updated


def release_claim(registry: Registry, token: str, why: str) -> list[int]:
    """Undo transaction 1 of a batch the scheduler never got: runs back to queued."""
    released = []
    now = utcnow()
    with registry.write() as session:
        for job in list(session.scalars(select(Job).where(Job.batch == token,
                                                          Job.job_id.is_(None)))):
            run = session.get(Run, job.run_id)
            if run is not None and run.state == RunState.SUBMITTED.value:
                lifecycle.check_transition(run.state, RunState.QUEUED)
                run.state = RunState.QUEUED.value
                run.attempts = max(0, run.attempts - 1)
                session.add(Event(run_id=run.id, at=now, from_state=RunState.SUBMITTED.value,
                                  to_state=RunState.QUEUED.value, why=why))
                released.append(run.id)
                session.delete(job)
    return released


@dataclass
class Recovery:
    """What one recover_pending did."""

    #: Runs whose interrupted submission was finished (ids recorded) or undone (queued again).
    recovered: int = 0
    #: backend -> the line reported for it: its scheduler could not be asked, so its pending
    #: batches stay as they are.
    skipped: dict[str, str] = field(default_factory=dict)


def warn_line(message: str) -> None:
    """A warning as one line on stderr, for callers whose result has no place for it."""
    print(f"warning: {message}", file=sys.stderr)


def recover_pending(registry: Registry, settings: Any, *,
                    report: Callable[[str], None] = warn_line) -> Recovery:
    """Finish or undo submissions interrupted by a crash (jobs rows with a token, no id).

    Call it holding the dispatch lock. A backend whose scheduler cannot be asked (its query
    command missing, failing or timing out) is skipped with one line to `report`: its batches
    stay pending, which is safe (their runs stay claimed, so no dispatch takes them again, and
    the next recovery asks again), where an error would block every dispatch and cancel of
    unrelated runs, on every backend, until that scheduler answers.
    """
    later = aliased(Job)
    newest = select(func.max(later.id)).where(later.run_id == Job.run_id).scalar_subquery()
    with registry.session() as session:
        # Running runs too: a heartbeat may have started a run whose ids were never recorded.
        pending = list(session.execute(
            select(Job.batch, Job.backend, Job.submitted_at, Job.run_id, Run.run_dir, Run.state)
            .join(Run, Run.id == Job.run_id)
            .where(Job.job_id.is_(None), Job.batch.is_not(None), Job.ended_at.is_(None),
                   Job.id == newest,
                   Run.state.in_([RunState.SUBMITTED.value, RunState.RUNNING.value]))))
    recovery = Recovery()
    if not pending:
        return recovery
    by_backend: dict[str, set[str]] = {}
    for token, backend, *_ in pending:
        by_backend.setdefault(backend, set()).add(token)
    for backend, tokens in by_backend.items():
        sizes = {token: sum(1 for row in pending if row[0] == token) for token in tokens}
        try:
            found = get_scheduler(backend, settings).find_by_names(sorted(tokens), sizes)
        except SatrlError as error:
            recovery.skipped[backend] = (
                f"interrupted batch(es) {', '.join(sorted(tokens))} on {backend} stay pending "
                f"(their runs stay submitted): {error}; the next dispatch, sync or status "
                "looks for them again")
            report(recovery.skipped[backend])
            continue
        for token in tokens:
            members = found.get(token)
            if members:
                array_id = _array_id(backend, [members[i] for i in sorted(members)])
                recovery.recovered += record_submission(registry, token, members, array_id)
            elif not any(row[5] == RunState.RUNNING.value for row in pending
                         if row[0] == token) \
                    and not _shows_activity([(row[4], row[2]) for row in pending
                                             if row[0] == token]):
                # Unlisted and no sign of it ran: never submitted. Otherwise its runs stay and
                # reconcile loses them after the grace period (they have no id to ask about).
                recovery.recovered += len(release_claim(
                    registry, token, f"batch {token} never reached the {backend} scheduler "
                    "(dispatch was interrupted); queued again"))
    return recovery


def _array_id(backend: str, ids: list[str]) -> str | None:
    if backend == "slurm":
        return ids[0].split("_")[0]
    if backend == "pbs":
        return ids[0].split("[")[0] + "[]." + ids[0].split(".", 1)[1] if "[" in ids[0] else None
    return ids[0].split("[")[0]


def _shows_activity(members: list[tuple[str | None, datetime | None]]) -> bool:
    """Whether a job of this batch ran although the scheduler does not list it: a job log
    written after the batch was claimed."""
    for run_dir, claimed_at in members:
        if not run_dir:
            continue
        since = (epoch(claimed_at) or 0.0) - 1.0
        for log in Path(run_dir, "logs").glob("attempt-*.out"):
            with contextlib.suppress(OSError):
                if log.stat().st_mtime >= since:
                    return True
    return False


