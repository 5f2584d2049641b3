"""Helpers of the fetch tests: synthetic run directories in the contract's layout, registry runs.

Synthetic run directories are written with the worker's own file helpers (agents.rundir: atomic
writes, the manifest builder), so only the training itself is skipped; the real worker's runs
come from the `trained_runs` fixture.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select, text

from agents import rundir
from agents.spec import SMOKE, RunSpec
from orchestrator.queueing import QueueRequest, queue_runs
from orchestrator.registry.db import Registry
from orchestrator.registry.models import Experiment, Job, Run

METRIC_COLUMNS = ["timesteps", "steps_per_s", "learning_rate", "clip_range", "loss",
                  "policy_loss", "value_loss", "entropy_loss", "approx_kl", "clip_fraction",
                  "explained_variance"]
JOB_ID = "4242[3].pbs01"


def spec(attn: str = "CWCA", seed: int = 42, game: str = "Pong", **changes: Any) -> RunSpec:
    return SMOKE.replace(game=game, attn=attn, seed=seed, total_timesteps=2_048, n_envs=2,
                         eval_every_steps=512, checkpoint_every_steps=512, **changes)


def write_evaluations(run_dir: Path, timesteps: list[int], episodes: int,
                      seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    results = rng.integers(-21, 22, size=(len(timesteps), episodes)).astype(np.float64)
    buffer = io.BytesIO()
    np.savez(buffer, timesteps=np.asarray(timesteps, dtype=np.int64), results=results,
             ep_lengths=rng.integers(800, 3000, size=results.shape).astype(np.int64))
    rundir.write_bytes(run_dir / rundir.EVALUATIONS_NPZ, buffer.getvalue())
    return results


def write_metrics(run_dir: Path, timesteps: list[int]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(METRIC_COLUMNS)
    for i, t in enumerate(timesteps):
        # The first update has no loss yet in some SB3 versions: an empty cell is no row.
        writer.writerow([t, 150.0 + i, 2.5e-4, 0.1, "" if i == 0 else 0.5 / (i + 1), -0.01,
                         0.2, -1.7, 0.001, 0.05, 0.1 * i])
    rundir.write_bytes(run_dir / rundir.METRICS_CSV, buffer.getvalue().encode())


def make_run_dir(run_dir: Path, run_spec: RunSpec, *, checkpoints: tuple[int, ...] = (512, 1024),
                 n_evals: int = 4, episodes: int = 5, exited: bool = True) -> np.ndarray:
    """A run directory as the worker leaves it; returns the evaluation results written."""
    rundir.write_run_json(run_dir, run_spec)
    rundir.write_json(run_dir / rundir.STATUS_JSON, {"phase": "training", "timesteps": 1024})
    rundir.write_json(run_dir / rundir.PROVENANCE_JSON, {"attempts": [{
        "attempt": 1, "started_at": 1.7e9, "host": "node17", "pid": 4242, "python": "3.11",
        "packages": {"torch": "2.13.0"}, "git_commit": "abc123", "torch": "2.13.0",
        "cuda": None, "rocm": None, "gpu": None, "image_digest": "sha256:" + "ab" * 32,
        "scheduler_job_id": JOB_ID, "resumed_from_step": None}]})
    write_metrics(run_dir, [256 * (i + 1) for i in range(8)])
    results = write_evaluations(run_dir, [512 * (i + 1) for i in range(n_evals)], episodes)
    rng = np.random.default_rng(1)
    for step in checkpoints:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            archive.writestr("policy.pth", rng.bytes(4096))
        rundir.write_bytes(rundir.checkpoint_path(run_dir, step), buffer.getvalue())
        for k in range(2):
            buffer = io.BytesIO()
            np.save(buffer, rng.integers(0, 255, size=(1, 4, 84, 84), dtype=np.uint8))
            rundir.write_bytes(rundir.observation_path(run_dir, step, k), buffer.getvalue())
    for i in range(2):
        lines = ['#{"t_start": 1700000000.0, "env_id": "PongNoFrameskip-v4"}', "r,l,t"]
        lines += [f"{-21 + j + i},{3000 + 4 * j},{10.0 * (j + 1)}" for j in range(3)]
        rundir.write_bytes(run_dir / "monitor" / f"train_{i}.monitor.csv",
                           ("\n".join(lines) + "\n").encode())
    rundir.write_bytes(run_dir / "tb" / "PPO_0" / "events.out.tfevents.1.node17", b"tb" * 100)
    rundir.ManifestBuilder(run_dir).write(final=exited)
    if exited:
        rundir.write_json(run_dir / rundir.EXIT_JSON, {"exit_code": 0, "reason": "done",
                                                       "message": "", "timesteps": 2048,
                                                       "attempt": 1, "ended_at": 1.7e9})
    return results


def rewrite_manifest(run_dir: Path, final: bool = True) -> None:
    rundir.ManifestBuilder(run_dir).write(final=final)


def list_in_manifest(run_dir: Path, relative: str, kind: str, content: bytes) -> None:
    """Write `relative` and add it to manifest.json as `kind`, as an older worker listed every
    file of checkpoints/ and observations/ (today's leaves out names that are none)."""
    path = run_dir / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    manifest = rundir.read_json(run_dir / rundir.MANIFEST_JSON)
    manifest["files"].append({"path": relative, "kind": kind, "size": len(content),
                              "sha256": rundir.sha256_file(path), "step": None})
    rundir.write_json(run_dir / rundir.MANIFEST_JSON, manifest)


@contextlib.contextmanager
def fifo_rescue(fifo: Path, after_s: float = 10.0) -> Iterator[list[bool]]:
    """Keep a test from hanging on `fifo`: from `after_s` on, a writer opens and closes it every
    0.1 s, so that a reader blocked in open() goes on (and finds EOF). The list yielded is
    non-empty afterwards when a reader had to be rescued: the code under test blocked."""
    rescued: list[bool] = []
    done = threading.Event()

    def rescue() -> None:
        if done.wait(after_s):
            return
        while not done.wait(0.1):
            try:  # succeeds only while a reader has the FIFO open (or waits in open())
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                continue
            rescued.append(True)
            os.close(fd)

    thread = threading.Thread(target=rescue, daemon=True)
    thread.start()
    try:
        yield rescued
    finally:
        done.set()
        thread.join()


def queue(registry: Registry, run_spec: RunSpec, run_dir: Path | None,
          state: str = "succeeded", job: bool = True) -> int:
    """Record the run with the queue service, then as dispatch would: run_dir, state, a job."""
    base = SMOKE
    overrides = {f.name: getattr(run_spec, f.name) for f in fields(RunSpec)
                 if f.name not in ("game", "attn", "seed", "experiment", "run_id")
                 and getattr(run_spec, f.name) != getattr(base, f.name)}
    queue_runs(registry, QueueRequest(run_spec.experiment, [run_spec.game], [run_spec.attn],
                                      [run_spec.seed], preset="smoke", overrides=overrides))
    with registry.write() as session:
        run = session.scalars(select(Run).join(Experiment).where(
            Experiment.name == run_spec.experiment, Run.game == run_spec.game,
            Run.attn == run_spec.attn, Run.seed == run_spec.seed)).one()
        if run_dir is not None:
            run.run_dir = str(run_dir)
            run.state = state
            run.attempts = 1
            if job:
                session.add(Job(run_id=run.id, attempt=1, backend="pbs", job_id=JOB_ID))
        return run.id


def store_tree(root: Path) -> dict[str, bytes]:
    """Every file below `root` with its content (to show a fetch left the store as it was)."""
    if not root.exists():
        return {}
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() or p.is_symlink()}


def table_rows(registry: Registry, table: str, run_id: int) -> list[tuple[Any, ...]]:
    """All columns of a table's rows of one run (ids and timestamps included)."""
    column = "id" if table == "runs" else "run_id"
    with registry.session() as session:
        return [tuple(row) for row in session.execute(
            text(f"SELECT * FROM {table} WHERE {column} = :r ORDER BY id"), {"r": run_id})]
