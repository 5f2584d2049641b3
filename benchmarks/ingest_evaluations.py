"""Ingesting the evaluations of the whole study: 1,400 runs x 50 evaluations x 5 episodes.

For SQLite and PostgreSQL (a fresh database created and dropped here, on the server of --pg-url),
times what `satrl fetch` does per run after its copy: read evaluations.npz and replace the run's
evaluations rows in one transaction per run (the service's own functions). It also times a second
pass over the same runs (every run's rows dropped and rewritten, as for resumed runs), and a naive
baseline in the same run on a subset: the obvious ORM loop (load and delete the run's rows one
object at a time, then one `Evaluation` object and one flush per row), extrapolated to all runs.
Target (issue 5): under 10 s per backend. The run_scores view is checked against numpy.

    python benchmarks/ingest_evaluations.py [--runs 1400] [--baseline-runs 20]
        [--pg-url postgresql+psycopg://postgres@127.0.0.1:5432/postgres] [--backends sqlite,...]
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from sqlalchemy import select, text

from agents.catalog import ATTENTION_TYPES, GAMES, PAPER_SEEDS
from orchestrator.queueing import QueueRequest, queue_runs
from orchestrator.registry.db import Registry
from orchestrator.registry.models import Evaluation, Run
from orchestrator.registry.scratch import throwaway_database
from orchestrator.store.ingest import read_evaluations, replace_evaluations

TARGET_S = 10.0


def write_npz_files(folder: Path, n_runs: int, n_evals: int, episodes: int) -> list[Path]:
    """One evaluations.npz per run, in the worker's layout (SB3 EvalCallback's arrays)."""
    rng = np.random.default_rng(0)
    files = []
    for i in range(n_runs):
        buffer = io.BytesIO()
        np.savez(buffer, timesteps=np.arange(1, n_evals + 1, dtype=np.int64) * 200_000,
                 results=rng.normal(0, 10, size=(n_evals, episodes)).round(1),
                 ep_lengths=rng.integers(500, 20_000, size=(n_evals, episodes)))
        path = folder / f"{i}.npz"
        path.write_bytes(buffer.getvalue())
        files.append(path)
    return files


def grid_run_ids(registry: Registry, n_runs: int) -> list[int]:
    seeds = list(PAPER_SEEDS)
    queue_runs(registry, QueueRequest("main", list(GAMES), list(ATTENTION_TYPES), seeds))
    with registry.session() as session:
        ids = list(session.scalars(select(Run.id).order_by(Run.id)))
    if len(ids) < n_runs:
        raise SystemExit(f"the study grid has {len(ids)} runs; --runs must be at most that")
    return ids[:n_runs]


def ingest_all(registry: Registry, run_ids: list[int], files: list[Path]) -> float:
    """What fetch does per run: read the file, replace the rows, commit."""
    start = time.perf_counter()
    for run_id, path in zip(run_ids, files, strict=True):
        data = read_evaluations(path)
        with registry.write() as session:
            replace_evaluations(session, run_id, data)
    return time.perf_counter() - start


def naive_ingest(registry: Registry, run_ids: list[int], files: list[Path]) -> float:
    """The obvious ORM loop: delete object by object, add and flush one object per row."""
    start = time.perf_counter()
    for run_id, path in zip(run_ids, files, strict=True):
        with np.load(path) as data:
            timesteps, results, lengths = data["timesteps"], data["results"], data["ep_lengths"]
        with registry.write() as session:
            for old in session.scalars(select(Evaluation).where(Evaluation.run_id == run_id)):
                session.delete(old)
            session.flush()
            for i, timestep in enumerate(timesteps):
                for episode in range(results.shape[1]):
                    session.add(Evaluation(run_id=run_id, timestep=int(timestep), episode=episode,
                                           score=float(results[i, episode]),
                                           length=int(lengths[i, episode]), n_episodes=1))
                    session.flush()
    return time.perf_counter() - start


def check(registry: Registry, run_ids: list[int], files: list[Path], episodes: int) -> None:
    with registry.session() as session:
        count = session.scalar(text("SELECT COUNT(*) FROM evaluations"))
        scores = dict(session.execute(text("SELECT run_id, mean_score FROM run_scores")).all())
    n_evals = read_evaluations(files[0]).results.shape[0]
    assert count == len(run_ids) * n_evals * episodes, count
    for run_id, path in list(zip(run_ids, files, strict=True))[:: max(1, len(run_ids) // 50)]:
        expected = read_evaluations(path).results.mean(axis=1).mean()
        assert abs(scores[run_id] - expected) < 1e-9, (run_id, scores[run_id], expected)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1400)
    parser.add_argument("--evals", type=int, default=50)
    parser.add_argument("--episodes", type=int, default=5)
    parser.add_argument("--baseline-runs", type=int, default=20)
    parser.add_argument("--pg-url", default=os.environ.get(
        "SATRL_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"))
    parser.add_argument("--backends", default="sqlite,postgresql")
    args = parser.parse_args()
    rows = args.runs * args.evals * args.episodes
    print(f"ingesting evaluations of {args.runs} runs x {args.evals} evaluations x "
          f"{args.episodes} episodes = {rows:,} rows per backend (target < {TARGET_S:.0f} s)")
    with tempfile.TemporaryDirectory(prefix="satrl-bench-") as tmp:
        folder = Path(tmp)
        files = write_npz_files(folder, args.runs, args.evals, args.episodes)
        failed = False
        for kind in args.backends.split(","):
            with throwaway_database(kind, args.pg_url, folder) as url:
                registry = Registry(url)
                run_ids = grid_run_ids(registry, args.runs)
                first = ingest_all(registry, run_ids, files)
                again = ingest_all(registry, run_ids, files)
                check(registry, run_ids, files, args.episodes)
                n_base = min(args.baseline_runs, args.runs)
                naive = naive_ingest(registry, run_ids[:n_base], files[:n_base])
                naive_all = naive * args.runs / n_base
                check(registry, run_ids, files, args.episodes)
                registry.dispose()
            ok = first < TARGET_S and again < TARGET_S
            failed |= not ok
            print(f"{kind:10s}  first ingest {first:6.2f} s ({rows / first:,.0f} rows/s)   "
                  f"re-ingest (replace) {again:6.2f} s   naive ORM {naive:6.2f} s for {n_base} "
                  f"runs -> ~{naive_all:,.0f} s for {args.runs} "
                  f"({naive_all / first:,.0f}x slower)   {'OK' if ok else 'OVER TARGET'}")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
