"""Fetched files -> registry rows: evaluations, metrics, the attempts' provenance, artefacts.

The readers parse a file completely or raise `ContentError` (so a file that does not parse is
never renamed into the store). The writers replace one run's rows with what its stored files say,
inside the caller's transaction: repeating an ingestion of the same files changes nothing, and a
resumed run, whose evaluations.npz dropped and redid some evaluations, is replaced whole.
"""

from __future__ import annotations

import csv
import io
import json
import math
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import delete, func, insert, select
from sqlalchemy.orm import Session

from agents.rundir import MonitorClock, complete_lines
from orchestrator.registry.models import Artifact, Evaluation, Job, Metric, utcnow

#: Metric names of the training monitor's episodes (raw game score, frames of the full game).
MONITOR_METRICS = ("episode_score", "episode_frames")
#: Bound on a step count or an episode's frames read from a file: far above any study (a paper
#: run is 10M steps), far below what the registry's BIGINT columns hold, so that a corrupt value
#: (1e30) fails the content check instead of the database insert after the file was stored.
MAX_TIMESTEPS = 10**12
#: evaluations.length is a 32-bit INTEGER column (in PostgreSQL; SQLite does not care).
MAX_EPISODE_LENGTH = 2**31 - 1
#: metrics.name is a VARCHAR of this length (PostgreSQL refuses a longer name).
MAX_METRIC_NAME_CHARS = 64


class ContentError(ValueError):
    """A file whose checksum may match but whose content is not what the contract says."""


# --- readers ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Evaluations:
    """evaluations.npz: `timesteps` (n,), `results` and `ep_lengths` (n, episodes)."""

    timesteps: np.ndarray
    results: np.ndarray
    ep_lengths: np.ndarray

    def rows(self, run_id: int) -> list[dict[str, Any]]:
        """One row per (evaluation, episode)."""
        n, episodes = self.results.shape
        timesteps = np.repeat(self.timesteps, episodes).tolist()
        episode_ids = np.tile(np.arange(episodes), n).tolist()
        scores = self.results.reshape(-1).tolist()
        lengths = self.ep_lengths.reshape(-1).tolist()
        return [{"run_id": run_id, "timestep": t, "episode": e, "score": s, "length": length,
                 "n_episodes": 1}
                for t, e, s, length in zip(timesteps, episode_ids, scores, lengths, strict=True)]


