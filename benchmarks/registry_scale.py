"""Registry at study scale: queueing the 1,400-run grid and `status` over 100,000 runs.

For SQLite and PostgreSQL, times the service function and the whole `satrl` process, and a naive
baseline in the same run (row-by-row ORM inserts with an existence check; status by loading every
run object and counting in Python). Targets (issue 2): queue < 1 s, status service < 0.5 s,
whole process < 1.5 s.

    python benchmarks/registry_scale.py [--runs 100000] [--pg-url postgresql+psycopg://...]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import select

from agents.catalog import ATTENTION_TYPES, GAMES, PAPER_SEEDS
from orchestrator.queueing import QueueRequest, queue_runs, run_specs
from orchestrator.registry.db import Registry
from orchestrator.registry.models import Experiment, Run, RunState
from orchestrator.registry.queries import RunFilter, status_summary
from orchestrator.registry.scratch import throwaway_database

ALL = ["all"]


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def satrl_process(url: str, workspace: Path, *args: str) -> float:
    env = {**os.environ, "SATRL_DATABASE_URL": url, "SATRL_HOME": str(workspace)}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "orchestrator", *args], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def grid_request(seeds: list[int], experiment: str = "main") -> QueueRequest:
    return QueueRequest(experiment, list(GAMES), list(ATTENTION_TYPES), seeds)


def naive_queue(registry: Registry, request: QueueRequest) -> None:
    """The obvious ORM loop: look each run up, add it if missing, one flush per run."""
    with registry.write() as session:
        experiment = session.scalar(select(Experiment).where(Experiment.name == request.experiment))
        if experiment is None:
            experiment = Experiment(name=request.experiment, preset="paper", overrides={})
            session.add(experiment)
            session.flush()
        for spec in run_specs(request):
            exists = session.scalar(select(Run.id).where(
                Run.experiment_id == experiment.id, Run.game == spec.game, Run.attn == spec.attn,
                Run.seed == spec.seed))
            if exists is None:
                session.add(Run(experiment_id=experiment.id, game=spec.game, attn=spec.attn,
                                seed=spec.seed, spec=spec.to_dict(), spec_hash=spec.spec_hash(),
                                state=RunState.QUEUED.value))
                session.flush()


def naive_status(registry: Registry) -> None:
    with registry.session() as session:
        Counter((r.game, r.attn, r.state) for r in session.scalars(select(Run)))


def bench(kind: str, pg_url: str, n_runs: int, folder: Path) -> list[tuple[str, float, float]]:
    rows: list[tuple[str, float, float]] = []  # (what, seconds, target)
    grid = grid_request(list(PAPER_SEEDS))
    with throwaway_database(kind, pg_url, folder) as url:
        registry = Registry(url)
        rows.append(("queue 1,400: service", timed(lambda: queue_runs(registry, grid)), 1.0))
        rows.append(("queue 1,400 again (adds 0): service",
                     timed(lambda: queue_runs(registry, grid)), 1.0))
        registry.dispose()
    with throwaway_database(kind, pg_url, folder) as url:
        registry = Registry(url)
        rows.append(("queue 1,400: naive ORM baseline",
                     timed(lambda: naive_queue(registry, grid)), float("nan")))
        registry.dispose()
    with throwaway_database(kind, pg_url, folder) as url:
        workspace = folder / uuid.uuid4().hex
        workspace.mkdir()
        rows.append(("queue 1,400: whole process, fresh registry",
                     satrl_process(url, workspace, "queue", "--games", "all", "--attn", "all",
                                   "--seeds", "5"), 1.5))
        # Grow the registry to n_runs with extra seeds, then time status.
        per_seed = len(GAMES) * len(ATTENTION_TYPES)
        extra = list(range(10_000, 10_000 + max(0, -(-n_runs // per_seed) - len(PAPER_SEEDS))))
        registry = Registry(url)
        for start in range(0, len(extra), 50):
            queue_runs(registry, grid_request(extra[start:start + 50]))
        with registry.session() as session:
            total = status_summary(session, RunFilter(), with_runs=False).total

        def service(with_runs: bool) -> None:
            with registry.session() as session:
                status_summary(session, RunFilter(), with_runs=with_runs)

        service(False)  # warm the caches once, as a second command would find them
        rows.append((f"status over {total:,}: service", timed(lambda: service(False)), 0.5))
        rows.append((f"status over {total:,}: service with runs (--json)",
                     timed(lambda: service(True)), float("nan")))
        rows.append((f"status over {total:,}: naive ORM baseline",
                     timed(lambda: naive_status(registry)), float("nan")))
        rows.append((f"status over {total:,}: whole process",
                     satrl_process(url, workspace, "status"), 1.5))
        rows.append((f"status --json over {total:,}: whole process",
                     satrl_process(url, workspace, "status", "--json"), float("nan")))
        registry.dispose()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--pg-url", default=os.environ.get(
        "SATRL_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"))
    parser.add_argument("--backends", default="sqlite,postgresql")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.backends.split(","):
            print(f"\n{kind}")
            for what, seconds, target in bench(kind, args.pg_url, args.runs, Path(tmp)):
                verdict = "" if target != target else ("  ok" if seconds < target
                                                       else f"  OVER target {target:g} s")
                print(f"  {what:<58} {seconds:8.3f} s{verdict}")


if __name__ == "__main__":
    main()
