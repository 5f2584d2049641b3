"""The registry queries the commands share: run filters, run lookup, status counts."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from orchestrator.errors import NotFoundError, UsageError
from orchestrator.registry.models import Event, Experiment, Job, Run, RunState


@dataclass(frozen=True)
class RunFilter:
    """Which runs a command acts on; empty fields select everything."""

    experiment: str | None = None
    games: tuple[str, ...] = ()
    attns: tuple[str, ...] = ()
    seeds: tuple[int, ...] = ()
    states: tuple[str, ...] = ()
    run_ids: tuple[int, ...] = ()

    def apply(self, statement: Select[Any]) -> Select[Any]:
        """Add this filter's WHERE clauses to a select over Run joined with Experiment."""
        if self.experiment is not None:
            statement = statement.where(Experiment.name == self.experiment)
        if self.games:
            statement = statement.where(Run.game.in_(self.games))
        if self.attns:
            statement = statement.where(Run.attn.in_(self.attns))
        if self.seeds:
            statement = statement.where(Run.seed.in_(self.seeds))
        if self.states:
            statement = statement.where(Run.state.in_(self.states))
        if self.run_ids:
            statement = statement.where(Run.id.in_(self.run_ids))
        return statement


def parse_states(text: str | None) -> tuple[str, ...]:
    """`--state failed,lost` -> validated state names."""
    if not text:
        return ()
    from orchestrator.catalog import nearest

    names = [item.strip().lower() for item in text.split(",") if item.strip()]
    valid = [state.value for state in RunState]
    for name in names:
        if name not in valid:
            raise UsageError(f"unknown state {name!r}{nearest(name, valid)}; "
                             f"states: {', '.join(valid)}")
    return tuple(names)


def select_runs(run_filter: RunFilter) -> Select[tuple[Run]]:
    """Runs matching the filter, in a stable order (experiment, game, type, seed)."""
    statement = select(Run).join(Experiment, Run.experiment_id == Experiment.id)
    return run_filter.apply(statement).order_by(Run.experiment_id, Run.game, Run.attn, Run.seed)


def get_experiment(session: Session, name: str) -> Experiment:
    experiment = session.scalar(select(Experiment).where(Experiment.name == name))
    if experiment is None:
        names = list(session.scalars(select(Experiment.name)))
        from orchestrator.catalog import nearest

        hint = nearest(name, names) or (f"; experiments: {', '.join(names)}" if names
                                        else "; the registry has no experiments yet")
        raise NotFoundError(f"no experiment {name!r}{hint}")
    return experiment


#: Run and image ids are 64-bit integer keys; seeds are the spec's 0..2**31-1.
MAX_ID = 2**63 - 1
MAX_SEED = 2**31 - 1
#: ASCII digits only: str.isdigit() and int() also take '²' and other scripts' digits.
_DIGITS = re.compile(r"[0-9]+")


def parse_id(text: str) -> int | None:
    """`text` as a key the database can hold (ASCII digits, at most MAX_ID), else None."""
    if not _DIGITS.fullmatch(text):
        return None
    value = int(text)
    return value if value <= MAX_ID else None


def resolve_run(session: Session, ref: str, experiment: str) -> Run:
    """A run by id (`17`) or by `GAME/ATTN/SEED` in `experiment`."""
    ref = ref.strip()
    if ref.isdigit():
        run_id = parse_id(ref)
        # An id no key can have (too large, non-ASCII digits) names no run either.
        run = session.get(Run, run_id) if run_id is not None else None
        if run is None:
            raise NotFoundError(f"no run with id {ref}")
        return run
    parts = ref.split("/")
    if len(parts) != 3:
        raise UsageError(f"RUN must be a run id or GAME/ATTN/SEED (e.g. Pong/CWCA/42), not {ref!r}")
    from orchestrator.catalog import parse_attn_one, parse_game

    game, attn = parse_game(parts[0]), parse_attn_one(parts[1])
    if not _DIGITS.fullmatch(parts[2].strip()):
        raise UsageError(f"seed {parts[2]!r} in {ref!r} is not a non-negative integer")
    return get_run(session, experiment, game, attn, int(parts[2]))


def get_run(session: Session, experiment: str, game: str, attn: str, seed: int) -> Run:
    if not 0 <= seed <= MAX_SEED:
        # No run can have it, and the database cannot compare with it (an overflow).
        get_experiment(session, experiment)
        raise NotFoundError(f"no run {game}/{attn}/{seed} in experiment {experiment!r} "
                            f"(seeds are 0..{MAX_SEED})")
    run = session.scalar(
        select(Run).join(Experiment, Run.experiment_id == Experiment.id).where(
            Experiment.name == experiment, Run.game == game, Run.attn == attn, Run.seed == seed
        )
    )
    if run is None:
        get_experiment(session, experiment)  # a clearer message when the experiment is unknown
        raise NotFoundError(f"no run {game}/{attn}/{seed} in experiment {experiment!r}")
    return run


@dataclass
class StatusSummary:
    """What `satrl status` shows: counts per state and per (game, attn, state), in all and per
    experiment (a grid pooled over experiments would add a study's runs to an imported one's)."""

    total: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    grid: dict[tuple[str, str], Counter[str]] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)
    experiments: dict[str, StatusSummary] = field(default_factory=dict)

    def add(self, game: str, attn: str, state: str, count: int) -> None:
        self.total += count
        self.counts[state] = self.counts.get(state, 0) + count
        self.grid.setdefault((game, attn), Counter())[state] += count

    def to_json(self) -> dict[str, Any]:
        return {"total": self.total, "counts": self.counts,
                "experiments": {name: {"total": part.total, "counts": part.counts}
                                for name, part in self.experiments.items()},
                "runs": self.runs}


def _empty_counts() -> dict[str, int]:
    return {state.value: 0 for state in RunState}


def status_summary(session: Session, run_filter: RunFilter, *, with_runs: bool) -> StatusSummary:
    """Counts per state and the game x attention grid, with GROUP BY in the database."""
    grouped = run_filter.apply(
        select(Experiment.name, Run.game, Run.attn, Run.state, func.count())
        .select_from(Run)
        .join(Experiment, Run.experiment_id == Experiment.id)
        .group_by(Experiment.name, Run.game, Run.attn, Run.state)
        .order_by(Experiment.name)
    )
    summary = StatusSummary(counts=_empty_counts())
    for experiment, game, attn, state, count in session.execute(grouped):
        summary.add(game, attn, state, count)
        summary.experiments.setdefault(experiment, StatusSummary(counts=_empty_counts())).add(
            game, attn, state, count)
    if with_runs:
        rows = session.execute(
            run_filter.apply(
                select(Run.id, Experiment.name, Run.game, Run.attn, Run.seed, Run.state,
                       Run.attempts)
                .join(Experiment, Run.experiment_id == Experiment.id)
                .order_by(Run.id)
            )
        )
        summary.runs = [
            {"id": rid, "experiment": exp, "game": game, "attn": attn, "seed": seed,
             "state": state, "attempts": attempts}
            for rid, exp, game, attn, seed, state, attempts in rows
        ]
    return summary


def run_history(session: Session, run: Run) -> tuple[list[Event], list[Job]]:
    """A run's events and jobs, oldest first."""
    events = list(session.scalars(select(Event).where(Event.run_id == run.id).order_by(Event.id)))
    jobs = list(session.scalars(select(Job).where(Job.run_id == run.id).order_by(Job.id)))
    return events, jobs