def read_evaluations(path: Path) -> Evaluations:
    """Parse and check evaluations.npz (never unpickling: a hostile file runs no code)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: np.asarray(data[key]) for key in ("timesteps", "results",
                                                              "ep_lengths")}
    except KeyError as error:
        raise ContentError(f"evaluations.npz lacks the array {error}") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise ContentError(f"evaluations.npz is not a readable .npz: {error}") from None
    timesteps, results, lengths = (arrays["timesteps"], arrays["results"], arrays["ep_lengths"])
    if timesteps.ndim != 1 or results.ndim != 2 or results.shape[0] != timesteps.shape[0]:
        raise ContentError(f"evaluations.npz shapes timesteps {timesteps.shape}, results "
                           f"{results.shape}: expected (n,) and (n, episodes)")
    if lengths.shape != results.shape:
        raise ContentError(f"evaluations.npz: ep_lengths {lengths.shape} != results "
                           f"{results.shape}")
    if not (np.issubdtype(timesteps.dtype, np.integer) and np.issubdtype(lengths.dtype, np.integer)
            and (np.issubdtype(results.dtype, np.integer)
                 or np.issubdtype(results.dtype, np.floating))):
        raise ContentError("evaluations.npz: timesteps and ep_lengths must be integers, results "
                           "real numbers")
    if not np.isfinite(results).all():
        raise ContentError("evaluations.npz: results hold NaN or infinite scores")
    # Checked on the file's own dtype: a uint64 above 2**63 would wrap when cast to int64.
    _check_range(timesteps, "timesteps", MAX_TIMESTEPS)
    _check_range(lengths, "ep_lengths", MAX_EPISODE_LENGTH)
    return Evaluations(timesteps.astype(np.int64), results.astype(np.float64),
                       lengths.astype(np.int64))


def _check_range(values: np.ndarray, name: str, limit: int) -> None:
    if values.size and (values.min() < 0 or values.max() > limit):
        raise ContentError(f"evaluations.npz: {name} outside 0 ... {limit:,} (min "
                           f"{values.min()}, max {values.max()})")


def _whole_number(cell: str, name: str, limit: int) -> int:
    """A step count or frame count from a CSV cell; ValueError unless a whole number 0 ... limit.

    `1e3` and `256.0` are taken (they are what a float formatter writes); 1e30, -1, 2.5, inf
    and nan are not: no file of the contract holds them, and the registry could not store 1e30.
    """
    value = float(cell)
    if not (math.isfinite(value) and value.is_integer() and 0 <= value <= limit):
        raise ValueError(f"{name} {cell.strip()!r} is not a whole number from 0 to {limit:,}")
    return int(value)


def read_metrics_csv(path: Path) -> list[tuple[int, str, float]]:
    """(timestep, name, value) for every non-empty, finite cell of metrics.csv.

    The worker appends a row per update: an unterminated last line is a row being written (or
    cut by a kill) and is left out, as the next attempt leaves it out.
    """
    try:
        text = complete_lines(path.read_text())
    except UnicodeDecodeError:
        raise ContentError("metrics.csv is not text") from None
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if not header or header[0] != "timesteps":
        raise ContentError("metrics.csv must start with a header whose first column is "
                           "'timesteps'")
    names = header[1:]
    for name in names:
        if not 0 < len(name) <= MAX_METRIC_NAME_CHARS:
            raise ContentError(f"metrics.csv: column name {name[:80]!r} must have 1 to "
                               f"{MAX_METRIC_NAME_CHARS} characters")
    out: list[tuple[int, str, float]] = []
    for line_no, row in enumerate(reader, start=2):
        if not row:
            continue
        if len(row) != len(header):
            raise ContentError(f"metrics.csv line {line_no}: {len(row)} fields, header has "
                               f"{len(header)}")
        try:
            timestep = _whole_number(row[0], "timesteps", MAX_TIMESTEPS)
            values = [float(cell) if cell.strip() else math.nan for cell in row[1:]]
        except ValueError as error:
            raise ContentError(f"metrics.csv line {line_no}: {error}") from None
        # SQLite has no NaN (it would store NULL): an absent value is no row.
        out.extend((timestep, name, value) for name, value in zip(names, values, strict=True)
                   if math.isfinite(value))
    return out


def metrics_csv_names(path: Path) -> list[str]:
    with path.open(newline="") as handle:
        return next(csv.reader(handle), [])[1:]


def read_monitor(path: Path, n_envs: int, frame_skip: int) -> list[tuple[int, str, float]]:
    """A training env's monitor episodes as (timestep, name, value), stamped by
    agents.rundir.MonitorClock (the worker trims them on resume by the same arithmetic)."""
    try:
        lines = complete_lines(path.read_text()).splitlines()
    except UnicodeDecodeError:
        raise ContentError(f"{path.name} is not text") from None
    clock = MonitorClock(n_envs, frame_skip)
    header: list[str] | None = None
    out: list[tuple[int, str, float]] = []
    for line_no, line in enumerate(lines, start=1):
        mark = clock.mark_of(line)
        if mark is not None:
            clock.restart(mark)
            continue
        if not line or line.startswith("#"):
            continue
        # A Monitor writes no quotes but in an info column; split plain lines (2x faster).
        cells = next(csv.reader([line])) if '"' in line else line.split(",")
        if header is None:
            if not {"r", "l"} <= set(cells):
                raise ContentError(f"{path.name}: expected a monitor CSV with columns r,l,t")
            header = cells
            continue
        if cells == header:  # a header repeated by an appending Monitor
            continue
        row = dict(zip(header, cells, strict=False))
        if "r" not in row or "l" not in row:  # a short row
            raise ContentError(f"{path.name} row {line_no}: r and l must be numbers")
        try:
            score = float(row["r"])
            frames = _whole_number(row["l"], "l", MAX_TIMESTEPS)
        except ValueError as error:
            raise ContentError(f"{path.name} row {line_no}: {error}") from None
        if not math.isfinite(score):
            raise ContentError(f"{path.name} row {line_no}: r {row['r']!r} is not a finite "
                               "score")
        timestep = clock.end_of(frames)
        clock.advance(frames)
        if timestep > MAX_TIMESTEPS:
            raise ContentError(f"{path.name} row {line_no}: the episodes add up to step "
                               f"{timestep:,}, beyond {MAX_TIMESTEPS:,}")
        out.append((timestep, MONITOR_METRICS[0], score))
        out.append((timestep, MONITOR_METRICS[1], float(frames)))
    return out


def read_provenance(path: Path) -> list[dict[str, Any]]:
    """provenance.json's attempts, each an object with an integer `attempt`."""
    try:
        doc = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as error:
        raise ContentError(f"provenance.json is not valid JSON: {error}") from None
    attempts = doc.get("attempts") if isinstance(doc, dict) else None
    if not isinstance(attempts, list) or not all(
            isinstance(a, dict) and isinstance(a.get("attempt"), int) for a in attempts):
        raise ContentError("provenance.json must hold 'attempts': a list of objects with an "
                           "integer 'attempt'")
    return attempts


