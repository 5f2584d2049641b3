"""`--compare`: Welch's two-sample t-test of two cells' seed scores, and its calibration.

The old flag (this mean outside the other study's mean +- 1.96 s.e.) ignored this study's own
uncertainty and flagged about 28% of the cells of two studies of one distribution; a calibrated
test flags about its level, 5%, and still flags cells that clearly differ.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from orchestrator.analysis.compare import (
    ALPHA,
    compare_tables,
    t_two_sided_p,
    welch_test,
)
from orchestrator.analysis.table import Cell, GameTable, cell_stats

ATTNS = ["NA", "SWA", "CWRA", "CWCA", "CWRCA"]


def _table(scores: dict[tuple[str, str], np.ndarray]) -> GameTable:
    """A table whose cells hold these per-seed scores, every cell complete."""
    cells = {}
    for (game, attn), values in scores.items():
        mean, se = cell_stats(list(values))
        cells[(game, attn)] = Cell(game, attn, len(values), len(values), mean, se,
                                   tuple(float(v) for v in values))
    games = sorted({g for g, _ in scores})
    return GameTable(games, ATTNS, {g: len(next(iter(scores.values()))) for g in games}, cells)


def test_t_distribution_against_closed_forms() -> None:
    # df = 1 (Cauchy): P(|T| >= t) = 1 - 2 atan(t) / pi; df = 2: 1 - t / sqrt(2 + t^2).
    for t in (0.0, 0.3, 1.0, 2.5, 12.7, 300.0):
        assert t_two_sided_p(t, 1.0) == pytest.approx(1 - 2 * math.atan(t) / math.pi,
                                                      rel=1e-10, abs=1e-300)
        assert t_two_sided_p(-t, 2.0) == pytest.approx(1 - t / math.sqrt(2 + t * t),
                                                       rel=1e-10, abs=1e-300)
    # Large df: the normal distribution; 1.959964 is its two-sided 5% point.
    assert t_two_sided_p(1.959964, 1e7) == pytest.approx(0.05, rel=1e-5)
    # df = 4 (the test of 5 v 5 equal variances): 2.776445 is the two-sided 5% point.
    assert t_two_sided_p(2.776445, 4.0) == pytest.approx(0.05, rel=1e-5)
    assert t_two_sided_p(math.inf, 3.0) == 0.0 and math.isnan(t_two_sided_p(math.nan, 3.0))


def test_welch_test_equals_scipys() -> None:
    from scipy import stats  # a dependency: its absence is a failure, never a skip
    rng = np.random.default_rng(3)
    for _ in range(200):
        x = rng.normal(0, 1, size=int(rng.integers(2, 9)))
        y = rng.normal(0.5, 4, size=int(rng.integers(2, 9)))
        ours = welch_test(list(x), list(y))
        theirs = stats.ttest_ind(x, y, equal_var=False)
        assert ours is not None
        assert ours.t == pytest.approx(theirs.statistic, rel=1e-10)
        assert ours.p_value == pytest.approx(theirs.pvalue, rel=1e-9, abs=1e-15)


def test_welch_test_edge_cases() -> None:
    assert welch_test([1.0], [1.0, 2.0]) is None  # one seed: no variance, no test
    same = welch_test([3.0, 3.0], [3.0, 3.0])
    assert same is not None and same.p_value == 1.0
    apart = welch_test([3.0, 3.0, 3.0], [4.0, 4.0])
    assert apart is not None and apart.p_value == 0.0
    # One side without spread: the other side's variance alone, df = n - 1.
    one_sided = welch_test([0.0, 0.0, 0.0], [1.0, 2.0, 3.0])
    assert one_sided is not None and one_sided.df == pytest.approx(2.0)


def test_two_studies_of_one_distribution_differ_in_about_five_percent_of_cells() -> None:
    """4,000 cells, 5 seeds a side, each cell its own mean and spread; both studies alike."""
    rng = np.random.default_rng(0)
    n_games = 800
    location = rng.normal(0, 100, size=(n_games, len(ATTNS)))
    scale = rng.uniform(0.5, 50, size=(n_games, len(ATTNS)))

    def study() -> GameTable:
        return _table({(f"G{g:03d}", a): rng.normal(location[g, i], scale[g, i], size=5)
                       for g in range(n_games) for i, a in enumerate(ATTNS)})

    comparison = compare_tables(study(), study(), "twin")
    assert len(comparison.rows) == comparison.n_tested == 4000 and not comparison.unmatched
    rate = comparison.n_differ / len(comparison.rows)
    # Welch's test is a little conservative at 5 v 5 seeds (about 4.3%); the old band: 28%.
    assert 0.03 <= rate <= 0.06, rate
    p_values = np.array([r.p_value for r in comparison.rows])
    # Under the null, p is about uniform: a tenth of the cells below 0.1, half below 0.5.
    assert abs(np.mean(p_values < 0.5) - 0.5) < 0.03
    assert abs(np.mean(p_values < 0.1) - 0.1) < 0.02


def test_a_clearly_different_cell_differs_and_the_same_does_not() -> None:
    rng = np.random.default_rng(1)
    base = rng.normal(10.0, 1.0, size=5)
    this = _table({("Pong", "NA"): base, ("Pong", "SWA"): base + 3.0,
                   ("Pong", "CWCA"): base.copy()})
    other = _table({("Pong", "NA"): rng.normal(10.0, 1.0, size=5) + 8.0,
                    ("Pong", "SWA"): base.copy(), ("Pong", "CWCA"): base.copy()})
    rows = {r.attn: r for r in compare_tables(this, other, "other").rows}
    assert rows["NA"].differs and rows["NA"].p_value < 1e-3
    assert rows["NA"].difference == pytest.approx(this.cell("Pong", "NA").mean
                                                  - other.cell("Pong", "NA").mean)
    # The same seed scores shifted by 3 s.d.: t = 3 / sqrt(2 s^2 / 5).
    assert rows["SWA"].differs
    assert not rows["CWCA"].differs and rows["CWCA"].p_value == pytest.approx(1.0)
    assert ALPHA == 0.05


def test_cells_with_one_seed_are_not_tested() -> None:
    this = _table({("Pong", "NA"): np.array([1.0])})
    other = _table({("Pong", "NA"): np.array([100.0])})
    (row,) = compare_tables(this, other, "other").rows
    assert row.p_value is None and not row.differs and row.std_error is None
