"""metrics.csv over a whole paper run: rows appended (the worker) vs rewritten whole (baseline).

A paper run makes 10M / 2,048 = 4,883 PPO updates, one metrics.csv row each. The baseline is the
worker's former writer, in the same run: every new row rewrites the whole file to a temporary,
fsyncs it and renames it over metrics.csv (MetricsTable.save after each append). Prints the
seconds and bytes written over the run, and the cost of one row at the end of it.

    python benchmarks/metrics_writes.py [--updates 4883] [--dir /scratch/...]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from agents.callbacks import METRIC_COLUMNS, MetricsTable
from agents.rundir import METRICS_CSV

#: Updates of a paper run: 10M agent steps / (16 envs x 128 steps).
PAPER_UPDATES = 10_000_000 // 2_048


def _row(update: int) -> dict[str, float]:
    # Values with the digits of real ones (repr of float32 statistics widened to float).
    row: dict[str, float] = {name: 0.123456789 * (update + i) for i, name in
                             enumerate(METRIC_COLUMNS)}
    row["timesteps"] = (update + 1) * 2_048
    return row


def write_run(folder: Path, updates: int, rewrite: bool) -> tuple[float, int, float]:
    """(total s, bytes written, s per row over the last 100 rows) of one run's metrics."""
    table = MetricsTable(folder / METRICS_CSV)
    written = 0
    tail: list[float] = []
    start = time.perf_counter()
    for update in range(updates):
        t0 = time.perf_counter()
        table.append(_row(update))
        if rewrite:
            table.save()  # the former writer: the whole file, fsynced, renamed
            written += table.path.stat().st_size
        tail = (tail + [time.perf_counter() - t0])[-100:]
    total = time.perf_counter() - start
    if not rewrite:
        written = table.path.stat().st_size
    return total, written, sum(tail) / len(tail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=PAPER_UPDATES)
    parser.add_argument("--dir", type=Path, default=None,
                        help="where to write (default: a temporary folder; use the cluster's "
                             "scratch filesystem to measure it)")
    args = parser.parse_args()
    print(f"metrics.csv of {args.updates} updates (a paper run makes {PAPER_UPDATES})")
    print(f"{'writer':<28}{'total s':>10}{'MB written':>12}{'ms per row at the end':>24}")
    results = {}
    for name, rewrite in (("rewrite whole (baseline)", True), ("append (worker)", False)):
        with tempfile.TemporaryDirectory(dir=args.dir) as folder:
            total, written, last = write_run(Path(folder), args.updates, rewrite)
            final_size = (Path(folder) / METRICS_CSV).stat().st_size
        results[name] = (total, written, last, final_size)
        print(f"{name:<28}{total:>10.2f}{written / 1e6:>12.1f}{last * 1e3:>24.3f}")
    (base_t, _, base_last, base_size), (new_t, _, new_last, new_size) = results.values()
    assert base_size == new_size, "both writers must end with the same file"
    print(f"append / rewrite: {base_t / new_t:.0f}x less time over the run, "
          f"{base_last / new_last:.0f}x per row at the end; final file {new_size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
