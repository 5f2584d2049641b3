"""The per-game table (AGENT.md's protocol), its winners, wins per type and wins by axis.

A cell is the mean over seeds of each complete run's mean over the evaluation period, +- the
population standard deviation (ddof=0) over seeds / sqrt(number of seeds); with fewer than two
seeds there is no spread to measure, and the standard error is undefined (None). A cell is
complete when it has every seed queued for its game (over all the game's types), so a stray run
of one game makes only that game incomplete. The winner of a game is the type with the highest
mean among its complete cells (all tied types win). Wins are counted only over *complete* games,
those where every type has every seed; the others are listed, not counted.
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
    #: None when fewer than two seeds (undefined) or no seed at all.
    std_error: float | None
    #: Each complete run's score, by seed: what a two-sample test of two cells compares.
    seed_scores: tuple[float, ...] = ()

    @property
    def complete(self) -> bool:
        return self.n_seeds >= self.expected_seeds and self.mean is not None


@dataclass
class GameTable:
    games: list[str]
    attns: list[str]
    #: game -> the number of seeds queued for it (each of its cells should have them all).
    expected_seeds: dict[str, int]
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


def cell_stats(values: list[float]) -> tuple[float, float | None]:
    """Mean and population std (ddof=0) / sqrt(n) of per-seed scores; no error below 2 seeds."""
    array = np.asarray(values, dtype=np.float64)
    if len(array) < 2:
        return float(array.mean()), None
    return float(array.mean()), float(array.std(ddof=0) / math.sqrt(len(array)))


def build_table(study: StudyScores) -> GameTable:
    expected = {game: len(study.game_seeds(game)) for game in study.games}
    cells: dict[tuple[str, str], Cell] = {}
    for game in study.games:
        for attn in study.attns:
            scores = [r.mean_score for r in study.complete_runs(game, attn)
                      if r.mean_score is not None]
            if scores:
                mean, se = cell_stats(scores)
                cells[(game, attn)] = Cell(game, attn, len(scores), expected[game], mean, se,
                                           tuple(scores))
            else:
                cells[(game, attn)] = Cell(game, attn, 0, expected[game], None, None)
    table = GameTable(study.games, study.attns, expected, cells)
    for game in study.games:
        # A cell short of seeds is no candidate: one lucky seed must not win a game.
        scored = [c for a in study.attns if (c := cells[(game, a)]).complete]
        if scored:
            best = max(c.mean for c in scored if c.mean is not None)
            table.winners[game] = [c.attn for c in scored if c.mean == best]
    return table
