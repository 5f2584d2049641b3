"""Aggregates on human-normalised scores with rliable (Agarwal et al. 2021), as the study did.

Per type, a (runs x games) matrix of each run's human-normalised mean over the evaluation period.
Median, IQM, Mean and Optimality Gap with stratified-bootstrap 95% confidence intervals
(`get_interval_estimates`); the probability of improvement of each type over the rest (the other
types' runs pooled, one pair per type); score-distribution performance profiles over tau in
[0, 8]; and the sample-efficiency curve, IQM at evaluations 0, 5, ..., 45 and the last.

Only complete games enter (every type has every seed), with one number of seeds for all: rliable's
estimators need full matrices, and the report lists the games left out. Evaluations are placed on
the study's evaluation grid by timestep. rliable's StratifiedBootstrap draws its indices from
numpy's global generator (its `random_state` does not reach them), so each estimate runs under a
fixed global seed, restored afterwards, and the output is reproducible.

Two estimators are vectorised equivalents of rliable's (tests check equality on random data with
ties): the probability of improvement (rliable calls scipy's Mann-Whitney U once per game and
bootstrap replicate) and the score-distribution profile (rliable evaluates it with np.vectorize,
once per tau). The bootstrap itself is rliable's.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from orchestrator.analysis.reference import Reference, normalise
from orchestrator.analysis.scores import StudyScores
from orchestrator.analysis.table import GameTable

METRICS = ("Median", "IQM", "Mean", "Optimality Gap")
#: Thresholds of the performance profiles (human-normalised score).
TAUS = np.linspace(0.0, 8.0, 81)
DEFAULT_REPS = 2000


@dataclass
class Aggregates:
    """Point estimates and 95% CIs per type; arrays follow METRICS, TAUS and `eval_points`."""

    games: list[str]
    #: Complete games with another number of seeds than `games` (see `aggregate_games`).
    games_left_out: list[str]
    attns: list[str]
    reps: int
    seed: int
    point: dict[str, np.ndarray]
    ci: dict[str, np.ndarray]  # (2, 4): lower and upper bounds
    poi: dict[str, float]
    poi_ci: dict[str, np.ndarray]  # (2,)
    profiles: dict[str, np.ndarray]
    profile_ci: dict[str, np.ndarray]  # (2, len(TAUS))
    eval_points: list[int]
    eval_timesteps: list[int]
    efficiency: dict[str, np.ndarray]
    efficiency_ci: dict[str, np.ndarray]  # (2, len(eval_points))


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """numpy's global generator seeded for rliable's bootstrap, then put back as it was."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def aggregate_metrics(scores: np.ndarray) -> np.ndarray:
    """Median, IQM, Mean, Optimality Gap of a (runs x games) matrix, with rliable's metrics."""
    from rliable import metrics

    return np.array([metrics.aggregate_median(scores), metrics.aggregate_iqm(scores),
                     metrics.aggregate_mean(scores), metrics.aggregate_optimality_gap(scores)])


def probability_of_improvement(scores_x: np.ndarray, scores_y: np.ndarray) -> float:
    """P(X > Y) averaged over games: rliable's definition (Mann-Whitney U / (m n)), vectorised.

    U of X over Y on one game counts the pairs of runs where X wins, ties counting one half.
    """
    x = scores_x[:, None, :]
    y = scores_y[None, :, :]
    per_game = ((x > y).mean(axis=(0, 1)) + 0.5 * (x == y).mean(axis=(0, 1)))
    return float(per_game.mean())


def score_distribution(scores: np.ndarray, taus: np.ndarray) -> np.ndarray:
    """Fraction of all runs x games above each tau: rliable's run-score profile, vectorised."""
    return (scores.reshape(-1)[:, None] > np.asarray(taus)[None, :]).mean(axis=0)


def efficiency_points(n_evaluations: int) -> list[int]:
    """Evaluation indices of the sample-efficiency curve: 0, 5, ..., and the last."""
    points = list(range(0, n_evaluations, 5))
    if n_evaluations and points[-1] != n_evaluations - 1:
        points.append(n_evaluations - 1)
    return points


