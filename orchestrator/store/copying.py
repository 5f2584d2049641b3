"""One run's fetch on disk: decide what to copy, copy to a temporary name, verify, rename.

Planning lists the run directory (never following links), reads its run.json, manifest.json and
exit.json, and decides per file: immutable artefacts (checkpoints, observation dumps), and every
file once the run has exited with its final manifest, are *verified* against the manifest's size
and sha256; live files of a run still going (or killed) are copied as they are. A verified file
whose stored copy already matches is not copied again.

Copies land in `<store>/.satrl-fetch/<random>/` (the store's filesystem, so the rename is atomic)
and are renamed into place only after their checksum, size and content check out, and only once
the run's ingestion has accepted them (`stage_run`, then `StagedRun.install()` from fetch.py). A
file that fails is reported and left out; the store keeps what it had; nothing half-copied stays
behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agents.rundir import sha256_file
from agents.spec import RunSpec
from orchestrator.store import ingest
from orchestrator.store.layout import (
    EXIT_JSON,
    IMMUTABLE_KINDS,
    CheckpointChoice,
    kind_of,
    step_of,
    store_relpath,
)
from orchestrator.store.manifest import (
    Manifest,
    ManifestEntry,
    RunDirError,
    parse_exit,
    parse_manifest,
    parse_run_json,
)
from orchestrator.store.sources import ProgressFn, Source, SourceFile

STAGING_DIR = ".satrl-fetch"
#: Staging folders older than this were left by a fetch that died; the next fetch removes them.
STALE_STAGING_S = 24 * 3600


@dataclass(frozen=True)
class RunTarget:
    """A registry run and where its files are: source run directory and store folder."""

    run_id: int
    experiment: str
    game: str
    attn: str
    seed: int
    spec_hash: str
    state: str
    run_dir: str
    store_root: Path

    @property
    def key(self) -> str:
        return f"{self.game}/{self.attn}/{self.seed}"

    @property
    def store_dir(self) -> Path:
        from orchestrator.paths import store_dir

        return store_dir(self.store_root, self.experiment, self.game, self.attn, self.seed)


@dataclass(frozen=True)
class FileTask:
    source: str  # relative to the run directory
    target: str  # relative to the run's store folder
    kind: str
    step: int | None
    expected: ManifestEntry | None  # None: a live file, copied as it is
    size_bytes: int


@dataclass
class FileReport:
    """What happened to one file: copied, unchanged (the store already had it) or a problem.

    "staged" is the state between verification and installation (see StagedRun).
    """

    path: str
    status: str
    kind: str | None = None
    target: str | None = None
    problem: str | None = None
    size_bytes: int = 0
    sha256: str | None = None
    step: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class RunPlan:
    target: RunTarget
    source: str
    spec: RunSpec
    exited: bool
    settled: bool
    to_copy: list[FileTask] = field(default_factory=list)
    reports: list[FileReport] = field(default_factory=list)
    #: Steps of the checkpoints the run has (whichever were chosen).
    checkpoint_steps: frozenset[int] = frozenset()

    @property
    def bytes_to_copy(self) -> int:
        return sum(task.size_bytes for task in self.to_copy)


def plan_run(source: Source, target: RunTarget, kinds: frozenset[str],
             checkpoints: CheckpointChoice) -> RunPlan:
    """What this fetch copies of one run; raises RunDirError when its records are unreadable."""
    where = source.describe(target.run_dir)
    listing = source.listing(target.run_dir)
    if listing is None:
        raise RunDirError(f"run directory {where} does not exist (not started yet, or scratch "
                          "was purged)")
    docs = _read_records(source, target.run_dir, listing, where)
    if "run.json" not in docs:
        raise RunDirError(f"{where} has no run.json: not a run directory")
    spec = parse_run_json(docs["run.json"], where)
    _check_identity(spec, target, where)
    manifest = parse_manifest(docs["manifest.json"], where) if "manifest.json" in docs \
        else Manifest.empty()
    exited = "exit.json" in docs
    if exited:
        parse_exit(docs["exit.json"], where)
    # Once the run exited with its final manifest, every file is final and must match it.
    settled = exited and manifest.final
    plan = RunPlan(target, where, spec, exited, settled)

    tasks: list[FileTask] = []
    for entry in manifest.entries:
        kind = kind_of(entry.path) if entry.problem is None else None
        if entry.problem is not None:
            plan.reports.append(FileReport(entry.path, "problem", problem=entry.problem))
        elif kind is None and entry.kind in kinds:
            # Vouched for as an artefact, but its name is none (a stray `.nfs...` file in
            # checkpoints/): it has no step and no store name. One file's problem, not the run's.
            plan.reports.append(FileReport(entry.path, "problem", kind=entry.kind,
                                           problem=f"listed as a {entry.kind}, but the name is "
                                                   f"not a {entry.kind}'s: not fetched"))
        elif kind is None:
            continue  # status.json, logs: not fetched
        elif kind != entry.kind:
            plan.reports.append(FileReport(entry.path, "problem", kind=entry.kind,
                                           problem=f"manifest kind {entry.kind!r}, but the path "
                                                   f"is a {kind}'s"))
        elif kind in kinds and (settled or kind in IMMUTABLE_KINDS):
            tasks.append(_task(entry.path, kind, target, entry, entry.size_bytes))
    if not settled:
        # Live files: whatever the directory holds now (the manifest may be older).
        for relative, item in sorted(listing.items()):
            kind = kind_of(relative)
            if kind in kinds and kind not in IMMUTABLE_KINDS and item.type == "file":
                tasks.append(_task(relative, kind, target, None, item.size_bytes))
    elif EXIT_JSON in listing:
        exit_task = _task(EXIT_JSON, "exit", target, None, listing[EXIT_JSON].size_bytes)
        # exit.json has no manifest entry, but its content was just read: a copy equal to the
        # stored one is not announced as "to copy" (a repeated fetch copies nothing).
        content = docs["exit.json"]
        digest = hashlib.sha256(content).hexdigest()
        if _matches(target.store_dir / exit_task.target, len(content), digest):
            plan.reports.append(FileReport(EXIT_JSON, "unchanged", "exit", exit_task.target,
                                           size_bytes=len(content), sha256=digest))
        else:
            tasks.append(exit_task)
    # A path listed twice is one file: copied, verified and installed once (the first entry).
    unique: dict[str, FileTask] = {}
    for task in tasks:
        unique.setdefault(task.source, task)
    tasks = list(unique.values())
    plan.checkpoint_steps = frozenset(t.step for t in tasks
                                      if t.kind == "checkpoint" and t.step is not None)
    chosen = checkpoints.select(sorted(plan.checkpoint_steps))
    tasks = [t for t in tasks if t.kind != "checkpoint" or t.step in chosen]

    for task in tasks:
        problem = _listing_problem(task.source, listing)
        if problem is not None:
            plan.reports.append(FileReport(task.source, "problem", kind=task.kind,
                                           target=task.target, problem=problem, step=task.step))
            continue
        stored = target.store_dir / task.target
        if task.expected is not None and _matches(stored, task.expected.size_bytes,
                                                  task.expected.sha256):
            plan.reports.append(FileReport(task.source, "unchanged", task.kind, task.target,
                                           size_bytes=task.expected.size_bytes,
                                           sha256=task.expected.sha256, step=task.step))
        else:
            plan.to_copy.append(task)
    return plan


@dataclass
class StagedRun:
    """A run's files copied and verified in the staging folder, not yet in the store.

    Reports of verified copies have status "staged" until `install()` renames them into the
    store ("copied"); a report can still turn into a problem before that (its content refused by
    the ingestion), and is then never installed.
    """

    plan: RunPlan
    reports: list[FileReport]
    staged: dict[str, Path] = field(default_factory=dict)  # report path -> its staged copy

    def path(self, report: FileReport) -> Path:
        """Where a good file's content is now: its staged copy, else its stored one."""
        if report.status == "staged":
            return self.staged[report.path]
        return self.plan.target.store_dir / str(report.target)

    def install(self) -> None:
        """Rename every staged copy still good into its place in the store (atomic per file)."""
        for report in self.reports:
            if report.status == "staged":
                destination = self.plan.target.store_dir / str(report.target)
                destination.parent.mkdir(parents=True, exist_ok=True)
                os.replace(self.staged[report.path], destination)
                report.status = "copied"


