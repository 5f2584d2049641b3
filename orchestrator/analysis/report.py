"""`satrl report`'s service: one experiment from the registry to tables, aggregates and figures.

Everything is read from the registry in one read session (`scores.load_study`); nothing is read
from run directories or the store. Gaps (runs without evaluations, runs short of their evaluations,
evaluations off a run's grid, cells with fewer seeds than their game, games left out of wins and
aggregates) are collected here and always rendered, so an unfinished study is never averaged as if
it were complete.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from agents.catalog import GAMES
from orchestrator.analysis.aggregates import (
    DEFAULT_REPS,
    Aggregates,
    aggregate_games,
    compute_aggregates,
)
from orchestrator.analysis.compare import Comparison, compare_tables
from orchestrator.analysis.curves import Curve, learning_curves
from orchestrator.analysis.reference import reference_scores
from orchestrator.analysis.scores import StudyScores, describe_grid, load_study
from orchestrator.analysis.table import GameTable, build_table
from orchestrator.errors import UsageError
from orchestrator.registry.db import Registry


@dataclass(frozen=True)
class ReportOptions:
    experiment: str
    compare: str | None = None
    videopinball_random: str = "paper"
    reps: int = DEFAULT_REPS
    seed: int = 0
    figures: bool = True


@dataclass
class Gaps:
    """What the study lacks; empty lists mean a complete study."""

    no_evaluations: list[tuple[str, str]] = field(default_factory=list)  # (run key, state)
    short_runs: list[tuple[str, str, int, int]] = field(default_factory=list)  # key, state, n, of
    short_cells: list[tuple[str, str, int, int]] = field(default_factory=list)  # game, attn, n, of
    incomplete_games: list[str] = field(default_factory=list)
    games_not_in_study: list[str] = field(default_factory=list)
    #: (run key, timesteps): evaluations off the run's evaluation grid, ignored by every score.
    off_grid: list[tuple[str, list[int]]] = field(default_factory=list)
    #: Complete games left out of the aggregates: another number of seeds than the rest.
    aggregates_left_out: list[str] = field(default_factory=list)

    @property
    def any(self) -> bool:
        return bool(self.no_evaluations or self.short_runs or self.short_cells
                    or self.incomplete_games or self.off_grid or self.aggregates_left_out)


@dataclass
class Report:
    options: ReportOptions
    study: StudyScores
    table: GameTable
    gaps: Gaps
    aggregates: Aggregates | None
    comparison: Comparison | None
    curves: dict[str, list[Curve]]
    figures: dict[str, bytes] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)


def find_gaps(study: StudyScores, table: GameTable) -> Gaps:
    gaps = Gaps()
    for run in study.runs:
        if run.n_evaluations == 0:
            gaps.no_evaluations.append((run.key, run.state))
        elif not run.complete:
            gaps.short_runs.append((run.key, run.state, run.n_evaluations,
                                    run.expected_evaluations))
        if run.off_grid:
            gaps.off_grid.append((run.key, run.off_grid))
    for (game, attn), cell in table.cells.items():
        if not cell.complete:
            gaps.short_cells.append((game, attn, cell.n_seeds, cell.expected_seeds))
    gaps.incomplete_games = table.incomplete_games
    gaps.aggregates_left_out = aggregate_games(table)[1]
    gaps.games_not_in_study = [g for g in GAMES if g not in set(study.games)]
    return gaps


def build_report(registry: Registry, options: ReportOptions) -> Report:
    if options.reps < 1:
        raise UsageError(f"--reps must be at least 1, not {options.reps}")
    # numpy's global seed is 32-bit, and the estimates use seed .. seed + 3.
    if not 0 <= options.seed <= 2**32 - 4:
        raise UsageError(f"--seed must be in 0..{2**32 - 4}, not {options.seed}")
    reference = reference_scores(options.videopinball_random)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    with registry.session() as session:
        study = load_study(session, options.experiment)
        other = load_study(session, options.compare) if options.compare else None
    if not study.runs:
        raise UsageError(f"experiment {options.experiment!r} has no runs; queue or import some")
    timings["load"] = time.perf_counter() - start

    start = time.perf_counter()
    table = build_table(study)
    gaps = find_gaps(study, table)
    comparison = None
    if other is not None:
        grids_differ = None
        if other.runs and study.grid.tolist() != other.grid.tolist():
            grids_differ = (describe_grid(study.grid.tolist()),
                            describe_grid(other.grid.tolist()))
        comparison = compare_tables(table, build_table(other), other.experiment, grids_differ)
    curves = learning_curves(study)
    timings["table"] = time.perf_counter() - start

    start = time.perf_counter()
    aggregates = compute_aggregates(study, table, reference, reps=options.reps, seed=options.seed)
    timings["aggregates"] = time.perf_counter() - start

    report = Report(options, study, table, gaps, aggregates, comparison, curves,
                    timings_s=timings)
    if options.figures:
        start = time.perf_counter()
        report.figures = make_figures(report)
        timings["figures"] = time.perf_counter() - start
    return report


def make_figures(report: Report) -> dict[str, bytes]:
    """File name -> PNG bytes: aggregates first, then the overview, then one per game."""
    from orchestrator.analysis import figures

    out: dict[str, bytes] = {}
    agg = report.aggregates
    if agg is not None:
        out["aggregates.png"] = figures.aggregates_png(agg)
        if agg.poi:
            out["probability_of_improvement.png"] = figures.probability_of_improvement_png(agg)
        out["performance_profiles.png"] = figures.performance_profiles_png(agg)
        out["sample_efficiency.png"] = figures.sample_efficiency_png(agg)
    if report.curves:
        out["learning_curves.png"] = figures.learning_curves_grid_png(report.curves)
        for game, curves in report.curves.items():
            out[f"curves/{game}.png"] = figures.learning_curve_png(game, curves)
    return out
