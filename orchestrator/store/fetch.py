"""`satrl fetch`: bring runs' results from their run directories into the store, verified, and
make them queryable. The service the command calls: select runs, plan, copy, ingest.

Each run is ingested in its own transaction from its verified copies, and the copies are renamed
into the store in that transaction, after its rows are written: a run whose ingestion fails
leaves store and registry as they were, so that they do not disagree. A run whose records are
unreadable is reported and skipped (the others go on).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from orchestrator import paths
from orchestrator.errors import UsageError
from orchestrator.registry.db import Registry
from orchestrator.registry.models import Experiment, Run, RunState
from orchestrator.registry.queries import RunFilter
from orchestrator.settings import Settings
from orchestrator.store import ingest
from orchestrator.store.copying import (
    FileReport,
    RunPlan,
    RunTarget,
    StagedRun,
    plan_run,
    stage_run,
)
from orchestrator.store.layout import CheckpointChoice
from orchestrator.store.manifest import RunDirError
from orchestrator.store.sources import Source, SourceError, source_from_settings

MetricRows = list[tuple[int, str, float]]


@dataclass(frozen=True)
class FetchRequest:
    kinds: frozenset[str]
    checkpoints: CheckpointChoice


@dataclass
class RunResult:
    """One run's fetch: its files' fates and the rows ingested (None: unchanged, not rewritten)."""

    run_id: int
    key: str
    experiment: str
    source: str = ""
    store_dir: str = ""
    exited: bool = False
    files: list[FileReport] = field(default_factory=list)
    error: str | None = None
    exit_code: int = 0
    evaluations: int | None = None
    metrics: int | None = None
    attempts_recorded: int | None = None

    def count(self, status: str) -> int:
        return sum(1 for f in self.files if f.status == status)

    @property
    def problems(self) -> list[FileReport]:
        return [f for f in self.files if f.status == "problem"]

    @property
    def bytes_copied(self) -> int:
        return sum(f.size_bytes for f in self.files if f.status == "copied")

    @property
    def ok(self) -> bool:
        return self.error is None and not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id, "run": self.key, "experiment": self.experiment,
            "source": self.source, "store_dir": self.store_dir, "exited": self.exited,
            "copied": self.count("copied"), "unchanged": self.count("unchanged"),
            "problems": len(self.problems), "bytes_copied": self.bytes_copied,
            "evaluation_rows": self.evaluations, "metric_rows": self.metrics,
            "attempts_recorded": self.attempts_recorded, "error": self.error,
            "files": [f.to_json() for f in self.files],
        }


def select_targets(session: Session, settings_: Settings, run_filter: RunFilter, *,
                   finished_only: bool = False, dispatched_only: bool = False
                   ) -> list[RunTarget]:
    """The runs to fetch, with their source run directory and store folder."""
    statement = run_filter.apply(
        select(Run, Experiment.name).join(Experiment, Run.experiment_id == Experiment.id)
        # An imported study's results came from a file into the registry: no run directory.
        .where(Experiment.imported.is_not(True))
    ).order_by(Experiment.name, Run.game, Run.attn, Run.seed)
    scratch = source_scratch(settings_)
    targets = []
    for run, experiment in session.execute(statement):
        state = RunState(run.state)
        if finished_only and not state.is_terminal():
            continue
        if dispatched_only and state == RunState.QUEUED and not run.run_dir:
            continue  # never handed to a scheduler: nothing to fetch
        run_dir = run.run_dir or str(paths.run_dir(scratch, experiment, run.game, run.attn,
                                                   run.seed))
        targets.append(RunTarget(run.id, experiment, run.game, run.attn, run.seed,
                                 run.spec_hash, run.state, run_dir, settings_.store))
    return targets


def source_scratch(settings_: Settings) -> Path:
    """Scratch as the source sees it: [fetch] scratch for a remote host, else the workspace's."""
    section = settings_.section("fetch")
    remote = section.get("scratch")
    if section.get("host") and isinstance(remote, str):
        return Path(remote)
    return settings_.scratch


def open_source(settings_: Settings) -> Source:
    return source_from_settings(settings_.section("fetch"))


@dataclass
class Fetch:
    """A planned fetch: runs that can be fetched (plans) and runs that cannot (results)."""

    plans: list[RunPlan]
    failed: list[RunResult]

    @property
    def bytes_to_copy(self) -> int:
        return sum(plan.bytes_to_copy for plan in self.plans)

    @property
    def files_to_copy(self) -> int:
        return sum(len(plan.to_copy) for plan in self.plans)


def plan_fetch(source: Source, targets: list[RunTarget], request: FetchRequest,
               on_run: Callable[[RunTarget], None] | None = None) -> Fetch:
    plans, failed = [], []
    for target in targets:
        try:
            plans.append(plan_run(source, target, request.kinds, request.checkpoints))
        except (RunDirError, SourceError) as error:
            failed.append(RunResult(target.run_id, target.key, target.experiment,
                                    source=source.describe(target.run_dir),
                                    store_dir=str(target.store_dir), error=str(error),
                                    exit_code=error.exit_code))
        if on_run:
            on_run(target)
    if "checkpoint" in request.kinds:
        _check_steps_exist(plans, request.checkpoints)
    return Fetch(plans, failed)


