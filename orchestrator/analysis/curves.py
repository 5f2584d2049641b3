"""Learning curves: mean over seeds, smoothed by a debiased EMA (weight 0.98), with a band.

The study's smoothing (AGENT.md): last = 0.98 last + 0.02 x, starting from 0, and
y_i = last / (1 - 0.98^(i+1)), which removes the pull towards the zero start. The band is the
standard error over seeds (ddof=0 / sqrt(n)) smoothed the same way around the smoothed mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from orchestrator.analysis.scores import StudyScores

EMA_WEIGHT = 0.98


def debiased_ema(values: np.ndarray, weight: float = EMA_WEIGHT) -> np.ndarray:
    """The study's debiased exponential moving average of a 1-d series."""
    out = np.empty(len(values), dtype=np.float64)
    last = 0.0
    for i, x in enumerate(np.asarray(values, dtype=np.float64)):
        last = weight * last + (1.0 - weight) * x
        out[i] = last / (1.0 - weight ** (i + 1))
    return out


@dataclass(frozen=True)
class Curve:
    """One (game, type): timesteps, smoothed mean and band over `n_seeds` complete runs."""

    game: str
    attn: str
    n_seeds: int
    timesteps: np.ndarray
    mean: np.ndarray
    lower: np.ndarray
    upper: np.ndarray


def learning_curves(study: StudyScores) -> dict[str, list[Curve]]:
    """game -> one curve per type that has complete runs, over the study's evaluation grid.

    Each run's evaluations are placed on the grid by timestep (complete runs have one at every
    point); evaluations off the grid are not drawn.
    """
    grid = study.grid
    curves: dict[str, list[Curve]] = {}
    for game in study.games:
        for attn in study.attns:
            runs = study.complete_runs(game, attn)
            if not runs or len(grid) == 0:
                continue
            matrix = np.stack([r.grid_means for r in runs])
            mean = matrix.mean(axis=0)
            se = matrix.std(axis=0, ddof=0) / np.sqrt(len(runs))
            smooth, smooth_se = debiased_ema(mean), debiased_ema(se)
            curves.setdefault(game, []).append(Curve(
                game, attn, len(runs), grid.copy(), smooth, smooth - smooth_se,
                smooth + smooth_se))
    return curves