def aggregate_games(table: GameTable) -> tuple[list[str], list[str]]:
    """The complete games that enter the aggregates, and the complete games left out.

    rliable's estimators need a full (runs x games) matrix, so every game must have the same
    number of seeds: the games of the seed count most complete games share (the larger on a tie)
    enter; complete games with another count are left out and listed.
    """
    complete = table.complete_games
    counts = Counter(table.expected_seeds[g] for g in complete)
    if not counts:
        return [], []
    n_seeds = max(counts, key=lambda n: (counts[n], n))
    return ([g for g in complete if table.expected_seeds[g] == n_seeds],
            [g for g in complete if table.expected_seeds[g] != n_seeds])


def score_matrices(study: StudyScores, table: GameTable, reference: dict[str, Reference],
                   games: list[str]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray],
                                              list[int]]:
    """Per type: (runs x games) normalised run means, (runs x games x evaluations) eval means.

    The evaluation axis is the study's evaluation grid: each run's evaluation at each grid
    timestep (complete runs have one at every point), placed by timestep, not by position. The
    grid's timesteps are returned too. `games` must share one number of seeds.
    """
    grid = study.grid
    n_seeds = table.expected_seeds[games[0]] if games else 0
    finals: dict[str, np.ndarray] = {}
    per_eval: dict[str, np.ndarray] = {}
    for attn in table.attns:
        final = np.empty((n_seeds, len(games)))
        evals = np.empty((n_seeds, len(games), len(grid)))
        for j, game in enumerate(games):
            runs = study.complete_runs(game, attn)
            if len(runs) != n_seeds:
                raise ValueError(f"{game}/{attn}: {len(runs)} complete runs, not {n_seeds}")
            for i, run in enumerate(runs):
                final[i, j] = run.mean_score
                evals[i, j] = run.grid_means
        finals[attn] = normalise(final, games, reference)
        per_eval[attn] = normalise(evals, games, reference)
    return finals, per_eval, grid.tolist()


def compute_aggregates(study: StudyScores, table: GameTable, reference: dict[str, Reference],
                       *, reps: int = DEFAULT_REPS, seed: int = 0) -> Aggregates | None:
    """rliable's estimates over the complete games; None when no game is complete."""
    from rliable import library as rly

    games, left_out = aggregate_games(table)
    if not games or not table.attns or study.expected_evaluations == 0:
        return None
    finals, per_eval, timesteps = score_matrices(study, table, reference, games)
    with seeded(seed):
        point, ci = rly.get_interval_estimates(finals, aggregate_metrics, reps=reps)
    poi: dict[str, float] = {}
    poi_ci: dict[str, np.ndarray] = {}
    # With one type there is no "rest" to pool: the report goes without this part.
    if len(table.attns) > 1:
        pairs = {attn: (finals[attn],
                        np.concatenate([finals[other] for other in table.attns if other != attn]))
                 for attn in table.attns}
        with seeded(seed + 1):
            poi_point, poi_interval = rly.get_interval_estimates(
                pairs, probability_of_improvement, reps=reps)
        poi = {a: float(v) for a, v in poi_point.items()}
        poi_ci = {a: np.asarray(v).reshape(2) for a, v in poi_interval.items()}
    with seeded(seed + 2):
        profiles, profile_ci = rly.create_performance_profile(
            finals, TAUS, custom_profile_func=score_distribution, reps=reps)
    points = efficiency_points(study.expected_evaluations)
    sampled = {a: m[:, :, points] for a, m in per_eval.items()}

    def iqm_per_point(scores: np.ndarray) -> np.ndarray:
        from rliable import metrics

        return np.array([metrics.aggregate_iqm(scores[..., k]) for k in range(scores.shape[-1])])

    with seeded(seed + 3):
        efficiency, efficiency_ci = rly.get_interval_estimates(sampled, iqm_per_point, reps=reps)
    return Aggregates(
        games=games, games_left_out=left_out, attns=list(table.attns), reps=reps, seed=seed,
        point={a: np.asarray(v) for a, v in point.items()},
        ci={a: np.asarray(v) for a, v in ci.items()},
        poi=poi, poi_ci=poi_ci,
        profiles={a: np.asarray(v) for a, v in profiles.items()},
        profile_ci={a: np.asarray(v) for a, v in profile_ci.items()},
        eval_points=points, eval_timesteps=[timesteps[k] for k in points],
        efficiency={a: np.asarray(v) for a, v in efficiency.items()},
        efficiency_ci={a: np.asarray(v) for a, v in efficiency_ci.items()},
    )
