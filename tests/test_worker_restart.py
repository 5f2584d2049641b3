"""Restarting the worker on a directory that is not what it seems: a final checkpoint without
the last update, a truncated or foreign one, a run.json edited between attempts, a SIGTERM while
the worker is still starting."""

from __future__ import annotations

import csv
import io
import json
import shutil
import signal
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from stable_baselines3 import PPO

from agents.rundir import checkpoint_path, list_checkpoints, write_run_json
from tests.fixtures.trained import TINY_SPEC, run_worker, start_worker, tiny_spec

torch.set_num_threads(1)

TOTAL = TINY_SPEC.total_timesteps
#: Gradient epochs of a whole tiny run: one update per rollout, n_epochs each (SB3's _n_updates).
ALL_UPDATES = TOTAL // TINY_SPEC.rollout_size * TINY_SPEC.n_epochs


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _metric_steps(run_dir: Path) -> list[int]:
    with (run_dir / "metrics.csv").open() as handle:
        return [int(row["timesteps"]) for row in csv.DictReader(handle)]


def _copy(trained_runs: dict[str, Path], tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(trained_runs["NA"], run_dir)
    return run_dir


@pytest.mark.slow
def test_a_kill_during_the_last_update_leaves_no_final_checkpoint_without_it(
        tmp_path: Path) -> None:
    # The final checkpoint is the worker's own, after the last update. Were it taken on the
    # schedule (in on_step, before that update), a SIGKILL during the update would leave a
    # "final" checkpoint one update short, which the next attempt would take as done.
    run_dir = tmp_path / "run"
    write_run_json(run_dir, TINY_SPEC.replace(eval_every_steps=TOTAL))
    process = start_worker(run_dir)
    final = checkpoint_path(run_dir, TOTAL)
    deadline = time.monotonic() + 600
    while not final.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    process.kill()
    process.communicate()

    result = run_worker(run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _json(run_dir / "exit.json")["reason"] == "done"
    assert PPO.load(final, device="cpu")._n_updates == ALL_UPDATES
    assert _metric_steps(run_dir)[-1] == TOTAL


def test_a_truncated_final_checkpoint_is_trained_again(trained_runs: dict[str, Path],
                                                       tmp_path: Path) -> None:
    run_dir = _copy(trained_runs, tmp_path)
    final = checkpoint_path(run_dir, TOTAL)
    final.write_bytes(final.read_bytes()[:1000])

    result = run_worker(run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "finished already" not in result.stdout
    assert "skipping checkpoint model_checkpoint_1024_steps.zip" in result.stderr
    assert "resuming from step 512" in result.stdout
    assert PPO.load(final, device="cpu").num_timesteps == TOTAL
    assert _json(run_dir / "exit.json")["attempt"] == 2


@pytest.mark.parametrize("finished", [True, False], ids=["finished", "unfinished"])
def test_a_run_json_with_other_scientific_settings_is_refused(
        trained_runs: dict[str, Path], tmp_path: Path, finished: bool) -> None:
    run_dir = _copy(trained_runs, tmp_path)
    if not finished:  # as if killed after the checkpoint at 512
        (run_dir / "exit.json").unlink()
        checkpoint_path(run_dir, TOTAL).unlink()
    exit_before = (run_dir / "exit.json").read_bytes() if finished else None
    # A valid run.json of its own (its hash matches its fields), for another seed and gamma.
    write_run_json(run_dir, tiny_spec("NA", seed=7, gamma=0.5))

    result = run_worker(run_dir)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "not the ones that trained this directory's checkpoints" in lines[0]
    assert [s for s, _ in list_checkpoints(run_dir)] == ([512, TOTAL] if finished else [512])
    if finished:  # the finished run's exit.json stays the truth about it
        assert (run_dir / "exit.json").read_bytes() == exit_before
    else:
        assert _json(run_dir / "exit.json")["exit_code"] == 2


def test_an_execution_field_may_change_between_attempts(trained_runs: dict[str, Path],
                                                        tmp_path: Path) -> None:
    run_dir = _copy(trained_runs, tmp_path)
    write_run_json(run_dir, tiny_spec("NA", checkpoint_every_steps=256, torch_threads=1))
    result = run_worker(run_dir)
    assert result.returncode == 0 and "finished already" in result.stdout


def test_a_checkpoint_that_does_not_load_fails_with_one_line(trained_runs: dict[str, Path],
                                                             tmp_path: Path) -> None:
    run_dir = _copy(trained_runs, tmp_path)
    (run_dir / "exit.json").unlink()
    buffer = io.BytesIO()  # an intact zip with SB3's member names and garbage inside
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("data", "{not json")
        archive.writestr("policy.pth", b"garbage")
    checkpoint_path(run_dir, TOTAL).write_bytes(buffer.getvalue())

    result = run_worker(run_dir)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "does not load" in errors[0]
    exit_info = _json(run_dir / "exit.json")
    assert exit_info["reason"] == "failed" and "does not load" in exit_info["message"]


def _handles_sigterm(pid: int) -> bool:
    """Whether the process has a handler for SIGTERM (SigCgt in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    return False


def _torch_loaded(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def test_sigterm_while_the_worker_starts_ends_with_this_attempts_exit_json(
        trained_runs: dict[str, Path], tmp_path: Path) -> None:
    run_dir = _copy(trained_runs, tmp_path)
    (run_dir / "exit.json").write_text(json.dumps(  # an earlier attempt's, to be replaced
        {"schema": 1, "reason": "walltime", "exit_code": 75, "message": "old", "timesteps": 512,
         "attempt": 1}))
    checkpoint_path(run_dir, TOTAL).unlink()
    process = start_worker(run_dir)
    deadline = time.monotonic() + 120
    while not _handles_sigterm(process.pid):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.001)
    # The handler is there before torch: a job killed during the imports still says why.
    assert not _torch_loaded(process.pid)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 143, stderr[-3000:]
    exit_info = _json(run_dir / "exit.json")
    assert (exit_info["reason"], exit_info["attempt"]) == ("signal", 2)
    assert exit_info["timesteps"] == 512 and "SIGTERM" in exit_info["message"]


def test_a_dump_of_more_observations_than_envs_is_whole_even_at_the_last_step(
        tmp_path: Path) -> None:
    # 6 observations of 2 envs: the crossing step's and the two steps' before it, written at
    # once (continuing over later steps would cut the dump at 1024, where training ends).
    run_dir = tmp_path / "run"
    write_run_json(run_dir, TINY_SPEC.replace(obs_dump_count=6, eval_every_steps=TOTAL))
    result = run_worker(run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    dumps = sorted(p.name for p in (run_dir / "observations").iterdir())
    assert dumps == sorted(f"obs_{s}_{k}.npy" for s in (512, TOTAL) for k in range(6))
    first = np.load(run_dir / "observations" / "obs_1024_0.npy")
    assert first.shape == (1, 4, 84, 84) and first.dtype == np.uint8


def test_a_damaged_deflated_member_is_a_zip_problem_not_an_exception(tmp_path: Path) -> None:
    # testzip() inflates each member: flipped bytes inside a deflated one raise zlib.error,
    # which escaped is_finished (before the lock) and the checkpoint loader as a traceback.
    from agents.train import _zip_problem

    path = tmp_path / "model_checkpoint_1024_steps.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("data", "{}")
        archive.writestr("policy.pth", bytes(range(256)) * 400)
    raw = bytearray(path.read_bytes())
    start = raw.index(b"policy.pth") + len("policy.pth") + 20  # inside its compressed bytes
    raw[start:start + 64] = bytes(64)
    path.write_bytes(bytes(raw))
    problem = _zip_problem(path)
    assert problem is not None and ("error" in problem.lower() or "CRC" in problem)
