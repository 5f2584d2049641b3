"""Debiased EMA by hand; the vectorised estimators against rliable's own; reproducible CIs."""

from __future__ import annotations

import numpy as np
import pytest
from rliable import library as rly
from rliable import metrics

from orchestrator.analysis.aggregates import (
    aggregate_metrics,
    efficiency_points,
    probability_of_improvement,
    score_distribution,
    seeded,
)
from orchestrator.analysis.curves import debiased_ema
from orchestrator.analysis.reference import normalise, reference_scores
from orchestrator.errors import UsageError


def test_debiased_ema_by_hand() -> None:
    # last = 0.98 last + 0.02 x from 0; y_i = last / (1 - 0.98^(i+1)).
    # i=0: last 0.2,     y = 0.2 / 0.02 = 10
    # i=1: last 0.596,   y = 0.596 / 0.0396 = 15.050505...
    # i=2: last 1.18408, y = 1.18408 / 0.058808 = 20.134675...
    assert debiased_ema(np.array([10.0, 20.0, 30.0])) == pytest.approx(
        [10.0, 0.596 / 0.0396, 1.18408 / 0.058808], rel=1e-12)
    # A constant series stays constant (the debiasing removes the pull towards 0).
    assert debiased_ema(np.full(50, -20.7)) == pytest.approx(np.full(50, -20.7), rel=1e-12)


def _tied_scores(rng: np.random.Generator, runs: int, games: int) -> np.ndarray:
    return rng.integers(0, 4, size=(runs, games)).astype(float)  # many ties


@pytest.mark.parametrize("seed", range(5))
def test_probability_of_improvement_equals_rliables(seed: int) -> None:
    rng = np.random.default_rng(seed)
    x, y = _tied_scores(rng, 5, 7), _tied_scores(rng, 20, 7)
    assert probability_of_improvement(x, y) == pytest.approx(
        metrics.probability_of_improvement(x, y), abs=1e-12)
    z = rng.normal(size=(5, 7))
    assert probability_of_improvement(z, z) == pytest.approx(0.5)
    w = rng.normal(size=(3, 7))
    assert probability_of_improvement(z, w) == pytest.approx(
        metrics.probability_of_improvement(z, w), abs=1e-12)


def test_score_distribution_equals_rliables() -> None:
    rng = np.random.default_rng(1)
    scores = rng.normal(1.0, 1.5, size=(5, 56))
    taus = np.linspace(0, 8, 81)
    assert score_distribution(scores, taus) == pytest.approx(
        rly.score_distributions(scores, taus), abs=1e-15)


def test_aggregate_metrics_use_rliables_definitions() -> None:
    scores = np.array([[0.1, 0.5, 2.0, -0.3], [0.2, 0.7, 1.5, 0.0]])
    median, iqm, mean, gap = aggregate_metrics(scores)
    assert mean == pytest.approx(scores.mean())
    assert median == pytest.approx(np.median(scores.mean(axis=0)))
    assert iqm == pytest.approx(np.sort(scores.reshape(-1))[2:6].mean())  # middle half of 8
    assert gap == pytest.approx(1 - np.minimum(scores, 1).mean())


def test_bootstrap_is_reproducible_and_leaves_numpys_generator_alone() -> None:
    rng = np.random.default_rng(2)
    data = {"A": rng.normal(size=(5, 10)), "B": rng.normal(size=(5, 10))}
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    with seeded(7):
        _, first = rly.get_interval_estimates(data, aggregate_metrics, reps=200)
    assert (np.random.get_state()[1] == before).all()
    with seeded(7):
        _, again = rly.get_interval_estimates(data, aggregate_metrics, reps=200)
    with seeded(8):
        _, other = rly.get_interval_estimates(data, aggregate_metrics, reps=200)
    assert np.array_equal(first["A"], again["A"])
    assert not np.array_equal(first["A"], other["A"])


def test_efficiency_points() -> None:
    assert efficiency_points(50) == [0, 5, 10, 15, 20, 25, 30, 35, 40, 45, 49]
    assert efficiency_points(4) == [0, 3]
    assert efficiency_points(1) == [0]


def test_videopinball_conventions_and_normalisation() -> None:
    paper, standard = reference_scores("paper"), reference_scores("standard")
    assert paper["VideoPinball"].random == 0.0
    assert standard["VideoPinball"].random == 16256.9
    assert paper["Pong"] == standard["Pong"]
    assert len(paper) == 56
    normalised = normalise(np.array([[-20.7, 30.5], [14.6, 1.7]]), ["Pong", "Breakout"], paper)
    assert normalised == pytest.approx(np.array([[0.0, 1.0], [1.0, 0.0]]))
    with pytest.raises(UsageError, match="paper or standard"):
        reference_scores("dqn")


def test_one_attention_type_has_aggregates_without_probability_of_improvement(
        registry) -> None:  # type: ignore[no-untyped-def]
    """With a single type there is no rest to compare with: no PoI, the rest is computed."""
    from orchestrator.analysis.aggregates import compute_aggregates
    from orchestrator.analysis.scores import load_study
    from orchestrator.analysis.table import build_table
    from tests.analysis_support import constant_run, make_study

    make_study(registry, "solo", ["Pong", "Breakout"], ["NA"], [0, 1],
               {(g, "NA", s): constant_run(base + s)
                for g, base in (("Pong", -20.0), ("Breakout", 2.0)) for s in (0, 1)})
    with registry.session() as session:
        study = load_study(session, "solo")
    table = build_table(study)
    agg = compute_aggregates(study, table, reference_scores("paper"), reps=20)
    assert agg is not None and agg.attns == ["NA"]
    assert agg.poi == {} and agg.poi_ci == {}
    assert set(agg.point) == set(agg.profiles) == set(agg.efficiency) == {"NA"}
