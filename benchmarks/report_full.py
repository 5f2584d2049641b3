"""The full report for the published study: 56 games x 5 types x 5 seeds, 2,000 bootstrap reps.

Imports the published pickle into a temporary SQLite registry (and PostgreSQL with --pg-url),
then times each stage of `satrl report --format html --out DIR`: load (SQL), table, aggregates
(rliable bootstrap), figures (61 PNGs), render + write. Baseline, measured in the same run: the
aggregates with rliable's stock estimators for the probability of improvement (scipy's
Mann-Whitney U per game and replicate) and the performance profile (np.vectorize per tau), at
--baseline-reps repetitions and scaled linearly to --reps (bootstrap cost is linear in reps).

    python benchmarks/report_full.py [--reps 2000] [--baseline-reps 100] [--pg-url URL]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from orchestrator.analysis.aggregates import TAUS, seeded
from orchestrator.analysis.published import import_results
from orchestrator.analysis.reference import reference_scores
from orchestrator.analysis.render import write_report
from orchestrator.analysis.report import ReportOptions, build_report
from orchestrator.analysis.scores import load_study
from orchestrator.analysis.table import build_table
from orchestrator.registry.db import Registry
from orchestrator.registry.scratch import throwaway_database

PUBLISHED = Path(__file__).resolve().parents[2] / "shared/reference/post_processed_results_56.pkl"


def baseline_aggregates(registry: Registry, reps: int) -> float:
    """rliable's stock PoI and profile functions on the same matrices; seconds."""
    from rliable import library as rly
    from rliable import metrics

    from orchestrator.analysis.aggregates import aggregate_metrics, score_matrices

    with registry.session() as session:
        study = load_study(session, "paper")
    table = build_table(study)
    finals, _, _ = score_matrices(study, table, reference_scores("paper"), table.complete_games)
    start = time.perf_counter()
    with seeded(0):
        rly.get_interval_estimates(finals, aggregate_metrics, reps=reps)
        pairs = {a: (finals[a], np.concatenate([finals[o] for o in finals if o != a]))
                 for a in finals}
        rly.get_interval_estimates(pairs, metrics.probability_of_improvement, reps=reps)
        rly.create_performance_profile(finals, TAUS, reps=reps)
    return time.perf_counter() - start


def bench(kind: str, url: str, folder: Path, reps: int, baseline_reps: int) -> None:
    registry = Registry(url)
    start = time.perf_counter()
    result = import_results(registry, PUBLISHED, "paper")
    import_s = time.perf_counter() - start
    assert result.evaluations_added == 70_000, result

    start = time.perf_counter()
    report = build_report(registry, ReportOptions("paper", reps=reps, seed=0))
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    written = write_report(report, "html", folder / f"out-{kind}")
    write_s = time.perf_counter() - start
    html_mb = written[0].stat().st_size / 1e6

    print(f"[{kind}] import 1,400 runs + 70,000 evaluations: {import_s:6.2f} s")
    for stage, seconds in report.timings_s.items():
        print(f"[{kind}] report stage {stage:<11}            {seconds:6.2f} s")
    print(f"[{kind}] report stage render+write            {write_s:6.2f} s "
          f"(report.html {html_mb:.1f} MB, {len(written) - 1} PNGs)")
    print(f"[{kind}] whole report ({reps} reps)              {build_s + write_s:6.2f} s")
    if baseline_reps and kind == "sqlite":
        ours_s = report.timings_s["aggregates"]
        base_s = baseline_aggregates(registry, baseline_reps) * reps / baseline_reps
        print(f"[{kind}] aggregates, stock rliable estimators (measured at {baseline_reps} "
              f"reps, scaled to {reps}): {base_s:6.2f} s vs {ours_s:.2f} s here "
              f"({base_s / ours_s:.1f}x)")
    registry.dispose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=2000)
    parser.add_argument("--baseline-reps", type=int, default=100)
    parser.add_argument("--pg-url", default=None,
                        help="also on PostgreSQL (e.g. postgresql+psycopg://postgres@127.0.0.1/x)")
    args = parser.parse_args()
    if not PUBLISHED.exists():
        print(f"missing {PUBLISHED}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for kind in ("sqlite", "postgresql") if args.pg_url else ("sqlite",):
            with throwaway_database(kind, args.pg_url, folder) as url:
                bench(kind, url, folder, args.reps, args.baseline_reps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
