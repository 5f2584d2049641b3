"""Remote fetch: rsync over ssh through a real sshd on 127.0.0.1 (tests/fixtures/sshd.py).

The workspace's satrl.toml names the host in [fetch]; the run directory is a path on that host
(here the same machine, reached only through ssh). Listings and copies go through rsync; every
checksum is computed here, after the copy.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import text

from agents import rundir
from orchestrator.cli import run
from orchestrator.registry.db import Registry
from orchestrator.settings import settings
from orchestrator.store.sources import RsyncSource, source_from_settings
from tests.fetch_support import make_run_dir, queue, spec, store_tree
from tests.fixtures.sshd import SshHost

STORE_RUN = "main/Pong/CWCA/42"


@pytest.fixture
def remote_ws(workspace: Path, sshd_host: SshHost, tmp_path: Path) -> Path:
    """The workspace with [fetch] pointing at the test sshd, its scratch outside the workspace."""
    (workspace / "satrl.toml").write_text(sshd_host.toml())
    settings.cache_clear()
    return workspace


def _fetch(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict]:
    capsys.readouterr()
    rc = run(["fetch", *args, "--json"])
    return rc, json.loads(capsys.readouterr().out)


def test_remote_fetch_through_sshd_verifies_ingests_and_recopies_only_what_changed(
        remote_ws: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert isinstance(source_from_settings(settings().section("fetch")), RsyncSource)
    run_spec = spec()
    run_dir = tmp_path / "cluster scratch" / "main" / "Pong" / "CWCA" / "42"  # a space, too
    results = make_run_dir(run_dir, run_spec)
    registry = Registry(settings().database_url)
    run_id = queue(registry, run_spec, run_dir)

    rc, out = _fetch(capsys, "Pong", "CWCA", "42")
    result = out["runs"][0]
    assert rc == 0, out
    assert result["source"].startswith("root@127.0.0.1:") and result["copied"] == 14
    store = remote_ws / "store" / STORE_RUN
    for relative, target in [("checkpoints/model_checkpoint_1024_steps.zip",
                              "checkpoints/Pong_CWCA_42_model_checkpoint_1024_steps.zip"),
                             ("evaluations.npz", "metrics/evaluations.npz"),
                             ("observations/obs_512_1.npy", "observations/obs_512_1.npy")]:
        assert (store / target).read_bytes() == (run_dir / relative).read_bytes()
    with registry.session() as session:
        mean = session.scalar(text("SELECT mean_score FROM run_scores WHERE run_id = :r"),
                              {"r": run_id})
        n_artifacts = session.scalar(text("SELECT COUNT(*) FROM artifacts WHERE run_id = :r"),
                                     {"r": run_id})
    assert mean == pytest.approx(results.mean(axis=1).mean(), abs=1e-9) and n_artifacts == 14

    (store / "observations/obs_1024_0.npy").unlink()
    metrics = store / "metrics/metrics.csv"
    metrics.write_text(metrics.read_text().replace("0.25", "0.35"))
    rc, out = _fetch(capsys, "Pong", "CWCA", "42")
    copied = {f["path"] for f in out["runs"][0]["files"] if f["status"] == "copied"}
    assert rc == 0 and copied == {"observations/obs_1024_0.npy", "metrics.csv"}
    registry.dispose()


def test_remote_symlink_to_a_system_file_with_matching_checksum_is_refused(
        remote_ws: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_spec = spec()
    run_dir = tmp_path / "scratch" / "main" / "Pong" / "CWCA" / "42"
    make_run_dir(run_dir, run_spec, checkpoints=(512,))
    system_file = Path("/etc/passwd")
    rundir.checkpoint_path(run_dir, 1024).symlink_to(system_file)
    (run_dir / "observations").rename(tmp_path / "elsewhere")
    (run_dir / "observations").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    # The worker's manifest builder leaves links out; a hostile (or an older worker's) manifest
    # vouches for the system file behind the checkpoint's name ...
    rundir.ManifestBuilder(run_dir).write(final=True)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert "checkpoints/model_checkpoint_1024_steps.zip" not in {
        f["path"] for f in manifest["files"]}
    manifest["files"].append({"path": "checkpoints/model_checkpoint_1024_steps.zip",
                              "kind": "checkpoint", "size": system_file.stat().st_size,
                              "step": 1024, "sha256": rundir.sha256_file(system_file)})
    # ... and for the files behind the linked folder.
    for k in range(2):
        outside = tmp_path / "elsewhere" / f"obs_512_{k}.npy"
        manifest["files"].append({"path": f"observations/obs_512_{k}.npy", "kind": "observation",
                                  "size": outside.stat().st_size, "step": 512,
                                  "sha256": rundir.sha256_file(outside)})
    rundir.write_json(run_dir / "manifest.json", manifest)
    registry = Registry(settings().database_url)
    run_id = queue(registry, run_spec, run_dir)

    rc, out = _fetch(capsys, "Pong", "CWCA", "42")
    problems = {f["path"]: f["problem"] for f in out["runs"][0]["files"]
                if f["status"] == "problem"}
    assert rc == 1
    assert set(problems) == {"checkpoints/model_checkpoint_1024_steps.zip",
                             "observations/obs_512_0.npy", "observations/obs_512_1.npy"}
    assert all(p.startswith("symbolic link") for p in problems.values())
    stored = store_tree(remote_ws / "store")
    assert not any("1024" in p or "observations" in p for p in stored)
    assert system_file.read_bytes() not in stored.values()
    with registry.session() as session:
        kinds = list(session.scalars(text("SELECT kind FROM artifacts WHERE run_id = :r"),
                                     {"r": run_id}))
    assert "observation" not in kinds and kinds.count("checkpoint") == 1
    registry.dispose()


def test_remote_missing_run_directory_and_unreachable_host_are_one_line(
        remote_ws: Path, tmp_path: Path, sshd_host: SshHost,
        capsys: pytest.CaptureFixture[str]) -> None:
    registry = Registry(settings().database_url)
    queue(registry, spec(), tmp_path / "purged")
    capsys.readouterr()
    assert run(["fetch", "Pong", "CWCA", "42"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "purged does not exist" in err[0]

    section = dict(sshd_host.fetch_section, port=1)  # nothing listens on port 1
    options = ", ".join(f'"{o}"' for o in section["ssh_options"])
    (remote_ws / "satrl.toml").write_text(
        f'[fetch]\nhost = "{section["host"]}"\nport = 1\n'
        f'identity_file = "{section["identity_file"]}"\nssh_options = [{options}]\n')
    settings.cache_clear()
    assert run(["fetch", "Pong", "CWCA", "42"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "could not list root@127.0.0.1:" in err[0]
    assert store_tree(remote_ws / "store") == {}
    registry.dispose()


def test_evaluations_are_equal_to_numpy_after_remote_fetch(
        remote_ws: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Per (timestep, episode), the rows are the file's values (not only their mean)."""
    run_spec = spec()
    run_dir = tmp_path / "s" / "main" / "Pong" / "CWCA" / "42"
    make_run_dir(run_dir, run_spec, n_evals=6, episodes=3)
    registry = Registry(settings().database_url)
    run_id = queue(registry, run_spec, run_dir)
    assert _fetch(capsys, "Pong", "CWCA", "42", "--what", "metrics")[0] == 0
    with registry.session() as session:
        rows = session.execute(text("SELECT timestep, episode, score, length FROM evaluations "
                                    "WHERE run_id = :r ORDER BY timestep, episode"),
                               {"r": run_id}).all()
    with np.load(run_dir / "evaluations.npz") as data:
        expected = [(int(t), e, float(data["results"][i, e]), int(data["ep_lengths"][i, e]))
                    for i, t in enumerate(data["timesteps"]) for e in range(3)]
    assert [tuple(r) for r in rows] == expected
    registry.dispose()
