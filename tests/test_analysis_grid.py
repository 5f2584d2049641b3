"""Runs scored on their spec's evaluation grid, aligned by timestep; complete runs and cells only.

Every test runs on SQLite and PostgreSQL: the report reads run_scores, and the views (run_scores,
game_table) must say the same as the report. The studies use analysis_support's spec: paper preset
with 4 evaluations 256 steps apart, so the grid is 256, 512, 768, 1024.
"""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
from sqlalchemy import text

from orchestrator.analysis.report import ReportOptions, build_report
from orchestrator.analysis.scores import evaluation_grid
from orchestrator.queueing import QueueRequest, queue_runs
from orchestrator.registry.db import Registry
from tests.analysis_support import (
    EVAL_EVERY,
    OVERRIDES,
    add_evaluations,
    constant_run,
    make_study,
    remove_evaluations,
)

GRID = [256, 512, 768, 1024]
GAMES, ATTNS, SEEDS = ["Pong", "Breakout"], ["NA", "CWCA"], [0, 1]
# Run means: Pong NA 2, 4; CWCA 10, 12; Breakout NA 5, 7; CWCA 1, 3.
BASE = {("Pong", "NA"): 2.0, ("Pong", "CWCA"): 10.0, ("Breakout", "NA"): 5.0,
        ("Breakout", "CWCA"): 1.0}


def _study(registry: Registry, name: str = "g", games: list[str] | None = None) -> None:
    games = games or GAMES
    episodes = {(g, a, s): constant_run(BASE.get((g, a), 50.0) + 2 * s)
                for g in games for a in ATTNS for s in SEEDS}
    make_study(registry, name, games, ATTNS, SEEDS, episodes)


def _report(registry: Registry, name: str = "g"):  # type: ignore[no-untyped-def]
    return build_report(registry, ReportOptions(name, reps=20, figures=False))


def _run_scores(registry: Registry, game: str, attn: str, seed: int) -> dict:
    with registry.session() as session:
        row = session.execute(text(
            "SELECT mean_score, last_score, n_evaluations, last_timestep, expected_evaluations, "
            "n_off_grid, complete FROM run_scores "
            "WHERE game = :g AND attn = :a AND seed = :s"), {"g": game, "a": attn, "s": seed})
        return dict(row.mappings().one())


def _game_table(registry: Registry, game: str, attn: str) -> dict:
    with registry.session() as session:
        row = session.execute(text(
            "SELECT n_seeds, mean_score, std_error, expected_seeds, n_left_out, complete "
            "FROM game_table WHERE game = :g AND attn = :a"), {"g": game, "a": attn})
        return dict(row.mappings().one())


def test_the_grid_of_a_spec() -> None:
    spec = {"total_timesteps": 1024, "eval_every_steps": 256, "n_envs": 16}
    assert evaluation_grid(spec).tolist() == GRID
    paper = evaluation_grid({"total_timesteps": 10_000_000, "eval_every_steps": 200_000,
                             "n_envs": 16})
    assert paper.tolist() == list(range(200_000, 10_000_001, 200_000)) and len(paper) == 50
    # A budget that is no multiple of the interval: the last multiple below it.
    assert evaluation_grid({**spec, "total_timesteps": 1100 - 1100 % 16}).tolist() == GRID
    # The worker evaluates at the first step (n_envs agent steps) at or past each multiple.
    assert evaluation_grid({**spec, "eval_every_steps": 250}).tolist() == [256, 512, 752, 1008]
    # Shorter intervals than one step: one evaluation per step.
    assert evaluation_grid({**spec, "eval_every_steps": 10, "total_timesteps": 64}).tolist() \
        == [16, 32, 48, 64]
    for broken in ({}, {**spec, "eval_every_steps": 0}, {**spec, "total_timesteps": "1024"},
                   {**spec, "n_envs": None}, {**spec, "eval_every_steps": 2048}):
        assert evaluation_grid(broken).tolist() == []


def test_an_interval_that_is_no_multiple_of_the_envs_is_scored_where_the_worker_evaluates(
        registry: Registry) -> None:
    """Every 250 steps with 16 envs: evaluations at 256, 512, 752, 1008; the view agrees."""
    queue_runs(registry, QueueRequest("odd", ["Pong"], ["NA"], [0], overrides={
        "total_timesteps": "1024", "eval_every_steps": "250"}))
    add_evaluations(registry, "odd", ("Pong", "NA", 0),
                    {256: [1.0], 512: [2.0], 752: [3.0], 768: [50.0], 1008: [4.0], 1024: [50.0]})
    report = _report(registry, "odd")
    (run,) = report.study.runs
    assert run.grid.tolist() == [256, 512, 752, 1008]
    assert run.complete and run.mean_score == pytest.approx(2.5, abs=1e-12)
    assert report.gaps.off_grid == [("Pong/NA/0", [768, 1024])]
    assert _run_scores(registry, "Pong", "NA", 0) == pytest.approx(
        {"mean_score": 2.5, "last_score": 4.0, "n_evaluations": 4, "last_timestep": 1008,
         "expected_evaluations": 4, "n_off_grid": 2, "complete": 1})


