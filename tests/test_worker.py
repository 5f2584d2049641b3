"""The worker's run directory after a real tiny Pong run of every attention type (trained_runs)."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from stable_baselines3 import PPO

from agents.catalog import ATTENTION_TYPES
from agents.extractor import SelfAttentionCNN
from agents.rundir import file_kind, verify_manifest
from agents.spec import RunSpec
from tests.fixtures.trained import TINY_SPEC, run_worker

torch.set_num_threads(1)

pytestmark = pytest.mark.slow

TOTAL = TINY_SPEC.total_timesteps


def _json(path: Path) -> dict:
    data = json.loads(path.read_text())
    assert data["schema"] == 1, path
    return data


def _all_files(run_dir: Path) -> set[str]:
    return {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()}


@pytest.mark.parametrize("attn", ATTENTION_TYPES)
def test_run_dir_is_complete_and_its_manifest_matches(trained_runs: dict[str, Path],
                                                      attn: str) -> None:
    run_dir = trained_runs[attn]
    assert RunSpec.from_dict(_json(run_dir / "run.json")) == TINY_SPEC.replace(attn=attn)

    exit_info = _json(run_dir / "exit.json")
    assert (exit_info["reason"], exit_info["exit_code"]) == ("done", 0)
    assert exit_info["timesteps"] == TOTAL and exit_info["attempt"] == 1

    status = _json(run_dir / "status.json")
    assert status["phase"] == "exiting" and status["timesteps"] == TOTAL
    assert status["total_timesteps"] == TOTAL and status["attempt"] == 1
    assert status["updated_at"] >= status["started_at"] > 0 and status["steps_per_s"] > 0

    (attempt,) = _json(run_dir / "provenance.json")["attempts"]
    assert attempt["attempt"] == 1 and attempt["resumed_from_step"] is None
    assert attempt["packages"]["stable-baselines3"] == "2.9.2"
    assert attempt["torch"] == torch.__version__  # the distribution's may lack "+cu130"
    assert attempt["packages"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert set(attempt) >= {"host", "pid", "python", "git_commit", "cuda", "rocm", "gpu",
                            "image_digest", "scheduler_job_id", "started_at"}

    manifest = _json(run_dir / "manifest.json")
    assert manifest["final"] is True
    assert verify_manifest(run_dir) == []
    listed = {entry["path"] for entry in manifest["files"]}
    # The final manifest covers every file but itself, exit.json and the worker's lock (logs/
    # is the job's).
    assert listed == _all_files(run_dir) - {"manifest.json", "exit.json", ".worker.lock"}
    for entry in manifest["files"]:
        assert entry["kind"] == file_kind(entry["path"]) is not None
    steps = {e["path"]: e["step"] for e in manifest["files"]}
    assert steps["checkpoints/model_checkpoint_1024_steps.zip"] == 1024
    assert steps["observations/obs_512_1.npy"] == 512 and steps["metrics.csv"] is None
    assert {e["kind"] for e in manifest["files"]} == {
        "checkpoint", "observation", "evaluations", "metrics", "monitor", "tensorboard",
        "run_json", "provenance", "status"}


@pytest.mark.parametrize("attn", ATTENTION_TYPES)
def test_checkpoints_open_with_ppo_load(trained_runs: dict[str, Path], attn: str) -> None:
    run_dir = trained_runs[attn]
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["model_checkpoint_1024_steps.zip", "model_checkpoint_512_steps.zip"]
    for steps in (512, 1024):
        model = PPO.load(run_dir / "checkpoints" / f"model_checkpoint_{steps}_steps.zip",
                         device="cpu")
        assert model.num_timesteps == steps
        extractor = model.policy.features_extractor
        assert isinstance(extractor, SelfAttentionCNN) and extractor.self_attn == attn
        assert (extractor.attention is None) == (attn == "NA")
        obs = np.load(run_dir / "observations" / f"obs_{steps}_0.npy")
        action, _ = model.predict(obs, deterministic=True)
        assert action.shape == (1,)
    # The final checkpoint holds the last update: its optimizer ran with lr(progress 0) = 0.
    assert model.policy.optimizer.param_groups[0]["lr"] == 0.0


@pytest.mark.parametrize("attn", ["NA", "CWRCA"])
def test_evaluations_metrics_and_dumps(trained_runs: dict[str, Path], attn: str) -> None:
    run_dir = trained_runs[attn]
    with np.load(run_dir / "evaluations.npz") as data:
        assert data["timesteps"].dtype == np.int64
        assert data["timesteps"].tolist() == [512, 1024]
        assert data["results"].shape == data["ep_lengths"].shape == (2, 1)
        results, lengths = data["results"], data["ep_lengths"]
    # Scores are whole Pong games from the Monitor inside AtariWrapper: the evaluation rows are
    # exactly the eval Monitor's episodes (raw score, length in frames).
    with (run_dir / "monitor" / "eval.monitor.csv").open() as handle:
        assert handle.readline().startswith("#")
        episodes = list(csv.DictReader(handle))
    assert [float(e["r"]) for e in episodes] == results[:, 0].tolist()
    assert [int(e["l"]) for e in episodes] == lengths[:, 0].tolist()
    assert all(-21 <= r <= 21 for r in results[:, 0])

    with (run_dir / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["timesteps", "steps_per_s", "learning_rate", "clip_range", "loss",
                             "policy_loss", "value_loss", "entropy_loss", "approx_kl",
                             "clip_fraction", "explained_variance"]
    assert [int(r["timesteps"]) for r in rows] == [256, 512, 768, 1024]
    for row in rows:
        progress_remaining = 1 - int(row["timesteps"]) / TOTAL
        assert float(row["learning_rate"]) == pytest.approx(2.5e-4 * progress_remaining)
        assert float(row["clip_range"]) == pytest.approx(0.1 * progress_remaining)
        assert np.isfinite([float(row[k]) for k in row]).all()

    dumps = sorted(p.name for p in (run_dir / "observations").iterdir())
    assert dumps == ["obs_1024_0.npy", "obs_1024_1.npy", "obs_512_0.npy", "obs_512_1.npy"]
    for name in dumps:
        obs = np.load(run_dir / "observations" / name)
        assert obs.shape == (1, 4, 84, 84) and obs.dtype == np.uint8 and obs.max() > 0

    assert list((run_dir / "tb").rglob("events.out.tfevents.*"))


def test_a_finished_run_exits_at_once_and_changes_nothing(trained_runs: dict[str, Path],
                                                          tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(trained_runs["NA"], run_dir)
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in run_dir.rglob("*")}
    result = run_worker(run_dir, timeout_s=60)
    assert result.returncode == 0, result.stderr
    assert "finished already" in result.stdout
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in run_dir.rglob("*")} == before


def test_help_needs_no_run_dir() -> None:
    result = subprocess.run([sys.executable, "-m", "agents.train", "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "RUN_DIR" in result.stdout


def test_spec_catalog_rundir_and_worker_entry_do_not_import_torch() -> None:
    code = ("import sys, agents.spec, agents.catalog, agents.rundir, agents.train; "
            "print(sorted(m for m in ('torch', 'stable_baselines3', 'numpy', 'orchestrator') "
            "if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_commit_an_image_was_built_from_is_the_attempts_commit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # An image holds no .git; `satrl image build` passes the commit in as SATRL_GIT_COMMIT.
    from agents.train import _git_commit

    monkeypatch.setenv("SATRL_GIT_COMMIT", "ab" * 20)
    monkeypatch.setenv("SATRL_GIT_DIRTY", "false")
    assert _git_commit() == "ab" * 20
    monkeypatch.setenv("SATRL_GIT_DIRTY", "true")
    assert _git_commit() == "ab" * 20 + "+dirty"
    monkeypatch.setenv("SATRL_GIT_COMMIT", "unknown")  # a plain build: the checkout's, if any
    assert _git_commit() != "unknown"