@contextlib.contextmanager
def stage_run(source: Source, plan: RunPlan, on_bytes: ProgressFn | None = None
              ) -> Iterator[StagedRun]:
    """Copy the plan's files to a temporary folder and verify each; nothing enters the store
    unless the caller calls `install()`, and what is left is deleted on the way out."""
    reports = list(plan.reports)
    if not plan.to_copy:
        yield StagedRun(plan, reports)
        return
    staging_root = plan.target.store_root / STAGING_DIR
    _remove_stale_staging(staging_root)
    staging = staging_root / f"{uuid.uuid4().hex}.tmp"
    staging.mkdir(parents=True)
    try:
        source.copy(plan.target.run_dir, [t.source for t in plan.to_copy], staging, on_bytes)
        run = StagedRun(plan, reports)
        for task in plan.to_copy:
            report = _verify(task, staging / task.source, plan)
            reports.append(report)
            if report.status == "staged":
                run.staged[report.path] = staging / task.source
        yield run
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        with contextlib.suppress(OSError):
            staging_root.rmdir()  # only when no other fetch is using it


def _verify(task: FileTask, staged: Path, plan: RunPlan) -> FileReport:
    """A staged copy's fate: "staged" (good, to install), "unchanged" or a problem."""
    report = FileReport(task.source, "problem", task.kind, task.target, step=task.step)
    if staged.is_symlink() or not staged.is_file():
        report.problem = ("missing: not found, unreadable or not a regular file at the source "
                          "when copied")
        return report
    size = staged.stat().st_size
    digest = sha256_file(staged)
    expected = task.expected
    if expected is not None and size != expected.size_bytes:
        report.problem = (f"size {size} bytes, the manifest says {expected.size_bytes} "
                          "(truncated or changed)")
        return report
    if expected is not None and digest != expected.sha256:
        report.problem = f"sha256 {digest[:12]} does not match the manifest's " \
                         f"{expected.sha256[:12]}"
        return report
    try:
        check_content(task.kind, staged, plan.spec, plan.source)
    except (ingest.ContentError, RunDirError) as error:
        report.problem = str(error)
        return report
    destination = plan.target.store_dir / task.target
    report.size_bytes, report.sha256 = size, digest
    if expected is None and destination.is_file() and sha256_file(destination) == digest:
        report.status = "unchanged"  # a live file that has not changed since the last fetch
        return report
    report.status = "staged"
    return report