def test_evaluations_off_the_grid_are_ignored_and_listed(registry: Registry) -> None:
    """An evaluation past the budget, or between the grid's points, moves no number."""
    _study(registry)
    # Pong/NA/0 scores 2 at every point of its grid; 1000 off it.
    add_evaluations(registry, "g", ("Pong", "NA", 0),
                    {128: [1000.0], 384: [1000.0], 1280: [1000.0, 1000.0]})
    report = _report(registry)
    run = next(r for r in report.study.runs if r.key == "Pong/NA/0")
    assert run.complete and run.mean_score == pytest.approx(2.0, abs=1e-12)
    assert (run.n_evaluations, run.expected_evaluations) == (4, 4)
    cell = report.table.cell("Pong", "NA")
    assert (cell.n_seeds, cell.complete) == (2, True)
    assert cell.mean == pytest.approx(3.0, abs=1e-12)
    assert report.gaps.off_grid == [("Pong/NA/0", [128, 384, 1280])]
    assert report.gaps.short_runs == [] and report.table.incomplete_games == []
    curve = next(c for c in report.curves["Pong"] if c.attn == "NA")
    assert curve.timesteps.tolist() == GRID
    assert curve.mean == pytest.approx(np.full(4, 3.0), abs=1e-12)
    # run_scores scores it the same way, and says what it left out.
    assert _run_scores(registry, "Pong", "NA", 0) == pytest.approx(
        {"mean_score": 2.0, "last_score": 2.0, "n_evaluations": 4, "last_timestep": 1024,
         "expected_evaluations": 4, "n_off_grid": 3, "complete": 1})
    assert _game_table(registry, "Pong", "NA")["mean_score"] == pytest.approx(3.0, abs=1e-12)


def test_evaluations_are_placed_by_timestep_not_by_position(registry: Registry) -> None:
    """Four evaluations, but the first point of the grid missing: incomplete, not shifted."""
    _study(registry)
    remove_evaluations(registry, "g", ("Pong", "NA", 0), 256)
    add_evaluations(registry, "g", ("Pong", "NA", 0), {1280: [1000.0]})
    # A complete run with an early extra evaluation must not shift the curves' x axis either.
    add_evaluations(registry, "g", ("Breakout", "NA", 0), {128: [-500.0]})
    report = _report(registry)
    run = next(r for r in report.study.runs if r.key == "Pong/NA/0")
    assert not run.complete
    assert report.gaps.short_runs == [("Pong/NA/0", "succeeded", 3, 4)]
    assert report.gaps.off_grid == [("Breakout/NA/0", [128]), ("Pong/NA/0", [1280])]
    assert np.isnan(run.grid_means[0]) and run.grid_means[1:] == pytest.approx([2.0] * 3)
    cell = report.table.cell("Pong", "NA")
    assert (cell.n_seeds, cell.expected_seeds, cell.complete) == (1, 2, False)
    assert cell.mean == pytest.approx(4.0) and cell.std_error is None
    assert report.table.incomplete_games == ["Pong"]
    agg = report.aggregates
    assert agg is not None and agg.games == ["Breakout"]
    assert agg.eval_timesteps == [256, 1024]  # evaluations 0 and 3 of the grid
    breakout = next(c for c in report.curves["Breakout"] if c.attn == "NA")
    assert breakout.timesteps.tolist() == GRID
    assert breakout.mean == pytest.approx(np.full(4, 6.0), abs=1e-12)
    # The views: the run is not complete, and its cell averages the complete run only.
    scores = _run_scores(registry, "Pong", "NA", 0)
    assert (scores["n_evaluations"], scores["n_off_grid"], scores["complete"]) == (3, 1, 0)
    assert _game_table(registry, "Pong", "NA") == pytest.approx(
        {"n_seeds": 1, "mean_score": 4.0, "std_error": None, "expected_seeds": 2,
         "n_left_out": 1, "complete": 0})


def test_game_table_averages_complete_runs_only(registry: Registry) -> None:
    """A run short of its last evaluation is left out of game_table, as of the report."""
    _study(registry)
    remove_evaluations(registry, "g", ("Breakout", "CWCA", 1), 1024)
    report = _report(registry)
    cell = report.table.cell("Breakout", "CWCA")
    assert (cell.n_seeds, cell.mean) == (1, pytest.approx(1.0))
    assert _run_scores(registry, "Breakout", "CWCA", 1)["complete"] == 0
    assert _game_table(registry, "Breakout", "CWCA") == pytest.approx(
        {"n_seeds": 1, "mean_score": 1.0, "std_error": None, "expected_seeds": 2,
         "n_left_out": 1, "complete": 0})
    # Complete cells: the table's numbers (population std / sqrt(n)).
    row = _game_table(registry, "Pong", "CWCA")
    table_cell = report.table.cell("Pong", "CWCA")
    assert row == pytest.approx({"n_seeds": 2, "mean_score": table_cell.mean,
                                 "std_error": table_cell.std_error, "expected_seeds": 2,
                                 "n_left_out": 0, "complete": 1}, abs=1e-12)
    assert table_cell.std_error == pytest.approx(1.0 / np.sqrt(2), abs=1e-12)


