"""A study's scores read from the registry by SQL: per-run means and per-evaluation means.

The run's score over the evaluation period is the `run_scores` view's (the mean over its
evaluations of each evaluation's mean, so own runs with one row per episode and imported runs with
one row per 5-episode mean score alike), read from the view for this experiment; the
per-evaluation means come from one GROUP BY over the evaluations table. A run counts as
*complete* when it has at least the evaluations its spec promises (total_timesteps //
eval_every_steps); the report uses complete runs only and lists the others as gaps, so a
study in progress is never averaged as if it were finished.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from agents.catalog import ATTENTION_TYPES, GAMES
from orchestrator.registry.models import Evaluation, Run
from orchestrator.registry.queries import get_experiment


@dataclass
class RunScore:
    """One run of the study, scored or not."""

    run_id: int
    game: str
    attn: str
    seed: int
    state: str
    expected_evaluations: int
    n_evaluations: int = 0
    mean_score: float | None = None
    timesteps: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    eval_means: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def complete(self) -> bool:
        return self.mean_score is not None and self.n_evaluations >= self.expected_evaluations

    @property
    def key(self) -> str:
        return f"{self.game}/{self.attn}/{self.seed}"


@dataclass
class StudyScores:
    """Every run of one experiment with its scores; games, types and seeds in study order."""

    experiment: str
    imported: bool
    notes: str
    runs: list[RunScore]
    cells: dict[tuple[str, str], list[RunScore]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.cells = {}
        for run in sorted(self.runs, key=lambda r: r.seed):
            self.cells.setdefault((run.game, run.attn), []).append(run)

    @property
    def games(self) -> list[str]:
        present = {r.game for r in self.runs}
        return [g for g in GAMES if g in present]

    @property
    def attns(self) -> list[str]:
        present = {r.attn for r in self.runs}
        return [a for a in ATTENTION_TYPES if a in present]

    @property
    def seeds(self) -> list[int]:
        return sorted({r.seed for r in self.runs})

    @property
    def expected_evaluations(self) -> int:
        return max((r.expected_evaluations for r in self.runs), default=0)

    def complete_runs(self, game: str, attn: str) -> list[RunScore]:
        """The cell's runs that have all their evaluations, by seed."""
        return [r for r in self.cells.get((game, attn), []) if r.complete]


def expected_evaluations(spec: dict[str, Any]) -> int:
    """Evaluations a finished run of this spec has: one per eval_every_steps crossed."""
    try:
        return int(spec["total_timesteps"]) // int(spec["eval_every_steps"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return 0


def load_study(session: Session, experiment: str) -> StudyScores:
    """All runs of `experiment` with run_scores' means and their per-evaluation means."""
    exp = get_experiment(session, experiment)
    runs: dict[int, RunScore] = {}
    for rid, game, attn, seed, state, spec in session.execute(
            select(Run.id, Run.game, Run.attn, Run.seed, Run.state, Run.spec)
            .where(Run.experiment_id == exp.id)):
        runs[rid] = RunScore(rid, game, attn, int(seed), state, expected_evaluations(spec))
    for rid, mean_score, n_evaluations in session.execute(
            text("SELECT run_id, mean_score, n_evaluations FROM run_scores "
                 "WHERE experiment = :experiment"), {"experiment": experiment}):
        runs[rid].mean_score = float(mean_score)
        runs[rid].n_evaluations = int(n_evaluations)
    _attach_eval_means(session, exp.id, runs)
    ordered = sorted(runs.values(), key=lambda r: (r.game, r.attn, r.seed))
    return StudyScores(experiment, bool(exp.imported), exp.notes or "", ordered)


def _attach_eval_means(session: Session, experiment_id: int, runs: dict[int, RunScore]) -> None:
    """Each run's evaluation means in timestep order, from one GROUP BY in the database."""
    rows = session.execute(
        select(Evaluation.run_id, Evaluation.timestep, func.avg(Evaluation.score))
        .join(Run, Run.id == Evaluation.run_id)
        .where(Run.experiment_id == experiment_id)
        .group_by(Evaluation.run_id, Evaluation.timestep)
        .order_by(Evaluation.run_id, Evaluation.timestep)
    ).all()
    if not rows:
        return
    ids = np.array([r[0] for r in rows], dtype=np.int64)
    timesteps = np.array([r[1] for r in rows], dtype=np.int64)
    means = np.array([r[2] for r in rows], dtype=np.float64)
    bounds = np.flatnonzero(np.diff(ids)) + 1
    for chunk_ids, chunk_t, chunk_m in zip(np.split(ids, bounds), np.split(timesteps, bounds),
                                           np.split(means, bounds), strict=True):
        run = runs[int(chunk_ids[0])]
        run.timesteps, run.eval_means = chunk_t, chunk_m
