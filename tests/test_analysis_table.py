"""The per-game table, winners, wins and gaps of small synthetic studies, checked by hand.

Every test runs on SQLite and PostgreSQL: the numbers come from the registry's run_scores view and
evaluations table, so both databases must give the same cells.
"""

from __future__ import annotations

import csv
import io
import math

import numpy as np
import pytest

from orchestrator.analysis.report import ReportOptions, build_report
from orchestrator.cli import run
from tests.analysis_support import constant_run, make_study

GAMES = ["Pong", "Breakout", "Hero", "Alien"]
ATTNS = ["NA", "SWA", "CWCA"]
SEEDS = [0, 1]

# Pong/NA/0: evaluation means 2, 2, 6, 0 (episodes averaged first) -> run mean 2.5.
EPISODES = {
    ("Pong", "NA", 0): [[1, 3], [2, 2], [5, 7], [0, 0]],
    ("Pong", "NA", 1): constant_run(4.5),
    ("Pong", "SWA", 0): constant_run(0.0),
    ("Pong", "SWA", 1): constant_run(2.0),
    ("Pong", "CWCA", 0): constant_run(10.0),
    ("Pong", "CWCA", 1): constant_run(12.0),
    ("Breakout", "NA", 0): constant_run(5.0),
    ("Breakout", "NA", 1): constant_run(5.0),
    ("Breakout", "SWA", 0): constant_run(7.0),
    ("Breakout", "SWA", 1): [[9, 9, 9], [8, 10, 9], [9], [9, 9]],  # episodes per eval vary
    ("Breakout", "CWCA", 0): constant_run(3.0),
    ("Breakout", "CWCA", 1): constant_run(3.0),
    # Hero: NA and CWCA tie, both win.
    ("Hero", "NA", 0): constant_run(100.0),
    ("Hero", "NA", 1): constant_run(100.0),
    ("Hero", "SWA", 0): constant_run(50.0),
    ("Hero", "SWA", 1): constant_run(60.0),
    ("Hero", "CWCA", 0): constant_run(90.0),
    ("Hero", "CWCA", 1): constant_run(110.0),
    # Alien has gaps: CWCA seed 1 never evaluated, SWA seed 1 stopped after 2 of 4 evaluations.
    ("Alien", "NA", 0): constant_run(1000.0),
    ("Alien", "NA", 1): constant_run(1000.0),
    ("Alien", "SWA", 0): constant_run(200.0),
    ("Alien", "SWA", 1): constant_run(9999.0, n_evals=2),
    ("Alien", "CWCA", 0): constant_run(5000.0),
}
SE_ONE_APART = 1 / math.sqrt(2)  # two seeds one apart: population std 1, / sqrt(2)

# (game, attn) -> (mean, std_error, n_seeds), by hand from EPISODES.
EXPECTED = {
    ("Pong", "NA"): (3.5, SE_ONE_APART, 2), ("Pong", "SWA"): (1.0, SE_ONE_APART, 2),
    ("Pong", "CWCA"): (11.0, SE_ONE_APART, 2),
    ("Breakout", "NA"): (5.0, 0.0, 2), ("Breakout", "SWA"): (8.0, SE_ONE_APART, 2),
    ("Breakout", "CWCA"): (3.0, 0.0, 2),
    ("Hero", "NA"): (100.0, 0.0, 2), ("Hero", "SWA"): (55.0, 5 * SE_ONE_APART, 2),
    ("Hero", "CWCA"): (100.0, 10 * SE_ONE_APART, 2),
    # One seed: no spread, the standard error is undefined (None), not 0.
    ("Alien", "NA"): (1000.0, 0.0, 2), ("Alien", "SWA"): (200.0, None, 1),
    ("Alien", "CWCA"): (5000.0, None, 1),
}


@pytest.fixture
def study(registry):  # type: ignore[no-untyped-def]
    make_study(registry, "syn", GAMES, ATTNS, SEEDS, EPISODES)
    return registry


def test_cells_winners_and_wins_by_hand(study) -> None:  # type: ignore[no-untyped-def]
    report = build_report(study, ReportOptions("syn", reps=20, figures=False))
    table = report.table
    assert table.games == ["Alien", "Breakout", "Hero", "Pong"]  # catalogue order
    assert table.attns == ["NA", "SWA", "CWCA"]
    for key, (mean, se, n) in EXPECTED.items():
        cell = table.cell(*key)
        assert (cell.n_seeds, cell.expected_seeds) == (n, 2), key
        assert cell.mean == pytest.approx(mean, abs=1e-12), key
        assert cell.std_error == (None if se is None else pytest.approx(se, abs=1e-12)), key
    # Alien: CWCA's one seed (5000) is no candidate, only complete cells are.
    assert table.winners == {"Pong": ["CWCA"], "Breakout": ["SWA"], "Hero": ["NA", "CWCA"],
                             "Alien": ["NA"]}
    # Alien is incomplete: its winner is shown but not counted.
    assert table.complete_games == ["Breakout", "Hero", "Pong"]
    assert table.wins() == {"NA": 1, "SWA": 1, "CWCA": 2}
    by_axis = table.wins_by_axis()
    assert by_axis["horizontal"] == (1, {"NA": 0, "SWA": 0, "CWCA": 1})
    assert by_axis["vertical"] == (1, {"NA": 0, "SWA": 1, "CWCA": 0})
    assert by_axis["no-axis"] == (1, {"NA": 1, "SWA": 0, "CWCA": 1})
    assert by_axis["several-axes"] == (0, {"NA": 0, "SWA": 0, "CWCA": 0})


