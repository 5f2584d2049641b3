"""The registry's tables as SQLAlchemy 2 typed models.

Every schema change is an Alembic revision in migrations/versions; a test checks that these
models and the migrations agree. Column names are the SQL a researcher writes, so they are plain.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


def epoch(moment: datetime | None) -> float | None:
    """Epoch seconds of a stored time (SQLite returns naive datetimes; satrl stores UTC)."""
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def from_epoch(seconds: float) -> datetime:
    """The UTC time of epoch seconds, as satrl stores it."""
    return datetime.fromtimestamp(seconds, UTC)


class RunState(enum.StrEnum):
    """A run's state; stored as these stable strings."""

    QUEUED = "queued"
    SUBMITTED = "submitted"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    LOST = "lost"

    def is_active(self) -> bool:
        """Handed to a scheduler and not yet ended."""
        return self in (RunState.SUBMITTED, RunState.RUNNING)

    def is_terminal(self) -> bool:
        """Ended; only requeue moves it on."""
        return self in (RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED, RunState.LOST)


class Reason(enum.StrEnum):
    """Why one attempt (a jobs row) ended."""

    DONE = "done"
    FAILED = "failed"
    SIGNAL = "signal"
    WALLTIME = "walltime"
    CANCELLED = "cancelled"
    LOST = "lost"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSON, datetime: DateTime(timezone=True)}


class Image(Base):
    """A worker image built by `satrl image build`."""

    __tablename__ = "images"

    id: Mapped[int] = mapped_column(primary_key=True)
    flavor: Mapped[str] = mapped_column(String(16))
    definition_hash: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    torch_version: Mapped[str | None] = mapped_column(String(64))
    cuda_version: Mapped[str | None] = mapped_column(String(64))
    rocm_version: Mapped[str | None] = mapped_column(String(64))
    versions: Mapped[dict[str, Any]] = mapped_column(default=dict)
    built_at: Mapped[datetime] = mapped_column(default=utcnow)
    build_seconds: Mapped[float | None] = mapped_column(Float)


class Experiment(Base):
    """A named study: one preset plus overrides, a set of runs."""

    __tablename__ = "experiments"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    preset: Mapped[str] = mapped_column(String(64))
    overrides: Mapped[dict[str, Any]] = mapped_column(default=dict)
    notes: Mapped[str] = mapped_column(Text, default="")
    imported: Mapped[bool] = mapped_column(Boolean, default=False)
    image_id: Mapped[int | None] = mapped_column(ForeignKey("images.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    runs: Mapped[list[Run]] = relationship(back_populates="experiment")
    image: Mapped[Image | None] = relationship()


class Run(Base):
    """One (experiment, game, attention type, seed) with its full resolved spec."""

    __tablename__ = "runs"
    __table_args__ = (
        UniqueConstraint("experiment_id", "game", "attn", "seed", name="uq_runs_key"),
        Index("ix_runs_state", "state"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    experiment_id: Mapped[int] = mapped_column(ForeignKey("experiments.id", ondelete="CASCADE"))
    game: Mapped[str] = mapped_column(String(64))
    attn: Mapped[str] = mapped_column(String(16))
    seed: Mapped[int] = mapped_column(BigInteger)
    spec: Mapped[dict[str, Any]]
    spec_hash: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default=RunState.QUEUED.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    run_dir: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    experiment: Mapped[Experiment] = relationship(back_populates="runs")

    @property
    def key(self) -> str:
        """`Game/ATTN/seed`, the name a person types."""
        return f"{self.game}/{self.attn}/{self.seed}"


class Job(Base):
    """One submission of a run to a scheduler (an attempt as the orchestrator sees it)."""

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_run_id", "run_id"), Index("ix_jobs_job_id", "job_id"),
                      Index("ix_jobs_batch", "batch"))

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer)
    backend: Mapped[str] = mapped_column(String(16))
    job_id: Mapped[str | None] = mapped_column(String(200))
    array_job_id: Mapped[str | None] = mapped_column(String(200))
    array_index: Mapped[int | None] = mapped_column(Integer)
    scheduler_state: Mapped[str | None] = mapped_column(String(32))
    submitted_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    ended_at: Mapped[datetime | None]
    exit_status: Mapped[int | None] = mapped_column(Integer)
    reason: Mapped[str | None] = mapped_column(String(16))
    node: Mapped[str | None] = mapped_column(String(200))
    image_digest: Mapped[str | None] = mapped_column(String(128))
    provenance: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    #: Dispatch token, also the scheduler's job name: recorded before submitting (crash safety).
    batch: Mapped[str | None] = mapped_column(String(64))
    #: When the scheduler last listed this job.
    seen_at: Mapped[datetime | None]
    #: The first poll since then that did not list it (None while listed); a job the scheduler
    #: forgot becomes lost a grace period after this.
    unlisted_since: Mapped[datetime | None]


class SchedulerPoll(Base):
    """When each backend's scheduler was last asked about jobs (rate limit shared by processes)."""

    __tablename__ = "scheduler_polls"

    backend: Mapped[str] = mapped_column(String(16), primary_key=True)
    polled_at: Mapped[datetime]
    calls: Mapped[int] = mapped_column(BigInteger, default=0)


class Artifact(Base):
    """A file of a run copied into the store and verified."""

    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("run_id", "path", name="uq_artifacts_run_path"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(32))
    path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    step: Mapped[int | None] = mapped_column(BigInteger)
    fetched_at: Mapped[datetime] = mapped_column(default=utcnow)


class Evaluation(Base):
    """One evaluation episode (own runs) or one evaluation's mean (imported, episode NULL)."""

    __tablename__ = "evaluations"
    __table_args__ = (Index("ix_evaluations_run_timestep", "run_id", "timestep"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    timestep: Mapped[int] = mapped_column(BigInteger)
    episode: Mapped[int | None] = mapped_column(Integer)
    score: Mapped[float] = mapped_column(Float)
    length: Mapped[int | None] = mapped_column(Integer)
    n_episodes: Mapped[int] = mapped_column(Integer, default=1)


class Metric(Base):
    """A training metric (metrics.csv column or monitor episode) at a timestep."""

    __tablename__ = "metrics"
    __table_args__ = (Index("ix_metrics_run_name_timestep", "run_id", "name", "timestep"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    timestep: Mapped[int] = mapped_column(BigInteger)
    name: Mapped[str] = mapped_column(String(64))
    value: Mapped[float] = mapped_column(Float)


class Event(Base):
    """A state transition of a run, with why."""

    __tablename__ = "events"
    __table_args__ = (Index("ix_events_run_id", "run_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    at: Mapped[datetime] = mapped_column(default=utcnow)
    from_state: Mapped[str | None] = mapped_column(String(16))
    to_state: Mapped[str] = mapped_column(String(16))
    why: Mapped[str] = mapped_column(Text, default="")