def check_content(kind: str, path: Path, spec: RunSpec, where: str) -> None:
    """Parse the files that are ingested or kept as records; raises on any defect."""
    if kind == "evaluations":
        ingest.read_evaluations(path)
    elif kind == "metrics":
        ingest.read_metrics_csv(path)
    elif kind == "monitor" and path.name.endswith(".monitor.csv"):
        ingest.read_monitor(path, spec.n_envs, spec.frame_skip)
    elif kind == "provenance":
        ingest.read_provenance(path)
    elif kind == "run_json":
        parse_run_json(path.read_bytes(), where)
    elif kind == "exit":
        parse_exit(path.read_bytes(), where)


def _task(relative: str, kind: str, target: RunTarget, expected: ManifestEntry | None,
          size_bytes: int) -> FileTask:
    return FileTask(relative, store_relpath(relative, kind, target.game, target.attn,
                                            target.seed),
                    kind, step_of(relative, kind), expected, size_bytes)


def _listing_problem(relative: str, listing: dict[str, SourceFile]) -> str | None:
    """Why `relative` must not be copied: a link on the way, not a regular file, or absent."""
    parts = relative.split("/")
    for depth in range(1, len(parts) + 1):
        item = listing.get("/".join(parts[:depth]))
        if item is not None and item.type == "link":
            return "symbolic link: not followed (it could point anywhere)"
    item = listing.get(relative)
    if item is None:
        return "missing from the run directory"
    if item.type != "file":
        return f"not a regular file ({item.type})"
    return None


def _matches(stored: Path, size_bytes: int, sha256: str) -> bool:
    try:
        return (not stored.is_symlink() and stored.stat().st_size == size_bytes
                and sha256_file(stored) == sha256)
    except OSError:
        return False


def _read_records(source: Source, run_dir: str, listing: dict[str, SourceFile],
                  where: str) -> dict[str, bytes]:
    names = ["run.json", "manifest.json", "exit.json"]
    for name in names:
        item = listing.get(name)
        if item is not None and item.type != "file":
            raise RunDirError(f"{where}/{name} is not a regular file ({item.type})")
    present = [name for name in names if name in listing]
    with tempfile.TemporaryDirectory(prefix="satrl-fetch-") as folder:
        source.copy(run_dir, present, Path(folder))
        return {name: (Path(folder) / name).read_bytes() for name in present
                if (Path(folder) / name).is_file()}


def _check_identity(spec: RunSpec, target: RunTarget, where: str) -> None:
    """The directory must hold the run the registry means (a stale or mixed-up path must not)."""
    stated = (spec.experiment, spec.game, spec.attn, spec.seed)
    wanted = (target.experiment, target.game, target.attn, target.seed)
    if stated != wanted:
        raise RunDirError(f"{where}/run.json is run {'/'.join(map(str, stated))}, not "
                          f"{'/'.join(map(str, wanted))}")
    if spec.spec_hash() != target.spec_hash:
        raise RunDirError(f"{where}/run.json has spec {spec.spec_hash()[:12]}, the registry "
                          f"{target.spec_hash[:12]}: the directory holds another run's results")


def _remove_stale_staging(staging_root: Path) -> None:
    if not staging_root.is_dir():
        return
    cutoff = time.time() - STALE_STAGING_S
    for folder in staging_root.iterdir():
        try:
            if folder.stat().st_mtime < cutoff:
                shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            continue
