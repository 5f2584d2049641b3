"""Benchmark: `satrl status` reconciling 1,400 active PBS subjobs, on SQLite and PostgreSQL.

The study's full grid (56 games x 5 types x 5 seeds) is dispatched to PBS as 56 arrays of 25:
half the subjobs running (with a fresh status.json heartbeat), half queued. `qstat` on PATH is a
script that counts its calls and prints a `qstat -f -F json -x -t` reply built from the real
OpenPBS captures (/work/shared/reference/pbs/array_qstat_t_running.json), one record per subjob.

Figures per database: the first poll (700 submitted -> running transitions, each with an event),
a steady poll (nothing changes), the whole `satrl status --json` command, and the qstat calls
each made. Baselines measured in the same run: `status --no-sync` (the registry alone), and the
per-job polling this design avoids (1,400 qstat calls, extrapolated from timing 20 of them).
Target: one qstat call per poll, and a reconciling status under a second.

    python benchmarks/status_reconcile.py [--pg-url postgresql+psycopg://...] [--sqlite-only]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REFERENCE = Path("/work/shared/reference/pbs")
TARGET_S = 1.0
ARRAYS, PER_ARRAY = 56, 25


def build_qstat_reply(reference: Path) -> tuple[str, list[str]]:
    """A qstat JSON of ARRAYS x PER_ARRAY subjobs made from the captured records."""
    captured = json.loads((reference / "array_qstat_t_running.json").read_text())
    running, queued = captured["Jobs"]["2[0].pbshost"], captured["Jobs"]["2[1].pbshost"]
    parent = captured["Jobs"]["2[].pbshost"]
    jobs: dict[str, dict] = {}
    ids = []
    for a in range(ARRAYS):
        array = f"{100 + a}[].pbshost"
        jobs[array] = dict(parent, Job_Name=f"satrl-bench{a:04d}")
        for i in range(PER_ARRAY):
            job_id = f"{100 + a}[{i}].pbshost"
            template = running if (a * PER_ARRAY + i) % 2 == 0 else queued
            jobs[job_id] = dict(template, Job_Name=f"satrl-bench{a:04d}", array_index=i,
                                array_id=array)
            ids.append(job_id)
    document = dict(captured, Jobs=jobs)
    # qstat's own layout: tabs, one attribute per line.
    return json.dumps(document, indent="\t", separators=(",", ":\t")), ids


def fake_qstat(folder: Path, reply: str) -> Path:
    """A `qstat` on PATH that counts its calls in folder/calls and prints the reply."""
    (folder / "reply.json").write_text(reply)
    script = folder / "bin" / "qstat"
    script.parent.mkdir(parents=True)
    script.write_text(f'#!/bin/bash\necho "$*" >> {folder}/calls\ncat {folder}/reply.json\n')
    script.chmod(0o755)
    return folder / "calls"


def calls(counter: Path) -> int:
    return len(counter.read_text().splitlines()) if counter.exists() else 0


def setup_registry(url: str, workspace: Path, job_ids: list[str]) -> None:
    """1,400 runs dispatched to PBS: jobs rows with the ids, run dirs, heartbeats."""
    from sqlalchemy import select

    from agents.catalog import ATTENTION_TYPES, GAMES, PAPER_SEEDS
    from orchestrator.queueing import QueueRequest, queue_runs
    from orchestrator.registry.db import Registry
    from orchestrator.registry.models import Event, Job, Run

    registry = Registry(url)
    queue_runs(registry, QueueRequest("main", list(GAMES), list(ATTENTION_TYPES),
                                      list(PAPER_SEEDS)))
    now = time.time()
    with registry.write() as session:
        runs = list(session.scalars(select(Run).order_by(Run.id)))
        assert len(runs) == len(job_ids) == ARRAYS * PER_ARRAY, (len(runs), len(job_ids))
        jobs, events = [], []
        for k, (run, job_id) in enumerate(zip(runs, job_ids, strict=True)):
            run_dir = workspace / "runs" / "main" / run.game / run.attn / str(run.seed)
            (run_dir / "logs").mkdir(parents=True)
            if k % 2 == 0:  # running: the worker's heartbeat
                (run_dir / "status.json").write_text(json.dumps(
                    {"schema": 1, "phase": "training", "timesteps": 1000, "updated_at": now}))
            run.state, run.attempts, run.run_dir = "submitted", 1, str(run_dir)
            array = job_id.split("[")[0]
            jobs.append({"run_id": run.id, "attempt": 1, "backend": "pbs", "job_id": job_id,
                         "array_job_id": f"{array}[].pbshost", "array_index": k % PER_ARRAY,
                         "batch": f"satrl-bench{k // PER_ARRAY:04d}",
                         "scheduler_state": "submitted"})
            events.append({"run_id": run.id, "from_state": "queued", "to_state": "submitted",
                           "why": "benchmark"})
        session.execute(Job.__table__.insert(), jobs)
        session.execute(Event.__table__.insert(), events)
    registry.dispose()


def measure(url: str, label: str, root: Path, reply: str, job_ids: list[str]) -> dict:
    workspace = root / label
    workspace.mkdir()
    (workspace / "satrl.toml").write_text('[pbs]\npoll_interval_s = 0\n')
    os.environ["SATRL_HOME"] = str(workspace)
    os.environ["SATRL_DATABASE_URL"] = url
    from orchestrator.settings import settings

    settings.cache_clear()
    setup_registry(url, workspace, job_ids)
    counter = fake_qstat(workspace, reply)
    os.environ["PATH"] = f"{workspace / 'bin'}:{os.environ['PATH']}"
    from orchestrator.cli import run
    from orchestrator.reconcile import reconcile
    from orchestrator.registry.db import Registry

    registry = Registry(url)
    figures: dict = {"database": label}
    start = time.perf_counter()
    first = reconcile(registry, settings())
    figures["first_poll_s"] = time.perf_counter() - start
    figures["first_poll_transitions"] = len(first.transitions)
    figures["first_poll_qstat_calls"] = calls(counter)
    assert first.polled == {"pbs": True} and not first.errors, first.errors

    def timed_status(*args: str) -> float:
        with contextlib.redirect_stdout(io.StringIO()):
            begin = time.perf_counter()
            assert run(["status", "--json", *args]) == 0
            return time.perf_counter() - begin

    before = calls(counter)
    figures["status_s"] = min(timed_status() for _ in range(3))
    figures["qstat_calls_per_status"] = (calls(counter) - before) / 3
    start = time.perf_counter()
    steady = reconcile(registry, settings())
    figures["steady_poll_s"] = time.perf_counter() - start
    figures["steady_poll_transitions"] = len(steady.transitions)
    figures["baseline_status_no_sync_s"] = min(timed_status("--no-sync") for _ in range(3))
    registry.dispose()
    os.environ["PATH"] = os.environ["PATH"].split(":", 1)[1]
    return figures


def per_job_polling_estimate(reply_folder: Path) -> float:
    """What 1,400 one-job qstat calls would cost (20 timed, extrapolated)."""
    import subprocess

    qstat = reply_folder / "bin" / "qstat"
    start = time.perf_counter()
    for _ in range(20):
        subprocess.run([str(qstat), "-f", "-F", "json", "1.pbshost"], capture_output=True,
                       check=True)
    return (time.perf_counter() - start) / 20 * ARRAYS * PER_ARRAY


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pg-url", default=os.environ.get(
        "SATRL_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"))
    parser.add_argument("--sqlite-only", action="store_true")
    parser.add_argument("--reference", type=Path, default=REFERENCE)
    args = parser.parse_args()
    reply, job_ids = build_qstat_reply(args.reference)
    results = []
    with tempfile.TemporaryDirectory(prefix="satrl-bench-") as tmp:
        root = Path(tmp)
        results.append(measure(f"sqlite:///{root / 'sqlite.db'}", "sqlite", root, reply,
                               job_ids))
        if not args.sqlite_only:
            from orchestrator.registry.scratch import throwaway_postgres

            with throwaway_postgres(args.pg_url, prefix="satrl_bench") as url:
                results.append(measure(url, "postgresql", root, reply, job_ids))
        naive = per_job_polling_estimate(root / "sqlite")
    print(f"status reconciling {len(job_ids)} active PBS subjobs "
          f"({ARRAYS} arrays x {PER_ARRAY}; qstat reply {len(reply) / 1e6:.1f} MB)")
    print(f"{'':34}" + "".join(f"{r['database']:>12}" for r in results))
    rows = [("first poll (700 transitions), s", "first_poll_s", "{:.3f}"),
            ("  qstat calls", "first_poll_qstat_calls", "{:.0f}"),
            ("satrl status --json, s", "status_s", "{:.3f}"),
            ("  qstat calls per status", "qstat_calls_per_status", "{:.0f}"),
            ("steady poll (no change), s", "steady_poll_s", "{:.3f}"),
            ("baseline: status --no-sync, s", "baseline_status_no_sync_s", "{:.3f}")]
    for title, key, fmt in rows:
        print(f"{title:34}" + "".join(f"{fmt.format(r[key]):>12}" for r in results))
    print(f"baseline: per-job polling, {len(job_ids)} qstat calls (estimated): {naive:.1f} s")
    ok = all(r["status_s"] < TARGET_S and r["first_poll_s"] < TARGET_S
             and r["qstat_calls_per_status"] == 1 and r["first_poll_qstat_calls"] == 1
             for r in results)
    print(f"target: one qstat call per poll, status under {TARGET_S:.0f} s: "
          f"{'met' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