def _check_steps_exist(plans: list[RunPlan], choice: CheckpointChoice) -> None:
    """UsageError, before anything is copied, for an asked-for step no run has a checkpoint
    of: a typo'd step would otherwise fetch nothing and look like success. A step that only
    some runs have is taken where it is (the others have not reached it, or never will)."""
    if choice.mode != "steps" or not plans:
        return
    have = frozenset().union(*(plan.checkpoint_steps for plan in plans))
    missing = sorted(choice.steps - have)
    if missing:
        whose = plans[0].target.key if len(plans) == 1 else f"any of the {len(plans)} runs"
        steps = ", ".join(f"{step:,}" for step in missing)
        listed = ", ".join(f"{step:,}" for step in sorted(have)) or "none yet"
        raise UsageError(f"no checkpoint at step {steps} in {whose} (checkpoints: {listed}); "
                         "nothing fetched")


def run_fetch(registry: Registry, source: Source, plan: RunPlan,
              on_bytes: Callable[[int], None] | None = None) -> RunResult:
    """Copy one planned run, ingest what its files say, and then put the copies in the store."""
    target = plan.target
    result = RunResult(target.run_id, target.key, target.experiment, source=plan.source,
                       store_dir=str(target.store_dir), exited=plan.exited)
    try:
        with stage_run(source, plan, on_bytes) as staged:
            result.files = staged.reports
            ingest_run(registry, staged, result)
    except SourceError as error:
        result.error, result.exit_code = str(error), error.exit_code
    return result


@dataclass
class RunContent:
    """What a run's files say, parsed before anything is written or installed."""

    evaluations: tuple[FileReport, ingest.Evaluations] | None = None
    metrics: tuple[FileReport, list[str], MetricRows] | None = None
    monitors: tuple[list[FileReport], MetricRows] | None = None
    provenance: list[dict[str, Any]] | None = None


def read_content(staged: StagedRun) -> RunContent:
    """Parse every file the registry takes, from its staged copy or its stored one.

    A file that does not parse becomes that file's problem and is neither ingested nor installed.
    Staged copies passed the same readers already; a stored copy may not (an older satrl that
    checked less stored it), and must not stop the run's other files.
    """
    spec, content = staged.plan.spec, RunContent()
    good = {f.kind: f for f in staged.reports if f.status in ("staged", "unchanged")
            and f.kind in ("evaluations", "metrics", "provenance")}
    monitors = [f for f in staged.reports if f.kind == "monitor" and f.target
                and f.target.endswith(".monitor.csv") and f.target.rsplit("/", 1)[-1]
                .startswith("train_")]

    def parse(report: FileReport, reader: Callable[[Path], Any]) -> Any:
        try:
            return reader(staged.path(report))
        except ingest.ContentError as error:
            report.status, report.problem = "problem", str(error)
            return None

    if "evaluations" in good and (data := parse(good["evaluations"],
                                                ingest.read_evaluations)) is not None:
        content.evaluations = (good["evaluations"], data)
    if "metrics" in good and (rows := parse(good["metrics"], ingest.read_metrics_csv)) is not None:
        names = ingest.metrics_csv_names(staged.path(good["metrics"]))
        content.metrics = (good["metrics"], names, rows)
    if monitors and all(m.status != "problem" for m in monitors):
        parsed = [parse(m, lambda path: ingest.read_monitor(path, spec.n_envs, spec.frame_skip))
                  for m in monitors]
        # The episodes' steps add up over the files: all of them, or none.
        if all(rows is not None for rows in parsed):
            content.monitors = (monitors, [row for rows in parsed for row in rows])
    if "provenance" in good:
        content.provenance = parse(good["provenance"], ingest.read_provenance)
    return content


def ingest_run(registry: Registry, staged: StagedRun, result: RunResult) -> None:
    """One transaction: evaluations, metrics, provenance, the files into the store, artefacts.

    The copies are installed after the rows are written and before the commit: rows that the
    registry refuses leave the store as it was. (A failure while renaming leaves some verified
    files in the store without rows; the next fetch finds them unchanged and ingests them.)
    """
    target = staged.plan.target
    store_dir, root = target.store_dir, target.store_root
    content = read_content(staged)
    with registry.write() as session:
        before = ingest.previous_artifacts(session, target.run_id)

        def unchanged(report: FileReport) -> bool:
            row = before.get(_store_path(store_dir, root, report))
            return row is not None and row.sha256 == report.sha256

        if content.evaluations is not None:
            report, data = content.evaluations
            if not (unchanged(report) and ingest.count_evaluations(session, target.run_id)
                    == data.results.size):
                result.evaluations = ingest.replace_evaluations(session, target.run_id, data)
        if content.metrics is not None:
            report, names, rows = content.metrics
            if not (unchanged(report) and ingest.count_metrics(session, target.run_id, names)
                    == len(rows)):
                result.metrics = ingest.replace_metrics(session, target.run_id, names, rows)
        if content.monitors is not None:
            monitors, rows = content.monitors
            if not (all(unchanged(m) for m in monitors) and ingest.count_metrics(
                    session, target.run_id, ingest.MONITOR_METRICS) == len(rows)):
                written = ingest.replace_metrics(session, target.run_id,
                                                 ingest.MONITOR_METRICS, rows)
                result.metrics = (result.metrics or 0) + written
        if content.provenance is not None:
            result.attempts_recorded = ingest.record_provenance(session, target.run_id,
                                                                content.provenance)
        staged.install()
        stored = [ingest.StoredFile(_store_path(store_dir, root, f), str(f.kind), f.size_bytes,
                                    str(f.sha256), f.step)
                  for f in result.files if f.status in ("copied", "unchanged")]
        gone = [path for path in before if not (root / path).is_file()]
        ingest.record_artifacts(session, target.run_id, stored, before, gone)


def _store_path(store_dir: Path, root: Path, report: FileReport) -> str:
    """An artefact's path as recorded: relative to the store root, so the store can move."""
    return (store_dir / str(report.target)).relative_to(root).as_posix()