# --- writers (inside the caller's transaction) ---------------------------------------------------
def replace_evaluations(session: Session, run_id: int, data: Evaluations) -> int:
    """The run's evaluations become exactly the file's; returns the rows written."""
    session.execute(delete(Evaluation).where(Evaluation.run_id == run_id))
    rows = data.rows(run_id)
    if rows and session.get_bind().dialect.name == "postgresql":
        _copy_rows(session, "evaluations", list(rows[0]), rows)
    elif rows:
        session.execute(insert(Evaluation), rows)
    return len(rows)


def _copy_rows(session: Session, table: str, columns: list[str],
               rows: list[dict[str, Any]]) -> None:
    """PostgreSQL's COPY, in the session's transaction: several times faster than INSERTs."""
    driver = session.connection().connection.driver_connection
    names = ", ".join(columns)
    with driver.cursor() as cursor, cursor.copy(f"COPY {table} ({names}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row([row[c] for c in columns])


def count_evaluations(session: Session, run_id: int) -> int:
    return session.scalar(select(func.count()).select_from(Evaluation)
                          .where(Evaluation.run_id == run_id)) or 0


def replace_metrics(session: Session, run_id: int, names: Iterable[str],
                    rows: Sequence[tuple[int, str, float]]) -> int:
    """The run's metrics called `names` become exactly `rows`; returns the rows written."""
    names = sorted(set(names) | {name for _, name, _ in rows})
    session.execute(delete(Metric).where(Metric.run_id == run_id, Metric.name.in_(names)))
    records = [{"run_id": run_id, "timestep": t, "name": n, "value": v} for t, n, v in rows]
    if records and session.get_bind().dialect.name == "postgresql":
        _copy_rows(session, "metrics", list(records[0]), records)
    elif records:
        session.execute(insert(Metric), records)
    return len(records)


def count_metrics(session: Session, run_id: int, names: Iterable[str]) -> int:
    return session.scalar(select(func.count()).select_from(Metric).where(
        Metric.run_id == run_id, Metric.name.in_(sorted(set(names))))) or 0


def record_provenance(session: Session, run_id: int, attempts: list[dict[str, Any]]) -> int:
    """Each attempt's provenance onto its jobs row; returns how many attempts found one.

    An attempt matches the row with its scheduler job id, else the row with its number: a PBS
    array subjob can rerun without a new submission, so several attempts can share a row (the
    newest wins). Attempts no row matches (a run started by hand) are left in the store only.
    """
    jobs = list(session.scalars(select(Job).where(Job.run_id == run_id).order_by(Job.id)))
    by_job_id = {job.job_id: job for job in jobs if job.job_id}
    by_attempt = {job.attempt: job for job in jobs}
    matched = 0
    for entry in sorted(attempts, key=lambda a: a["attempt"]):
        job = by_job_id.get(str(entry.get("scheduler_job_id"))) or by_attempt.get(entry["attempt"])
        if job is None:
            continue
        matched += 1
        if job.provenance != entry:
            job.provenance = entry
        host, digest = entry.get("host"), entry.get("image_digest")
        if isinstance(host, str) and job.node != host:
            job.node = host
        if isinstance(digest, str) and digest and job.image_digest != digest:
            job.image_digest = digest
    return matched


@dataclass(frozen=True)
class StoredFile:
    """A file now in the store, verified: what its artifacts row says."""

    path: str  # relative to the store root
    kind: str
    size_bytes: int
    sha256: str
    step: int | None


def previous_artifacts(session: Session, run_id: int) -> dict[str, Artifact]:
    return {a.path: a for a in session.scalars(select(Artifact).where(Artifact.run_id == run_id))}


def record_artifacts(session: Session, run_id: int, files: Iterable[StoredFile],
                     existing: dict[str, Artifact], gone: Iterable[str]) -> None:
    """Insert or update one row per stored file; drop the rows of files no longer in the store.

    A row whose file did not change keeps its `fetched_at`, so a repeated fetch changes nothing.
    """
    for item in files:
        row = existing.get(item.path)
        if row is None:
            session.add(Artifact(run_id=run_id, kind=item.kind, path=item.path,
                                 size_bytes=item.size_bytes, sha256=item.sha256, step=item.step))
        elif (row.sha256, row.size_bytes, row.kind, row.step) != (
                item.sha256, item.size_bytes, item.kind, item.step):
            row.sha256, row.size_bytes, row.kind, row.step = (item.sha256, item.size_bytes,
                                                              item.kind, item.step)
            row.fetched_at = utcnow()
    gone = list(gone)
    if gone:
        session.execute(delete(Artifact).where(Artifact.run_id == run_id, Artifact.path.in_(gone)))
