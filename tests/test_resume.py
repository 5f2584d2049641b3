"""Kill, signal and deadline a real worker, restart it, and check that the run ends on schedule.

One spec for all: 2048 steps, rollouts of 128 (2 envs x 64), an evaluation every 256 steps and a
checkpoint every 512, so that an evaluation can be newer than the newest checkpoint.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from stable_baselines3 import PPO

from agents.rundir import checkpoint_path, list_checkpoints, verify_manifest, write_run_json
from tests.fixtures.trained import run_worker, start_worker, tiny_spec

torch.set_num_threads(1)

pytestmark = pytest.mark.slow

SPEC = tiny_spec("NA", total_timesteps=2_048, n_steps=64, batch_size=64, eval_every_steps=256,
                 checkpoint_every_steps=512, obs_dump_every_steps=512)
TOTAL = SPEC.total_timesteps
ROLLOUT = SPEC.rollout_size
SCHEDULED_EVALS = list(range(SPEC.eval_every_steps, TOTAL + 1, SPEC.eval_every_steps))


def _lr(timesteps: int) -> float:
    """The linear schedule at the progress of an update made after `timesteps` steps."""
    return SPEC.learning_rate * (1 - timesteps / TOTAL)


def _eval_timesteps(run_dir: Path) -> list[int]:
    try:
        with np.load(run_dir / "evaluations.npz") as data:
            return data["timesteps"].tolist()
    except (OSError, ValueError, KeyError):  # not written yet
        return []


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _metrics(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open() as handle:
        return list(csv.DictReader(handle))


def _wait_for(condition: Callable[[], bool], process: subprocess.Popen[str],
              timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if process.poll() is not None:
            _, stderr = process.communicate()
            pytest.fail(f"worker exited with {process.returncode} first:\n{stderr[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("condition not met in time")
        time.sleep(0.005)


def _assert_finished_on_schedule(run_dir: Path, resumed_from: int,
                                 attempts_made: int = 2) -> list[dict[str, str]]:
    """The run ended at TOTAL with every scheduled evaluation once and the schedules continued."""
    exit_info = _json(run_dir / "exit.json")
    assert (exit_info["reason"], exit_info["exit_code"]) == ("done", 0)
    assert exit_info["timesteps"] == TOTAL and exit_info["attempt"] == attempts_made
    attempts = _json(run_dir / "provenance.json")["attempts"]
    assert [a["attempt"] for a in attempts] == list(range(1, attempts_made + 1))
    assert attempts[-1]["resumed_from_step"] == resumed_from

    assert _eval_timesteps(run_dir) == SCHEDULED_EVALS
    with np.load(run_dir / "evaluations.npz") as data:
        assert data["results"].shape == data["ep_lengths"].shape == (len(SCHEDULED_EVALS), 1)
        # The evaluation monitor: one line per episode of the npz, in order (the evaluations
        # the resume dropped and redid are not in it twice).
        monitor = [line.split(",") for line in
                   (run_dir / "monitor" / "eval.monitor.csv").read_text().splitlines()
                   if line and not line.startswith(("#", "r,l"))]
        assert [(float(r), int(n)) for r, n, *_ in monitor] == list(zip(
            data["results"][:, 0].tolist(), data["ep_lengths"][:, 0].tolist(), strict=True))
    # Each resumed attempt marked where its training episodes start.
    for path in (run_dir / "monitor").glob("train_*.monitor.csv"):
        marks = [line for line in path.read_text().splitlines() if "resumed_from_step" in line]
        assert marks == [f'#{{"resumed_from_step": {resumed_from}}}'] * (attempts_made - 1)

    rows = _metrics(run_dir)
    steps = [int(r["timesteps"]) for r in rows]
    assert steps == sorted(set(steps)) and steps[-1] <= TOTAL
    # Attempt 1's updates before the checkpoint (the update of a rollout ending at its step
    # came after it, and is not in the weights resumed from), then one per rollout from it.
    assert [s for s in steps if s <= resumed_from] == list(range(ROLLOUT, resumed_from, ROLLOUT))
    assert [s for s in steps if s > resumed_from] == list(
        range(resumed_from + ROLLOUT, TOTAL + 1, ROLLOUT))
    for row in rows:  # progress_remaining is relative to TOTAL in both attempts
        assert float(row["learning_rate"]) == pytest.approx(_lr(int(row["timesteps"])))
        assert float(row["clip_range"]) == pytest.approx(
            SPEC.clip_range * (1 - int(row["timesteps"]) / TOTAL))

    final = PPO.load(checkpoint_path(run_dir, TOTAL), device="cpu")
    assert final.num_timesteps == TOTAL
    assert final.policy.optimizer.param_groups[0]["lr"] == pytest.approx(_lr(steps[-1]))
    for step, path in list_checkpoints(run_dir):  # none left truncated; each at its own step
        assert PPO.load(path, device="cpu").num_timesteps == step
    dumps = sorted(p.name for p in (run_dir / "observations").iterdir())
    assert dumps == sorted(f"obs_{s}_{k}.npy" for s in (512, 1024, 1536, 2048) for k in (0, 1))
    assert _json(run_dir / "manifest.json")["final"] is True
    assert verify_manifest(run_dir) == []
    return rows


def test_sigkill_after_an_evaluation_then_truncated_checkpoint(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    write_run_json(run_dir, SPEC)
    process = start_worker(run_dir)
    _wait_for(lambda: 1280 in _eval_timesteps(run_dir), process)
    process.kill()
    process.communicate()
    # The situation under test: an evaluation (1280) newer than the newest checkpoint (1024).
    assert [s for s, _ in list_checkpoints(run_dir)] == [512, 1024]
    assert _eval_timesteps(run_dir)[-1] == 1280
    assert not (run_dir / "exit.json").exists()
    newest = checkpoint_path(run_dir, 1024)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])

    result = run_worker(run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning: skipping checkpoint model_checkpoint_1024_steps.zip" in result.stderr
    assert "resuming from step 512" in result.stdout
    _assert_finished_on_schedule(run_dir, resumed_from=512)


def test_sigterm_saves_exits_143_and_resumes(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    write_run_json(run_dir, SPEC)
    process = start_worker(run_dir)
    _wait_for(lambda: 768 in _eval_timesteps(run_dir), process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-3000:]

    exit_info = _json(run_dir / "exit.json")
    assert (exit_info["reason"], exit_info["exit_code"]) == ("signal", 143)
    stopped_at = exit_info["timesteps"]
    assert 768 <= stopped_at < TOTAL and "SIGTERM" in exit_info["message"]
    assert PPO.load(checkpoint_path(run_dir, stopped_at), device="cpu").num_timesteps == stopped_at
    assert _json(run_dir / "status.json")["phase"] == "exiting"
    assert _json(run_dir / "manifest.json")["final"] is True and verify_manifest(run_dir) == []

    result = run_worker(run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_finished_on_schedule(run_dir, resumed_from=stopped_at)


def test_stop_during_the_catch_up_evaluation_keeps_the_checkpoint_to_resume_from(
        tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    write_run_json(run_dir, SPEC)
    # Attempt 1: SIGTERM during the evaluation due at 256. It is not recorded; the worker
    # checkpoints at 256 itself, so that the next attempt evaluates those weights first.
    process = start_worker(run_dir)
    _wait_for(lambda: _json_or_empty(run_dir / "status.json").get("phase") == "evaluating",
              process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-3000:]
    assert _json(run_dir / "exit.json")["timesteps"] == 256 and _eval_timesteps(run_dir) == []

    # Attempt 2: SIGTERM during that catch-up evaluation, before any update. The weights are
    # the checkpoint's, so it stays the resume point: no checkpoint a few env steps later.
    process = start_worker(run_dir)
    _wait_for(lambda: _json_or_empty(run_dir / "status.json").get("attempt") == 2
              and _json_or_empty(run_dir / "status.json").get("phase") == "evaluating", process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-3000:]
    exit_info = _json(run_dir / "exit.json")
    assert (exit_info["reason"], exit_info["timesteps"]) == ("signal", 256)
    assert exit_info["message"].endswith("checkpoint at 256 steps")
    assert [s for s, _ in list_checkpoints(run_dir)] == [256]
    assert verify_manifest(run_dir) == []

    # Attempt 3 evaluates at 256, stamped 256, and finishes on schedule.
    result = run_worker(run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_finished_on_schedule(run_dir, resumed_from=256, attempts_made=3)


def test_a_second_worker_in_the_same_run_directory_exits_without_touching_it(
        tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    write_run_json(run_dir, SPEC.replace(eval_every_steps=TOTAL))
    first = start_worker(run_dir)
    _wait_for(lambda: _json_or_empty(run_dir / "status.json").get("timesteps", 0) >= 128, first)
    status_before = (run_dir / "status.json").read_text()
    second = run_worker(run_dir)
    assert second.returncode == 3, second.stderr[-3000:]
    assert f"another worker (pid {first.pid} on " in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    assert not (run_dir / "exit.json").exists()
    status = _json(run_dir / "status.json")  # still the first worker's, attempt 1
    assert status["pid"] == first.pid and status["attempt"] == 1, status_before
    assert [a["attempt"] for a in _json(run_dir / "provenance.json")["attempts"]] == [1]
    first.send_signal(signal.SIGTERM)
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 143, stderr[-3000:]
    # The lock went with the first worker: the next one resumes.
    result = run_worker(run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _json(run_dir / "exit.json")["attempt"] == 2


def test_sigusr1_saves_and_exits_with_walltime(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    write_run_json(run_dir, SPEC.replace(eval_every_steps=TOTAL))
    process = start_worker(run_dir)
    _wait_for(lambda: _json_or_empty(run_dir / "status.json").get("timesteps", 0) >= 256, process)
    process.send_signal(signal.SIGUSR1)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 75, stderr[-3000:]
    exit_info = _json(run_dir / "exit.json")
    assert exit_info["reason"] == "walltime" and "SIGUSR1" in exit_info["message"]
    assert 256 <= exit_info["timesteps"] < TOTAL
    assert checkpoint_path(run_dir, exit_info["timesteps"]).is_file()
    assert verify_manifest(run_dir) == []


def test_deadline_saves_and_exits_with_walltime(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    margin_s = 1.0
    # Far more steps than fit before the deadline, no evaluations: only the deadline stops it.
    write_run_json(run_dir, SPEC.replace(total_timesteps=100_000, eval_every_steps=100_000,
                                         deadline_margin_s=margin_s))
    # Time for the interpreter, torch and a few updates even on a busy machine: a worker
    # stopped before its first update keeps no checkpoint (there is nothing new to keep).
    deadline = time.time() + margin_s + 25.0
    result = run_worker(run_dir, env={"SATRL_DEADLINE": f"{deadline:.3f}"})
    assert result.returncode == 75, result.stderr[-3000:]
    assert time.time() >= deadline - margin_s
    exit_info = _json(run_dir / "exit.json")
    assert exit_info["reason"] == "walltime" and "deadline" in exit_info["message"]
    assert 0 < exit_info["timesteps"] < 100_000
    assert os.path.getmtime(checkpoint_path(run_dir, exit_info["timesteps"])) >= deadline - margin_s
    assert verify_manifest(run_dir) == []


def test_sigterm_to_the_whole_job_with_subprocess_envs(tmp_path: Path) -> None:
    # scancel and qdel signal every process of the job: SubprocVecEnv's env workers must outlive
    # the SIGTERM long enough for the worker's final checkpoint.
    run_dir = tmp_path / "run"
    write_run_json(run_dir, SPEC.replace(env_backend="subproc", eval_every_steps=TOTAL))
    process = start_worker(run_dir, new_session=True)
    _wait_for(lambda: _json_or_empty(run_dir / "status.json").get("timesteps", 0) >= 256, process)
    os.killpg(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-3000:]
    exit_info = _json(run_dir / "exit.json")
    assert exit_info["reason"] == "signal" and 256 <= exit_info["timesteps"] < TOTAL
    steps = exit_info["timesteps"]
    assert PPO.load(checkpoint_path(run_dir, steps), device="cpu").num_timesteps == steps
    assert verify_manifest(run_dir) == []


def _json_or_empty(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
