"""Fetching run directories made by the real worker (`trained_runs`: tiny Pong runs, one per
attention type), locally and through the test sshd, on SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import text

from agents import rundir
from agents.catalog import ATTENTION_TYPES
from orchestrator.cli import run
from orchestrator.registry.db import Registry
from orchestrator.settings import settings
from orchestrator.store.layout import kind_of, store_relpath
from tests.fetch_support import queue, store_tree
from tests.fixtures.sshd import SshHost
from tests.fixtures.trained import tiny_spec

pytestmark = pytest.mark.slow


def _fetch(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict]:
    capsys.readouterr()
    rc = run(["fetch", *args, "--json"])
    return rc, json.loads(capsys.readouterr().out)


def _queue_trained(registry: Registry, trained_runs: dict[str, Path],
                   attns: tuple[str, ...] = ATTENTION_TYPES) -> dict[str, int]:
    return {attn: queue(registry, tiny_spec(attn), trained_runs[attn]) for attn in attns}


def test_bulk_fetch_of_real_worker_runs_matches_their_manifests_and_numpy(
        workspace: Path, trained_runs: dict[str, Path],
        capsys: pytest.CaptureFixture[str]) -> None:
    registry = Registry(settings().database_url)
    run_ids = _queue_trained(registry, trained_runs)
    rc, out = _fetch(capsys, "--all", "--checkpoints", "all")
    assert rc == 0, out
    assert len(out["runs"]) == len(ATTENTION_TYPES)
    for attn, run_id in run_ids.items():
        run_dir, store = trained_runs[attn], workspace / "store" / "main" / "Pong" / attn / "0"
        manifest = json.loads((run_dir / "manifest.json").read_text())
        # Every file of the final manifest that a fetch takes is in the store, byte for byte.
        expected = {}
        for entry in manifest["files"]:
            kind = kind_of(entry["path"])
            if kind is None:
                continue
            target = store / store_relpath(entry["path"], kind, "Pong", attn, 0)
            assert rundir.sha256_file(target) == entry["sha256"], entry["path"]
            expected[target.relative_to(workspace / "store").as_posix()] = entry["sha256"]
        expected[f"main/Pong/{attn}/0/exit.json"] = rundir.sha256_file(run_dir / "exit.json")
        assert (store / "checkpoints" / "Pong_" f"{attn}_0_model_checkpoint_1024_steps.zip"
                ).is_file()
        assert zipfile.is_zipfile(store / "checkpoints" /
                                  f"Pong_{attn}_0_model_checkpoint_512_steps.zip")
        obs = np.load(store / "observations" / "obs_1024_1.npy")
        assert obs.shape == (1, 4, 84, 84) and obs.dtype == np.uint8

        with registry.session() as session:
            artifacts = dict(session.execute(text(
                "SELECT path, sha256 FROM artifacts WHERE run_id = :r"), {"r": run_id}).all())
            mean, n_evals = session.execute(text(
                "SELECT mean_score, n_evaluations FROM run_scores WHERE run_id = :r"),
                {"r": run_id}).one()
            n_metric_rows = session.scalar(text(
                "SELECT COUNT(*) FROM metrics WHERE run_id = :r AND name NOT LIKE 'episode_%'"),
                {"r": run_id})
            node = session.scalar(text("SELECT node FROM jobs WHERE run_id = :r"),
                                  {"r": run_id})
        assert artifacts == expected
        with np.load(run_dir / "evaluations.npz") as data:
            assert mean == pytest.approx(data["results"].mean(axis=1).mean(), abs=1e-9)
            assert n_evals == len(data["timesteps"])
        with (run_dir / "metrics.csv").open() as handle:
            cells = [v for row in csv.DictReader(handle) for k, v in row.items()
                     if k != "timesteps" and v.strip() and np.isfinite(float(v))]
        assert n_metric_rows == len(cells)
        provenance = json.loads((run_dir / "provenance.json").read_text())
        assert node == provenance["attempts"][0]["host"]

    # Fetching again changes nothing, on disk or in the registry.
    before = store_tree(workspace / "store")
    with registry.session() as session:
        rows = session.execute(text("SELECT * FROM artifacts ORDER BY id")).all()
    rc, out = _fetch(capsys, "--all", "--checkpoints", "all")
    assert rc == 0 and all(r["copied"] == 0 for r in out["runs"])
    assert store_tree(workspace / "store") == before
    with registry.session() as session:
        assert session.execute(text("SELECT * FROM artifacts ORDER BY id")).all() == rows
    registry.dispose()


def test_killed_real_run_is_fetched_with_its_live_files_as_they_are(
        workspace: Path, trained_runs: dict[str, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "main" / "Pong" / "NA" / "0"
    shutil.copytree(trained_runs["NA"], run_dir)
    (run_dir / "exit.json").unlink()  # killed by SIGKILL: no exit.json, manifest not final
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["final"] = False
    rundir.write_json(run_dir / "manifest.json", manifest)
    with (run_dir / "metrics.csv").open("a") as handle:  # written after the last manifest
        handle.write("1280,150.0,0.0001,0.05,0.1,0.0,0.1,-1.0,0.0,0.0,0.5\n")
    registry = Registry(settings().database_url)
    run_id = queue(registry, tiny_spec("NA"), run_dir, state="lost")
    rc, out = _fetch(capsys, "Pong", "NA", "0")
    result = out["runs"][0]
    assert rc == 0 and not result["exited"] and result["problems"] == 0
    with registry.session() as session:
        last = session.scalar(text("SELECT MAX(timestep) FROM metrics WHERE run_id = :r AND "
                                   "name = 'explained_variance'"), {"r": run_id})
    assert last == 1280
    registry.dispose()


def test_remote_fetch_of_a_real_run_equals_the_local_one(
        workspace: Path, trained_runs: dict[str, Path], sshd_host: SshHost,
        capsys: pytest.CaptureFixture[str]) -> None:
    registry = Registry(settings().database_url)
    _queue_trained(registry, trained_runs, ("CWCA",))
    assert _fetch(capsys, "Pong", "CWCA", "0")[0] == 0
    local = store_tree(workspace / "store")
    with registry.session() as session:
        local_rows = session.execute(text(
            "SELECT timestep, episode, score FROM evaluations ORDER BY id")).all()
    shutil.rmtree(workspace / "store")
    with registry.write() as session:
        session.execute(text("DELETE FROM evaluations"))
        session.execute(text("DELETE FROM artifacts"))
    (workspace / "satrl.toml").write_text(sshd_host.toml())
    settings.cache_clear()
    rc, out = _fetch(capsys, "Pong", "CWCA", "0")
    assert rc == 0 and out["runs"][0]["source"].startswith("root@127.0.0.1:")
    assert store_tree(workspace / "store") == local
    with registry.session() as session:
        assert session.execute(text("SELECT timestep, episode, score FROM evaluations "
                                    "ORDER BY id")).all() == local_rows
    registry.dispose()
