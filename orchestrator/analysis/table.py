"""The per-game table (AGENT.md's protocol), its winners, wins per type and wins by axis.

A cell is the mean over seeds of each complete run's mean over the evaluation period, +- the
population standard deviation (ddof=0) over seeds / sqrt(number of seeds). The winner of a game is
the type with the highest mean (all tied types win). Wins are counted only over *complete* games,
those where every type has every seed of the study; the others are listed, not counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from agents.catalog import AXES, GAMES
from orchestrator.analysis.scores import StudyScores


@dataclass(frozen=True)
class Cell:
    """One (game, type) of the table."""

    game: str
    attn: str
    n_seeds: int
    expected_seeds: int
    mean: float | None
    std_error: float | None

    @property
    def complete(self) -> bool:
        return self.n_seeds >= self.expected_seeds and self.mean is not None


@dataclass
class GameTable:
    games: list[str]
    attns: list[str]
    expected_seeds: int
    cells: dict[tuple[str, str], Cell]
    winners: dict[str, list[str]] = field(default_factory=dict)

    def cell(self, game: str, attn: str) -> Cell:
        return self.cells[(game, attn)]

    def complete_game(self, game: str) -> bool:
        return all(self.cells[(game, a)].complete for a in self.attns)

    @property
    def complete_games(self) -> list[str]:
        return [g for g in self.games if self.complete_game(g)]

    @property
    def incomplete_games(self) -> list[str]:
        return [g for g in self.games if not self.complete_game(g)]

    def wins(self, games: list[str] | None = None) -> dict[str, int]:
        """Wins per type over complete games (all of them, or those in `games`)."""
        counted = [g for g in (games if games is not None else self.games)
                   if self.complete_game(g)]
        wins = {a: 0 for a in self.attns}
        for game in counted:
            for attn in self.winners.get(game, []):
                wins[attn] += 1
        return wins

    def wins_by_axis(self) -> dict[str, tuple[int, dict[str, int]]]:
        """axis -> (complete games of that axis in the study, wins per type)."""
        out: dict[str, tuple[int, dict[str, int]]] = {}
        for axis in AXES:
            games = [g for g in self.games if GAMES[g] == axis]
            out[axis] = (sum(self.complete_game(g) for g in games), self.wins(games))
        return out


def cell_stats(values: list[float]) -> tuple[float, float]:
    """Mean and population std (ddof=0) / sqrt(n) of per-seed scores."""
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=0) / math.sqrt(len(array)))


def build_table(study: StudyScores) -> GameTable:
    expected = len(study.seeds)
    cells: dict[tuple[str, str], Cell] = {}
    for game in study.games:
        for attn in study.attns:
            runs = study.complete_runs(game, attn)
            if runs:
                mean, se = cell_stats([r.mean_score for r in runs if r.mean_score is not None])
                cells[(game, attn)] = Cell(game, attn, len(runs), expected, mean, se)
            else:
                cells[(game, attn)] = Cell(game, attn, 0, expected, None, None)
    table = GameTable(study.games, study.attns, expected, cells)
    for game in study.games:
        scored = [c for a in study.attns if (c := cells[(game, a)]).mean is not None]
        if scored:
            best = max(c.mean for c in scored if c.mean is not None)
            table.winners[game] = [c.attn for c in scored if c.mean == best]
    return table
