"""A study's scores read from the registry by SQL, aligned on each run's evaluation grid.

A run is scored on exactly the evaluations its spec promises: one per multiple of
eval_every_steps up to total_timesteps (the paper: 200,000, 400,000, ..., 10,000,000, 50 of them).
The worker evaluates at the first agent step at or past each multiple, and agent steps advance by
n_envs, so the grid's points are those multiples rounded up to a multiple of n_envs (the multiples
themselves whenever eval_every_steps is a multiple of n_envs, as in every preset).

The run's score is the `run_scores` view's mean_score (the mean over the grid's evaluations of
each evaluation's mean score, so own runs with one row per episode and imported runs with one
row per 5-episode mean score alike); the per-evaluation means come from one GROUP BY over the
evaluations table and are placed on the grid by timestep, never by position. Evaluations off the
grid (past the budget, between its points) are ignored and listed; a run is *complete* when it has
an evaluation at every point of its grid. The report uses complete runs only and lists the others
as gaps, so a study in progress is never averaged as if it were finished.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from agents.catalog import ATTENTION_TYPES, GAMES
from orchestrator.errors import UsageError
from orchestrator.registry.models import Evaluation, Run
from orchestrator.registry.queries import get_experiment


def evaluation_grid(spec: Mapping[str, Any]) -> np.ndarray:
    """The timesteps (agent steps, int64, ascending) at which a finished run has evaluations.

    The k-th evaluation, k = 1 .. total_timesteps // eval_every_steps, happens at the first agent
    step at or past k x eval_every_steps; steps advance by n_envs. Empty for a spec without these
    fields (nothing can be complete then).
    """
    every, total = _count(spec, "eval_every_steps"), _count(spec, "total_timesteps")
    n_envs = _count(spec, "n_envs") if "n_envs" in spec else 1
    if every is None or total is None or n_envs is None:
        return np.zeros(0, dtype=np.int64)
    multiples = np.arange(1, total // every + 1, dtype=np.int64) * every
    # Several multiples inside one step (eval_every_steps < n_envs) are one evaluation.
    return np.unique(-(-multiples // n_envs) * n_envs)


def _count(spec: Mapping[str, Any], key: str) -> int | None:
    """A positive integer field of a stored spec; None when absent or anything else.

    The run_scores view reads the same fields with the same rule (JSON integers only).
    """
    value = spec.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        return None
    return value


def expected_evaluations(spec: Mapping[str, Any]) -> int:
    """Evaluations a finished run of this spec has: the points of its grid."""
    return len(evaluation_grid(spec))


@dataclass
class RunScore:
    """One run of the study, scored or not; its evaluations placed on its grid by timestep."""

    run_id: int
    game: str
    attn: str
    seed: int
    state: str
    grid: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    #: Mean over the grid's evaluations (the run_scores view's); None without any on the grid.
    mean_score: float | None = None
    #: Every evaluation the registry holds, in timestep order, on the grid or not.
    timesteps: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    eval_means: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def expected_evaluations(self) -> int:
        return len(self.grid)

    @property
    def on_grid(self) -> np.ndarray:
        """Per evaluation held, whether its timestep is a point of the grid."""
        return np.isin(self.timesteps, self.grid)

    @property
    def n_evaluations(self) -> int:
        """Evaluations on the grid (those the score averages)."""
        return int(self.on_grid.sum())

    @property
    def off_grid(self) -> list[int]:
        """Timesteps of the evaluations that are not on the grid: ignored."""
        return [int(t) for t in self.timesteps[~self.on_grid]]

    @property
    def grid_means(self) -> np.ndarray:
        """The evaluation mean at each point of the grid; NaN where the run has none."""
        out = np.full(len(self.grid), np.nan)
        index = np.searchsorted(self.grid, self.timesteps)
        found = self.on_grid
        out[index[found]] = self.eval_means[found]
        return out

    @property
    def complete(self) -> bool:
        return (self.mean_score is not None and len(self.grid) > 0
                and self.n_evaluations == len(self.grid))

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

    def game_seeds(self, game: str) -> list[int]:
        """The seeds queued for `game`, over all its types: what each of its cells should have."""
        return sorted({r.seed for r in self.runs if r.game == game})

    @property
    def grid(self) -> np.ndarray:
        """The evaluation grid of the study's runs (one spec per experiment, so one grid)."""
        return self.runs[0].grid if self.runs else np.zeros(0, dtype=np.int64)

    @property
    def expected_evaluations(self) -> int:
        return len(self.grid)

    def complete_runs(self, game: str, attn: str) -> list[RunScore]:
        """The cell's runs that have every evaluation of the grid, by seed."""
        return [r for r in self.cells.get((game, attn), []) if r.complete]


def describe_grid(grid: Sequence[int]) -> str:
    """`20 evaluations up to 10,000,000 steps`: a study's training budget in words."""
    return f"{len(grid)} evaluations up to {grid[-1] if len(grid) else 0:,} steps"


def _check_one_grid(experiment: str, runs: list[RunScore]) -> None:
    grids = Counter(tuple(r.grid.tolist()) for r in runs)
    if len(grids) > 1:
        shown = "; ".join(f"{describe_grid(g)} ({n} runs)" for g, n in grids.most_common())
        raise UsageError(f"experiment {experiment!r} holds runs with different evaluation grids "
                         f"({shown}): their scores cannot be compared; a study is one spec")


def load_study(session: Session, experiment: str) -> StudyScores:
    """All runs of `experiment` with run_scores' means and their per-evaluation means."""
    exp = get_experiment(session, experiment)
    runs: dict[int, RunScore] = {}
    for rid, game, attn, seed, state, spec in session.execute(
            select(Run.id, Run.game, Run.attn, Run.seed, Run.state, Run.spec)
            .where(Run.experiment_id == exp.id)):
        runs[rid] = RunScore(rid, game, attn, int(seed), state, evaluation_grid(spec or {}))
    for rid, mean_score in session.execute(
            text("SELECT run_id, mean_score FROM run_scores WHERE experiment = :experiment"),
            {"experiment": experiment}):
        runs[rid].mean_score = None if mean_score is None else float(mean_score)
    _attach_eval_means(session, exp.id, runs)
    ordered = sorted(runs.values(), key=lambda r: (r.game, r.attn, r.seed))
    _check_one_grid(experiment, ordered)
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
