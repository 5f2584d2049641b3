"""`satrl fetch` on synthetic run directories, local filesystem, on SQLite and PostgreSQL.

Each test makes a run directory in the contract's layout (tests/fetch_support.py, written with the
worker's own helpers), records the run with the queue service as dispatch would, and runs the CLI
in-process. The real worker's runs are fetched in test_fetch_trained.py; remote copies through a
real sshd in test_fetch_remote.py.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import text

from agents import rundir
from orchestrator.cli import run
from orchestrator.registry.db import Registry
from orchestrator.settings import settings
from tests.fetch_support import (
    fifo_rescue,
    list_in_manifest,
    make_run_dir,
    queue,
    rewrite_manifest,
    spec,
    store_tree,
    table_rows,
    write_evaluations,
    write_metrics,
)

STORE_RUN = Path("main/Pong/CWCA/42")


@pytest.fixture
def reg(workspace: Path) -> Registry:
    registry = Registry(settings().database_url)
    yield registry
    registry.dispose()


@pytest.fixture
def synthetic(workspace: Path, reg: Registry) -> tuple[Path, int, np.ndarray]:
    """A finished synthetic run Pong/CWCA/42 in the workspace's scratch, recorded as dispatched."""
    run_spec = spec()
    run_dir = workspace / "runs" / "main" / "Pong" / "CWCA" / "42"
    results = make_run_dir(run_dir, run_spec)
    return run_dir, queue(reg, run_spec, run_dir), results


def fetch_json(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict]:
    capsys.readouterr()
    rc = run(["fetch", *args, "--json"])
    out = capsys.readouterr().out
    return rc, json.loads(out)


def files_by_status(result: dict, status: str) -> set[str]:
    return {f["path"] for f in result["files"] if f["status"] == status}