def test_gaps_are_listed_and_left_out(study) -> None:  # type: ignore[no-untyped-def]
    report = build_report(study, ReportOptions("syn", reps=20, figures=False))
    gaps = report.gaps
    assert gaps.no_evaluations == [("Alien/CWCA/1", "queued")]
    assert gaps.short_runs == [("Alien/SWA/1", "queued", 2, 4)]
    assert sorted(gaps.short_cells) == [("Alien", "CWCA", 1, 2), ("Alien", "SWA", 1, 2)]
    assert gaps.incomplete_games == ["Alien"]
    assert len(gaps.games_not_in_study) == 52
    # Aggregates use the complete games only.
    assert report.aggregates is not None and report.aggregates.games == ["Breakout", "Hero",
                                                                         "Pong"]


def test_aggregate_mean_by_hand(study) -> None:  # type: ignore[no-untyped-def]
    """Mean human-normalised score of NA, from the reference table's numbers typed in here."""
    report = build_report(study, ReportOptions("syn", reps=20, figures=False))
    agg = report.aggregates
    assert agg is not None
    pong = [(2.5 + 20.7) / (14.6 + 20.7), (4.5 + 20.7) / (14.6 + 20.7)]
    breakout = [(5.0 - 1.7) / (30.5 - 1.7)] * 2
    hero = [(100.0 - 1027.0) / (30826.4 - 1027.0)] * 2
    expected_mean = np.mean([np.mean(breakout), np.mean(hero), np.mean(pong)])
    assert agg.point["NA"][2] == pytest.approx(expected_mean, rel=1e-12)
    low, high = agg.ci["NA"][:, 2]
    assert low <= expected_mean <= high


def test_report_csv_from_the_cli_matches_the_hand_table(study, workspace, capsys  # type: ignore[no-untyped-def]
                                                        ) -> None:
    assert run(["report", "-e", "syn", "--format", "csv", "--reps", "20"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == len(GAMES) * len(ATTNS)
    by_key = {(r["game"], r["attn"]): r for r in rows}
    for key, (mean, se, n) in EXPECTED.items():
        row = by_key[key]
        assert float(row["mean"]) == pytest.approx(mean, abs=1e-12)
        if se is None:
            assert row["std_error"] == ""
        else:
            assert float(row["std_error"]) == pytest.approx(se, abs=1e-12)
        assert int(row["n_seeds"]) == n and row["complete"] == str(int(n == 2))
    winners = sorted(k for k, r in by_key.items() if r["winner"] == "1")
    assert winners == sorted([("Pong", "CWCA"), ("Breakout", "SWA"), ("Hero", "NA"),
                              ("Hero", "CWCA"), ("Alien", "NA")])


def test_report_table_shows_gaps_and_wins(study, workspace, capsys) -> None:  # type: ignore[no-untyped-def]
    assert run(["report", "-e", "syn", "--reps", "20"]) == 0
    out = capsys.readouterr().out
    assert "Gaps" in out
    assert "Alien/CWCA/1 [queued]" in out and "Alien/SWA/1 [queued, 2/4]" in out
    assert "5000.0 ± n/a (1/2 seeds)" in out
    wins_line = next(line for line in out.splitlines() if line.startswith("wins"))
    assert wins_line.split()[-3:] == ["1", "1", "2"]


def test_run_means_equal_the_run_scores_view(study) -> None:  # type: ignore[no-untyped-def]
    """The report's per-run means are exactly what SQL users read from run_scores."""
    from sqlalchemy import text

    from orchestrator.analysis.scores import load_study

    with study.session() as session:
        scores = load_study(session, "syn")
        view = {rid: (mean, n) for rid, mean, n in session.execute(text(
            "SELECT run_id, mean_score, n_evaluations FROM run_scores WHERE experiment = 'syn'"))}
    ours = {r.run_id: (r.mean_score, r.n_evaluations) for r in scores.runs
            if r.mean_score is not None}
    assert ours.keys() == view.keys() and len(ours) == 23
    for rid, (mean, n) in ours.items():
        assert mean == pytest.approx(view[rid][0], rel=1e-12) and n == view[rid][1]
