"""`satrl report --compare OTHER`: this study's cells against another's, game by game and type.

For each (game, type) present and complete in both tables: this mean, the other's mean and
standard error, the difference, and whether this mean lies outside the other's 95% confidence
band (mean +- 1.96 s.e., the normal approximation over the other's seeds).
"""

from __future__ import annotations

from dataclasses import dataclass

from agents.catalog import ATTENTION_TYPES
from orchestrator.analysis.table import GameTable

#: Half-width of the other study's confidence band, in standard errors (95%, normal).
BAND_Z = 1.96


@dataclass(frozen=True)
class CompareRow:
    game: str
    attn: str
    mean: float
    other_mean: float
    other_std_error: float
    difference: float
    outside: bool


@dataclass
class Comparison:
    other: str
    rows: list[CompareRow]
    #: (game, type) cells complete in only one of the two studies.
    unmatched: list[tuple[str, str]]

    @property
    def n_outside(self) -> int:
        return sum(r.outside for r in self.rows)


def compare_tables(this: GameTable, other: GameTable, other_name: str) -> Comparison:
    rows: list[CompareRow] = []
    unmatched: list[tuple[str, str]] = []
    keys = sorted(set(this.cells) | set(other.cells),
                  key=lambda k: (k[0], ATTENTION_TYPES.index(k[1])))
    for key in keys:
        a, b = this.cells.get(key), other.cells.get(key)
        if a is None or b is None or not (a.complete and b.complete):
            unmatched.append(key)
            continue
        assert a.mean is not None and b.mean is not None and b.std_error is not None
        difference = a.mean - b.mean
        rows.append(CompareRow(key[0], key[1], a.mean, b.mean, b.std_error, difference,
                               abs(difference) > BAND_Z * b.std_error))
    return Comparison(other_name, rows, unmatched)

