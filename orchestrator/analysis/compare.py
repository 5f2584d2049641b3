"""`satrl report --compare OTHER`: this study's cells against another's, game by game and type.

For each (game, type) complete in both tables: both means with their standard errors (the
table's), the difference, and Welch's two-sample t-test of the two cells' per-seed scores: t from
both cells' sample variances (ddof=1), the Welch-Satterthwaite degrees of freedom, and the
two-sided p-value from Student's t distribution. A cell *differs* when p < ALPHA. Both studies'
uncertainty counts, so two studies of the same distribution differ in about ALPHA of their cells
by chance alone; a cell with fewer than two seeds on either side has no test (p is None).

Student's t distribution is scipy's (scipy.stats.t).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from agents.catalog import ATTENTION_TYPES
from orchestrator.analysis.table import GameTable

#: Significance level of the two-sided test: a cell differs when p < ALPHA.
ALPHA = 0.05


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with `df` (> 0, not necessarily whole) degrees of freedom."""
    from scipy import stats

    if math.isnan(t):
        return math.nan
    return float(2.0 * stats.t.sf(abs(t), df))


@dataclass(frozen=True)
class WelchTest:
    t: float
    df: float
    p_value: float


def welch_test(x: Sequence[float], y: Sequence[float]) -> WelchTest | None:
    """Welch's two-sample t-test of the means of `x` and `y`; None below two values on a side.

    Two samples without any spread: p is 1 for equal means and 0 for different ones.
    """
    n_x, n_y = len(x), len(y)
    if n_x < 2 or n_y < 2:
        return None
    mean_x, mean_y = math.fsum(x) / n_x, math.fsum(y) / n_y
    var_x = math.fsum((v - mean_x) ** 2 for v in x) / (n_x - 1) / n_x  # squared s.e., ddof=1
    var_y = math.fsum((v - mean_y) ** 2 for v in y) / (n_y - 1) / n_y
    spread = var_x + var_y
    difference = mean_x - mean_y
    if spread == 0.0:
        return WelchTest(0.0 if difference == 0 else math.copysign(math.inf, difference),
                         float(n_x + n_y - 2), 1.0 if difference == 0 else 0.0)
    t = difference / math.sqrt(spread)
    df = spread ** 2 / (var_x ** 2 / (n_x - 1) + var_y ** 2 / (n_y - 1))
    return WelchTest(t, df, t_two_sided_p(t, df))


@dataclass(frozen=True)
class CompareRow:
    game: str
    attn: str
    mean: float
    std_error: float | None
    other_mean: float
    other_std_error: float | None
    difference: float
    #: Welch's two-sided p-value; None when a cell has fewer than two seeds.
    p_value: float | None

    @property
    def differs(self) -> bool:
        """The two cells' seed scores differ at level ALPHA (Welch's t-test)."""
        return self.p_value is not None and self.p_value < ALPHA


@dataclass
class Comparison:
    other: str
    rows: list[CompareRow]
    #: (game, type) cells this study does not have, and cells the other does not have.
    only_other: list[tuple[str, str]]
    only_this: list[tuple[str, str]]
    #: Cells both studies have, not complete in at least one of them.
    incomplete: list[tuple[str, str]]
    #: Both studies' evaluation grids in words, where they differ: the two were trained for
    #: different budgets, and their cells differ for that reason alone.
    grids_differ: tuple[str, str] | None = None

    @property
    def unmatched(self) -> list[tuple[str, str]]:
        """Every cell that is not compared."""
        return sorted(self.only_other + self.only_this + self.incomplete)

    @property
    def n_differ(self) -> int:
        return sum(r.differs for r in self.rows)

    @property
    def n_tested(self) -> int:
        return sum(r.p_value is not None for r in self.rows)


def compare_tables(this: GameTable, other: GameTable, other_name: str,
                   grids_differ: tuple[str, str] | None = None) -> Comparison:
    comparison = Comparison(other_name, [], [], [], [], grids_differ)
    keys = sorted(set(this.cells) | set(other.cells),
                  key=lambda k: (k[0], ATTENTION_TYPES.index(k[1])))
    for key in keys:
        a, b = this.cells.get(key), other.cells.get(key)
        if a is None or b is None:
            (comparison.only_other if a is None else comparison.only_this).append(key)
            continue
        if not (a.complete and b.complete):
            comparison.incomplete.append(key)
            continue
        assert a.mean is not None and b.mean is not None
        test = welch_test(a.seed_scores, b.seed_scores)
        comparison.rows.append(CompareRow(key[0], key[1], a.mean, a.std_error, b.mean,
                                          b.std_error, a.mean - b.mean,
                                          None if test is None else test.p_value))
    return comparison