def test_fetch_copies_verifies_and_ingests_a_finished_run(
        synthetic: tuple[Path, int, np.ndarray], reg: Registry, workspace: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    run_dir, run_id, results = synthetic
    rc, out = fetch_json(capsys, "Pong", "CWCA", "42")
    assert rc == 0 and out["ok"]
    (result,) = out["runs"]
    store = workspace / "store" / STORE_RUN
    # The layout a person browses: paper checkpoint names, observations, metrics, records.
    assert sorted(p.relative_to(store).as_posix() for p in store.rglob("*") if p.is_file()) == [
        "checkpoints/Pong_CWCA_42_model_checkpoint_1024_steps.zip",
        "checkpoints/Pong_CWCA_42_model_checkpoint_512_steps.zip",
        "exit.json",
        "metrics/evaluations.npz", "metrics/metrics.csv",
        "metrics/monitor/train_0.monitor.csv", "metrics/monitor/train_1.monitor.csv",
        "metrics/tb/PPO_0/events.out.tfevents.1.node17",
        "observations/obs_1024_0.npy", "observations/obs_1024_1.npy",
        "observations/obs_512_0.npy", "observations/obs_512_1.npy",
        "provenance.json", "run.json",
    ]
    assert (store / "checkpoints/Pong_CWCA_42_model_checkpoint_512_steps.zip").read_bytes() == \
        rundir.checkpoint_path(run_dir, 512).read_bytes()
    assert result["copied"] == 14 and result["problems"] == 0 and result["exited"]
    assert not (workspace / "store" / ".satrl-fetch").exists()

    with reg.session() as session:
        artifacts = session.execute(text(
            "SELECT path, kind, size_bytes, sha256, step FROM artifacts WHERE run_id = :r"),
            {"r": run_id}).all()
        scores = session.execute(text(
            "SELECT mean_score, last_score, n_evaluations, last_timestep FROM run_scores "
            "WHERE run_id = :r"), {"r": run_id}).one()
        n_evals = session.scalar(text("SELECT COUNT(*) FROM evaluations WHERE run_id = :r"),
                                 {"r": run_id})
        loss = session.execute(text(
            "SELECT timestep, value FROM metrics WHERE run_id = :r AND name = 'loss' "
            "ORDER BY timestep"), {"r": run_id}).all()
        job = session.execute(text(
            "SELECT node, image_digest, provenance FROM jobs WHERE run_id = :r"),
            {"r": run_id}).one()
    # Every artefact row names a stored file with exactly that size and sha256.
    assert len(artifacts) == 14
    for path, _kind, size, sha, _step in artifacts:
        assert (workspace / "store" / path).stat().st_size == size
        assert rundir.sha256_file(workspace / "store" / path) == sha
    kinds = {path.rsplit("/", 1)[-1]: (kind, step) for path, kind, *_r, step in artifacts}
    assert kinds["Pong_CWCA_42_model_checkpoint_1024_steps.zip"] == ("checkpoint", 1024)
    assert kinds["obs_512_1.npy"] == ("observation", 512)
    # run_scores answers from the fetched evaluations exactly as numpy does from the file.
    with np.load(run_dir / "evaluations.npz") as data:
        per_eval = data["results"].mean(axis=1)
        assert scores[3] == int(data["timesteps"][-1])
    assert scores[0] == pytest.approx(per_eval.mean(), abs=1e-9)
    assert scores[1] == pytest.approx(per_eval[-1], abs=1e-9)
    assert scores[2] == len(per_eval) and n_evals == results.size
    # metrics.csv: one row per non-empty cell (the first update's loss is empty).
    assert [t for t, _ in loss] == [256 * i for i in range(2, 9)]
    provenance = job[2] if isinstance(job[2], dict) else json.loads(job[2])
    assert job[0] == "node17" and job[1] == "sha256:" + "ab" * 32
    assert provenance["git_commit"] == "abc123"

    # `satrl show` lists the fetched artefacts.
    capsys.readouterr()
    assert run(["show", "Pong/CWCA/42", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert {a["path"] for a in shown["artifacts"]} == {a[0] for a in artifacts}
    assert run(["show", "Pong/CWCA/42"]) == 0
    shown_text = capsys.readouterr().out  # (rich shortens long paths to the terminal's width)
    assert "artefacts in the store" in shown_text and shown_text.count(" checkpoint ") == 2


def test_second_fetch_copies_exactly_the_corrupted_and_the_deleted_file(
        synthetic: tuple[Path, int, np.ndarray], reg: Registry, workspace: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    _run_dir, run_id, _ = synthetic
    assert fetch_json(capsys, "Pong", "CWCA", "42")[0] == 0
    tables = ("artifacts", "evaluations", "metrics", "jobs")
    before = {t: table_rows(reg, t, run_id) for t in tables}
    store = workspace / "store" / STORE_RUN
    checkpoint = store / "checkpoints/Pong_CWCA_42_model_checkpoint_512_steps.zip"
    data = bytearray(checkpoint.read_bytes())
    data[100] ^= 0xFF  # same size, other content
    checkpoint.write_bytes(bytes(data))
    (store / "observations/obs_1024_1.npy").unlink()

    rc, out = fetch_json(capsys, "Pong", "CWCA", "42")
    (result,) = out["runs"]
    assert rc == 0
    assert files_by_status(result, "copied") == {"checkpoints/model_checkpoint_512_steps.zip",
                                                 "observations/obs_1024_1.npy"}
    assert result["unchanged"] == 12 and result["problems"] == 0
    assert rundir.sha256_file(checkpoint) == next(
        f["sha256"] for f in result["files"] if f["target"].endswith("512_steps.zip"))
    # Nothing in the registry moved: same rows, same ids, same fetched_at.
    assert {t: table_rows(reg, t, run_id) for t in tables} == before

    # A third fetch copies nothing at all.
    rc, out = fetch_json(capsys, "Pong", "CWCA", "42")
    assert rc == 0 and out["runs"][0]["copied"] == 0
    assert out["runs"][0]["evaluation_rows"] is None and out["runs"][0]["metric_rows"] is None


def test_truncated_stored_copy_is_copied_again(
        synthetic: tuple[Path, int, np.ndarray], workspace: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    assert fetch_json(capsys, "Pong", "CWCA", "42")[0] == 0
    stored = workspace / "store" / STORE_RUN / "metrics/evaluations.npz"
    stored.write_bytes(stored.read_bytes()[:50])  # as a copy cut off mid-way would leave it
    rc, out = fetch_json(capsys, "Pong", "CWCA", "42")
    assert rc == 0 and files_by_status(out["runs"][0], "copied") == {"evaluations.npz"}


def test_corrupted_and_truncated_source_files_are_reported_and_not_stored(
        synthetic: tuple[Path, int, np.ndarray], reg: Registry, workspace: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    run_dir, run_id, _ = synthetic
    corrupted = rundir.checkpoint_path(run_dir, 1024)
    data = bytearray(corrupted.read_bytes())
    data[-30] ^= 0x01
    corrupted.write_bytes(bytes(data))
    truncated = rundir.observation_path(run_dir, 512, 0)
    truncated.write_bytes(truncated.read_bytes()[:1000])
    (run_dir / "monitor" / "train_1.monitor.csv").unlink()

    capsys.readouterr()
    rc = run(["fetch", "Pong", "CWCA", "42"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "checkpoints/model_checkpoint_1024_steps.zip: sha256" in err
    assert "observations/obs_512_0.npy: size 1000 bytes" in err
    assert "monitor/train_1.monitor.csv: missing" in err
    store = workspace / "store" / STORE_RUN
    assert not (store / "checkpoints/Pong_CWCA_42_model_checkpoint_1024_steps.zip").exists()
    assert not (store / "observations/obs_512_0.npy").exists()
    assert (store / "checkpoints/Pong_CWCA_42_model_checkpoint_512_steps.zip").exists()
    assert not (workspace / "store" / ".satrl-fetch").exists()  # no temporary left behind
    with reg.session() as session:
        paths = set(session.scalars(text("SELECT path FROM artifacts WHERE run_id = :r"),
                                    {"r": run_id}))
        monitor_rows = session.scalar(text(
            "SELECT COUNT(*) FROM metrics WHERE run_id = :r AND name = 'episode_score'"),
            {"r": run_id})
    assert len(paths) == 11 and not any("1024_steps" in p or "obs_512_0" in p for p in paths)
    assert monitor_rows == 0  # the monitor episodes are ingested only with every monitor file


def test_hostile_manifest_is_reported_per_file_and_leaves_the_store_as_it_was(
        synthetic: tuple[Path, int, np.ndarray], reg: Registry, workspace: Path,
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir, run_id, _ = synthetic
    assert fetch_json(capsys, "Pong", "CWCA", "42")[0] == 0
    store_before = store_tree(workspace / "store")
    artifacts_before = table_rows(reg, "artifacts", run_id)

    system_file = Path("/etc/hostname") if Path("/etc/hostname").is_file() else Path("/etc/passwd")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "obs_9_0.npy").write_bytes(b"secret")
    # A symbolic link to a system file, listed with that file's own (matching) checksum.
    link = rundir.checkpoint_path(run_dir, 9)
    link.symlink_to(system_file)
    (run_dir / "observations_elsewhere").symlink_to(outside, target_is_directory=True)
    manifest = json.loads((run_dir / "manifest.json").read_text())

    def entry(path: str, kind: str, target: Path, step: int | None = None) -> dict:
        return {"path": path, "kind": kind, "size": target.stat().st_size,
                "sha256": rundir.sha256_file(target), "step": step}

    manifest["files"] += [
        entry("checkpoints/model_checkpoint_9_steps.zip", "checkpoint", system_file, 9),
        entry("../../../../../../../../.." + str(system_file), "checkpoint", system_file),
        entry(str(system_file), "observation", system_file),
        entry("observations/../../../etc/obs_9_0.npy", "observation", system_file),
    ]
    rundir.write_json(run_dir / "manifest.json", manifest)
    # A folder of the run replaced by a link: its files are outside the run directory.
    observations = run_dir / "observations"
    shutil.move(observations, outside / "observations")
    observations.symlink_to(outside / "observations", target_is_directory=True)
    (workspace / "store" / STORE_RUN / "observations/obs_512_1.npy").unlink()
    store_before.pop(f"{STORE_RUN.as_posix()}/observations/obs_512_1.npy")

    rc, out = fetch_json(capsys, "Pong", "CWCA", "42")
    assert rc == 1
    problems = {f["path"]: f["problem"] for f in out["runs"][0]["files"]
                if f["status"] == "problem"}
    assert problems["checkpoints/model_checkpoint_9_steps.zip"].startswith("symbolic link")
    assert "outside the run directory" in problems["../../../../../../../../.."
                                                   + str(system_file)]
    assert problems[str(system_file)].startswith("absolute path")
    assert "'..'" in problems["observations/../../../etc/obs_9_0.npy"]
    assert problems["observations/obs_512_1.npy"].startswith("symbolic link")
    assert len(problems) == 8  # the four hostile entries and the four linked observations
    assert store_tree(workspace / "store") == store_before
    # The rows of files that were not refetched stay; the hostile ones never appear.
    artifacts_after = table_rows(reg, "artifacts", run_id)
    assert not any("_9_" in row[3] or "etc" in row[3] for row in artifacts_after)
    assert len(artifacts_after) == len(artifacts_before) - 1  # the deleted stored observation


@pytest.mark.parametrize("damage", ["manifest_json", "manifest_shape", "run_json_hash",
                                    "run_json_other_run", "no_run_json"])
def test_malformed_records_are_one_line_and_change_nothing(
        synthetic: tuple[Path, int, np.ndarray], reg: Registry, workspace: Path,
        capsys: pytest.CaptureFixture[str], damage: str) -> None:
    run_dir, run_id, _ = synthetic
    if damage == "manifest_json":
        (run_dir / "manifest.json").write_text('{"schema": 1, "files": [')
    elif damage == "manifest_shape":
        rundir.write_json(run_dir / "manifest.json", {"files": [{"path": "run.json"}]})
    elif damage == "run_json_hash":
        body = json.loads((run_dir / "run.json").read_text())
        body["learning_rate"] = 0.5
        (run_dir / "run.json").write_text(json.dumps(body))
    elif damage == "run_json_other_run":
        rundir.write_run_json(run_dir, spec(seed=7))
    else:
        (run_dir / "run.json").unlink()
    capsys.readouterr()
    rc = run(["fetch", "Pong", "CWCA", "42"])
    captured = capsys.readouterr()
    assert rc == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("satrl: Pong/CWCA/42: ")
    assert ("manifest.json" in lines[0]) == damage.startswith("manifest")
    assert store_tree(workspace / "store") == {}
    assert table_rows(reg, "artifacts", run_id) == table_rows(reg, "evaluations", run_id) == []


def test_live_run_files_are_copied_as_they_are_and_again_when_they_change(
        workspace: Path, reg: Registry, capsys: pytest.CaptureFixture[str]) -> None:
    run_spec = spec()
    run_dir = workspace / "runs" / "main" / "Pong" / "CWCA" / "42"
    make_run_dir(run_dir, run_spec, checkpoints=(512,), n_evals=1, exited=False)
    run_id = queue(reg, run_spec, run_dir, state="running")
    # The worker went on after its last manifest: live files no longer match it.
    write_metrics(run_dir, [256 * (i + 1) for i in range(10)])
    write_evaluations(run_dir, [512, 1024], 5)
    rc, out = fetch_json(capsys, "Pong", "CWCA", "42")
    result = out["runs"][0]
    assert rc == 0 and not result["exited"] and result["problems"] == 0
    assert {"metrics.csv", "evaluations.npz"} <= files_by_status(result, "copied")
    with reg.session() as session:
        assert session.scalar(text("SELECT n_evaluations FROM run_scores WHERE run_id = :r"),
                              {"r": run_id}) == 2

    # It goes on: a new evaluation, a new checkpoint (in the manifest), then it is killed.
    write_evaluations(run_dir, [512, 1024, 1536], 5)
    checkpoint = rundir.checkpoint_path(run_dir, 1536)
    checkpoint.parent.mkdir(exist_ok=True)
    checkpoint.write_bytes(b"PK" + os.urandom(500))
    rewrite_manifest(run_dir, final=False)
    rc, out = fetch_json(capsys, "Pong", "CWCA", "42")
    result = out["runs"][0]
    assert rc == 0
    assert files_by_status(result, "copied") == {"evaluations.npz",
                                                 "checkpoints/model_checkpoint_1536_steps.zip"}
    assert "metrics.csv" in files_by_status(result, "unchanged")
    with reg.session() as session:
        assert session.scalar(text("SELECT COUNT(*) FROM evaluations WHERE run_id = :r"),
                              {"r": run_id}) == 15


def test_resumed_run_drops_and_redoes_evaluations(
        synthetic: tuple[Path, int, np.ndarray], reg: Registry,
        capsys: pytest.CaptureFixture[str]) -> None:
    run_dir, run_id, _ = synthetic
    assert fetch_json(capsys, "Pong", "CWCA", "42")[0] == 0
    # A resume from the 1024 checkpoint dropped the evaluations after it and redid them.
    results = write_evaluations(run_dir, [512, 1024, 1536], 5, seed=99)
    rewrite_manifest(run_dir, final=True)
    rc, out = fetch_json(capsys, "Pong", "CWCA", "42")
    assert rc == 0 and out["runs"][0]["evaluation_rows"] == 15
    with reg.session() as session:
        rows = session.execute(text(
            "SELECT timestep, episode, score FROM evaluations WHERE run_id = :r "
            "ORDER BY timestep, episode"), {"r": run_id}).all()
        mean = session.scalar(text("SELECT mean_score FROM run_scores WHERE run_id = :r"),
                              {"r": run_id})
    assert [r[2] for r in rows] == results.reshape(-1).tolist()
    assert [r[0] for r in rows] == [512] * 5 + [1024] * 5 + [1536] * 5
    assert mean == pytest.approx(results.mean(axis=1).mean(), abs=1e-9)


def test_what_and_checkpoints_choose_the_files(
        synthetic: tuple[Path, int, np.ndarray], workspace: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = fetch_json(capsys, "Pong", "CWCA", "42", "--what", "metrics")
    targets = {f["target"].split("/")[0] for f in out["runs"][0]["files"]}
    assert rc == 0 and targets == {"metrics", "run.json", "provenance.json", "exit.json"}
    rc, out = fetch_json(capsys, "Pong", "CWCA", "42", "--what", "checkpoints",
                         "--checkpoints", "last")
    assert rc == 0 and files_by_status(out["runs"][0], "copied") == {
        "checkpoints/model_checkpoint_1024_steps.zip"}
    rc, out = fetch_json(capsys, "Pong", "CWCA", "42", "--what", "checkpoints,observations",
                         "--checkpoints", "512")
    assert files_by_status(out["runs"][0], "copied") == {
        "checkpoints/model_checkpoint_512_steps.zip", "observations/obs_512_0.npy",
        "observations/obs_512_1.npy", "observations/obs_1024_0.npy",
        "observations/obs_1024_1.npy"}
    capsys.readouterr()
    assert run(["fetch", "Pong", "CWCA", "42", "--what", "checkpionts"]) == 2
    assert "(did you mean checkpoints?)" in capsys.readouterr().err
    assert run(["fetch", "Pong", "CWCA"]) == 2
    assert run(["fetch"]) == 2
    assert run(["fetch", "Pong", "CWCA", "42", "--all"]) == 2


def test_bulk_fetch_takes_the_last_checkpoint_and_goes_on_past_a_missing_run(
        workspace: Path, reg: Registry, capsys: pytest.CaptureFixture[str]) -> None:
    for attn in ("NA", "SWA"):
        run_spec = spec(attn=attn, seed=0)
        run_dir = workspace / "runs" / "main" / "Pong" / attn / "0"
        make_run_dir(run_dir, run_spec)
        # SWA: no run_dir recorded, found at the default place below scratch.
        queue(reg, run_spec, run_dir if attn == "NA" else None)
        if attn == "SWA":
            with reg.write() as session:
                session.execute(text("UPDATE runs SET state = 'running' WHERE attn = 'SWA'"))
    queue(reg, spec(attn="CWRA", seed=0), workspace / "runs" / "gone", state="failed")
    queue(reg, spec(attn="CWCA", seed=0), None)  # queued, never dispatched: skipped

    rc, out = fetch_json(capsys, "--all")
    by_run = {r["run"]: r for r in out["runs"]}
    assert rc == 1 and set(by_run) == {"Pong/NA/0", "Pong/SWA/0", "Pong/CWRA/0"}
    assert "does not exist" in by_run["Pong/CWRA/0"]["error"]
    for key in ("Pong/NA/0", "Pong/SWA/0"):
        copied = files_by_status(by_run[key], "copied")
        assert "checkpoints/model_checkpoint_1024_steps.zip" in copied
        assert "checkpoints/model_checkpoint_512_steps.zip" not in copied
    rc, out = fetch_json(capsys, "--attn", "NA,SWA", "--finished-only")
    assert rc == 0 and [r["run"] for r in out["runs"]] == ["Pong/NA/0"]
    assert out["runs"][0]["copied"] == 0


def test_a_repeated_bulk_fetch_announces_nothing_to_copy(
        workspace: Path, reg: Registry, capsys: pytest.CaptureFixture[str]) -> None:
    """exit.json has no manifest entry: it was planned as "to copy" on every fetch, though
    the copy then proved unchanged. Its content, read while planning, decides now."""
    for attn in ("NA", "SWA"):
        run_spec = spec(attn=attn, seed=0)
        run_dir = workspace / "runs" / "main" / "Pong" / attn / "0"
        make_run_dir(run_dir, run_spec)
        queue(reg, run_spec, run_dir)

    def announced() -> str:
        capsys.readouterr()
        assert run(["fetch", "--all"]) == 0
        return next(line for line in capsys.readouterr().err.splitlines()
                    if line.startswith("to copy:"))

    assert announced().startswith("to copy: 26 files")  # the last checkpoint of each
    assert announced() == "to copy: 0 files, 0 B from 2 run(s)"
    stored = workspace / "store" / "main/Pong/NA/0/exit.json"
    stored.write_text(stored.read_text().replace('"done"', '"done" '))  # same size + 1
    assert announced().startswith("to copy: 1 files, ")
    assert json.loads(stored.read_text()) == rundir.read_json(
        workspace / "runs" / "main" / "Pong" / "NA" / "0" / "exit.json")
    assert announced() == "to copy: 0 files, 0 B from 2 run(s)"


def test_a_checkpoint_step_no_run_has_is_one_line_and_fetches_nothing(
        workspace: Path, reg: Registry, capsys: pytest.CaptureFixture[str]) -> None:
    """A typo'd --checkpoints step must not fetch nothing and exit 0; a step only some runs
    have (the others still training) is taken where it is."""
    for attn, checkpoints in (("NA", (512, 1024)), ("SWA", (512,))):
        run_spec = spec(attn=attn, seed=0)
        run_dir = workspace / "runs" / "main" / "Pong" / attn / "0"
        make_run_dir(run_dir, run_spec, checkpoints=checkpoints, exited=attn == "NA")
        queue(reg, run_spec, run_dir)
    store = workspace / "store"
    capsys.readouterr()
    assert run(["fetch", "Pong", "NA", "0", "--checkpoints", "777,1024"]) == 2
    assert capsys.readouterr().err.strip() == (
        "satrl: no checkpoint at step 777 in Pong/NA/0 (checkpoints: 512, 1,024); "
        "nothing fetched")
    assert run(["fetch", "Pong", "SWA", "0", "--checkpoints", "1024"]) == 2
    assert "no checkpoint at step 1,024 in Pong/SWA/0 (checkpoints: 512)" in \
        capsys.readouterr().err
    assert run(["fetch", "--all", "--checkpoints", "1_024,2048,4096"]) == 2
    assert "no checkpoint at step 2,048, 4,096 in any of the 2 runs (checkpoints: 512, " \
        "1,024)" in capsys.readouterr().err
    assert not store.exists() or not any(store.rglob("*.zip"))
    assert table_rows(reg, "artifacts", 1) == table_rows(reg, "artifacts", 2) == []
    rc, out = fetch_json(capsys, "--all", "--what", "checkpoints", "--checkpoints", "1024")
    by_run = {r["run"]: r for r in out["runs"]}
    assert rc == 0 and by_run["Pong/SWA/0"]["problems"] == 0
    assert {f for f in files_by_status(by_run["Pong/NA/0"], "copied")
            if f.startswith("checkpoints/")} == {"checkpoints/model_checkpoint_1024_steps.zip"}
    assert not any(f.startswith("checkpoints/")
                   for f in files_by_status(by_run["Pong/SWA/0"], "copied"))
    # No checkpoints asked for: no step to miss.
    assert fetch_json(capsys, "Pong", "NA", "0", "--what", "metrics",
                      "--checkpoints", "777")[0] == 0


def test_stray_files_listed_as_checkpoints_are_per_file_problems_and_other_runs_go_on(
        workspace: Path, reg: Registry, capsys: pytest.CaptureFixture[str]) -> None:
    # An older worker listed every file of checkpoints/: an NFS silly-rename leftover, a README.
    stray = ["checkpoints/.nfs000000000123abcd00000001", "checkpoints/README.txt",
             "observations/notes.txt"]
    for attn in ("NA", "SWA"):
        run_spec = spec(attn=attn, seed=0)
        run_dir = workspace / "runs" / "main" / "Pong" / attn / "0"
        make_run_dir(run_dir, run_spec)
        if attn == "NA":
            for relative in stray:
                list_in_manifest(run_dir, relative, relative.split("/")[0][:-1], b"left over")
        queue(reg, run_spec, run_dir)

    rc, out = fetch_json(capsys, "--all")
    by_run = {r["run"]: r for r in out["runs"]}
    assert rc == 1 and by_run["Pong/SWA/0"]["problems"] == 0 and by_run["Pong/SWA/0"]["copied"]
    na = by_run["Pong/NA/0"]
    problems = {f["path"]: f["problem"] for f in na["files"] if f["status"] == "problem"}
    assert set(problems) == set(stray) and na["error"] is None
    assert "not a checkpoint's" in problems["checkpoints/README.txt"]
    assert "checkpoints/model_checkpoint_1024_steps.zip" in files_by_status(na, "copied")
    assert na["evaluation_rows"] == 20  # the rest of the run is fetched and ingested
    stored = store_tree(workspace / "store")
    assert not any("nfs" in p or "README" in p or "notes" in p for p in stored)

    # A person reading the text output: one line per stray file, no traceback.
    capsys.readouterr()
    assert run(["fetch", "Pong", "NA", "0"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for relative in stray:
        assert sum(relative in line for line in err.splitlines()) == 1


def test_out_of_range_metrics_fail_the_content_check_and_are_not_stored(
        synthetic: tuple[Path, int, np.ndarray], reg: Registry, workspace: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    run_dir, run_id, _ = synthetic
    text_ = (run_dir / "metrics.csv").read_text().splitlines()
    text_[3] = "1e30" + text_[3][text_[3].index(","):]  # float-parsable, no SQL integer
    (run_dir / "metrics.csv").write_text("\n".join(text_) + "\n")
    rewrite_manifest(run_dir)
    for attempt in range(2):  # and the next fetch says the same, no traceback
        capsys.readouterr()
        assert run(["fetch", "Pong", "CWCA", "42"]) == 1, attempt
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "metrics.csv: metrics.csv line 4: timesteps '1e30'" in err[0]
        # The store does not hold what the registry could not take; the rest is fetched.
        assert not (workspace / "store" / STORE_RUN / "metrics/metrics.csv").exists()
        with reg.session() as session:
            paths = set(session.scalars(text("SELECT path FROM artifacts WHERE run_id = :r"),
                                        {"r": run_id}))
            names = set(session.scalars(text(
                "SELECT DISTINCT name FROM metrics WHERE run_id = :r"), {"r": run_id}))
        assert len(paths) == 13 and not any(p.endswith("metrics.csv") for p in paths)
        assert names == {"episode_score", "episode_frames"}  # the monitors' only


def test_a_refused_ingestion_leaves_the_store_as_it_was(
        synthetic: tuple[Path, int, np.ndarray], reg: Registry, workspace: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.store import ingest

    run_dir, run_id, _ = synthetic

    def refuse(*_args: object) -> int:
        raise RuntimeError("the registry refuses the rows")

    monkeypatch.setattr(ingest, "replace_metrics", refuse)
    with pytest.raises(RuntimeError, match="refuses"):
        run(["fetch", "Pong", "CWCA", "42"])
    # Nothing was installed: store and registry still agree (on nothing).
    assert store_tree(workspace / "store") == {}
    assert table_rows(reg, "artifacts", run_id) == table_rows(reg, "evaluations", run_id) == []

    monkeypatch.undo()
    assert fetch_json(capsys, "Pong", "CWCA", "42")[0] == 0
    assert len(table_rows(reg, "artifacts", run_id)) == 14


def test_a_stored_copy_that_no_longer_parses_is_a_per_file_problem(
        synthetic: tuple[Path, int, np.ndarray], reg: Registry, workspace: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    # An older satrl, which checked less, stored a metrics.csv this one refuses; the run
    # directory holds the same file and the final manifest vouches for it.
    run_dir, run_id, _ = synthetic
    assert fetch_json(capsys, "Pong", "CWCA", "42")[0] == 0
    evaluations = table_rows(reg, "evaluations", run_id)
    (run_dir / "metrics.csv").write_text("timesteps,loss\n256,0.5\n1e30,0.4\n")
    rewrite_manifest(run_dir)
    shutil.copyfile(run_dir / "metrics.csv", workspace / "store" / STORE_RUN /
                    "metrics/metrics.csv")
    capsys.readouterr()
    assert run(["fetch", "Pong", "CWCA", "42"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "metrics.csv line 3: timesteps '1e30'" in err[0]
    assert table_rows(reg, "evaluations", run_id) == evaluations  # the rest as it was


def test_a_file_swapped_for_a_fifo_after_planning_is_a_per_file_problem(
        synthetic: tuple[Path, int, np.ndarray], workspace: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.store import fetch as fetch_service
    from orchestrator.store.sources import LocalSource

    run_dir, _, _ = synthetic
    fifo = rundir.observation_path(run_dir, 512, 0)

    class SwappingSource(LocalSource):
        """Replaces a planned file with a FIFO just before the copy reads it."""

        def copy(self, run_dir_: str, relpaths: list[str], dest: Path,
                 on_bytes: object = None) -> None:
            relative = fifo.relative_to(run_dir).as_posix()
            if relative in relpaths and not fifo.is_fifo():
                fifo.unlink()
                os.mkfifo(fifo)
            super().copy(run_dir_, relpaths, dest, on_bytes)  # type: ignore[arg-type]

    monkeypatch.setattr(fetch_service, "open_source", lambda _settings: SwappingSource())
    with fifo_rescue(fifo, after_s=5) as rescued:
        rc, out = fetch_json(capsys, "Pong", "CWCA", "42")
    assert not rescued, "the fetch blocked opening a FIFO"
    (result,) = out["runs"]
    problems = {f["path"]: f["problem"] for f in result["files"] if f["status"] == "problem"}
    assert rc == 1 and set(problems) == {"observations/obs_512_0.npy"}
    assert "not a regular file" in problems["observations/obs_512_0.npy"]
    assert result["copied"] == 13