def test_a_cell_short_of_seeds_neither_wins_nor_shows_an_error_of_zero(
        registry: Registry, workspace, capsys) -> None:  # type: ignore[no-untyped-def]
    """One lucky seed (100) beats the complete cells' means, but is no winner; its s.e. is n/a."""
    from orchestrator.cli import run

    episodes = {(g, a, s): constant_run(BASE[(g, a)] + 2 * s)
                for g in GAMES for a in ATTNS for s in SEEDS}
    episodes[("Breakout", "CWCA", 0)] = constant_run(100.0)
    del episodes[("Breakout", "CWCA", 1)]
    make_study(registry, "g", GAMES, ATTNS, SEEDS, episodes)
    report = _report(registry)
    cell = report.table.cell("Breakout", "CWCA")
    assert (cell.n_seeds, cell.mean, cell.std_error) == (1, 100.0, None)
    assert report.table.winners["Breakout"] == ["NA"]
    assert report.table.wins() == {"NA": 0, "CWCA": 1}  # Breakout is not counted
    assert run(["report", "-e", "g", "-f", "csv", "--reps", "20"]) == 0
    rows = {(r["game"], r["attn"]): r for r in csv.DictReader(io.StringIO(
        capsys.readouterr().out))}
    assert rows[("Breakout", "CWCA")]["std_error"] == ""
    assert rows[("Breakout", "CWCA")]["winner"] == "0" and rows[("Breakout", "NA")]["winner"] == "1"
    assert run(["report", "-e", "g", "-f", "md", "--reps", "20"]) == 0
    md = capsys.readouterr().out
    assert "100.00 ± n/a (1/2 seeds)" in md and "± 0.00" not in md


def test_a_stray_run_makes_only_its_own_game_incomplete(registry: Registry) -> None:
    """Pong/NA/7 queued and never run: Pong lacks seed 7 everywhere; Breakout is unaffected."""
    _study(registry)
    queue_runs(registry, QueueRequest("g", ["Pong"], ["NA"], [7], overrides=OVERRIDES))
    report = _report(registry)
    table = report.table
    assert table.expected_seeds == {"Pong": 3, "Breakout": 2}
    assert table.incomplete_games == ["Pong"] and table.complete_games == ["Breakout"]
    assert all(table.cell("Breakout", a).complete for a in ATTNS)
    assert sorted(report.gaps.short_cells) == [("Pong", "CWCA", 2, 3), ("Pong", "NA", 2, 3)]
    assert report.gaps.no_evaluations == [("Pong/NA/7", "queued")]
    assert table.wins() == {"NA": 1, "CWCA": 0}
    assert report.aggregates is not None and report.aggregates.games == ["Breakout"]
    assert _game_table(registry, "Pong", "NA")["n_left_out"] == 1
    assert _game_table(registry, "Pong", "NA")["expected_seeds"] == 3
    assert _game_table(registry, "Breakout", "NA")["complete"] == 1


def test_complete_games_with_another_number_of_seeds_are_left_out_of_the_aggregates(
        registry: Registry) -> None:
    """rliable needs one (runs x games) matrix: Pong, complete with 3 seeds, is listed instead."""
    games = ["Pong", "Breakout", "Hero"]
    _study(registry, games=games)
    queue_runs(registry, QueueRequest("g", ["Pong"], ATTNS, [7], overrides=OVERRIDES))
    for attn in ATTNS:
        add_evaluations(registry, "g", ("Pong", attn, 7),
                        {t: [20.0] for t in range(EVAL_EVERY, 4 * EVAL_EVERY + 1, EVAL_EVERY)})
    report = _report(registry)
    assert report.table.complete_games == ["Breakout", "Hero", "Pong"]
    assert report.table.cell("Pong", "NA").n_seeds == 3
    assert report.aggregates is not None and report.aggregates.games == ["Breakout", "Hero"]
    assert report.gaps.aggregates_left_out == ["Pong"]
    # Breakout: NA; Pong: CWCA; Hero: a tie, a win for each.
    assert report.table.wins() == {"NA": 2, "CWCA": 2}


def test_a_study_whose_runs_have_different_grids_is_refused(registry: Registry) -> None:
    """One experiment is one spec; runs on two grids cannot share curves or aggregates."""
    from sqlalchemy import select, update

    from orchestrator.errors import UsageError
    from orchestrator.registry.models import Run

    _study(registry)
    with registry.write() as session:
        run_id, spec = session.execute(select(Run.id, Run.spec).where(
            Run.game == "Pong", Run.attn == "NA", Run.seed == 0)).one()
        session.execute(update(Run).where(Run.id == run_id)
                        .values(spec={**spec, "total_timesteps": 2048}))
    with pytest.raises(UsageError, match="different evaluation grids"):
        _report(registry)
