"""Helpers of the dispatch tests (tests/test_dispatch_*.py): tiny real runs, CLI calls, waits."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agents.rundir import read_json, verify_manifest
from orchestrator.cli import run

#: Real worker runs small enough for a shared 2-core machine: one PPO update of 2 envs x 128
#: steps, one evaluation (one full Pong/Breakout game), a checkpoint at the end.
TINY = ["--preset", "smoke", "--set", "total_timesteps=256", "--set", "eval_every_steps=256",
        "--set", "checkpoint_every_steps=256", "--set", "obs_dump_every_steps=0"]

#: Longer runs for cancel/kill/walltime tests: checkpoints every 256 of 1536 steps.
LONGER = ["--preset", "smoke", "--set", "total_timesteps=1536", "--set",
          "eval_every_steps=1536", "--set", "checkpoint_every_steps=256", "--set",
          "obs_dump_every_steps=0"]


def configure(workspace: Path, toml: str, dispatch: str = "") -> None:
    """Write satrl.toml (`dispatch`: more lines of its [dispatch] table) and make this process
    read it again."""
    from orchestrator.settings import settings

    (workspace / "satrl.toml").write_text(
        f'[dispatch]\npython = "{sys.executable}"\nwait_interval_s = 0.5\n{dispatch}\n' + toml)
    settings.cache_clear()


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = run(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def cli_json(capsys: pytest.CaptureFixture[str], *args: str) -> Any:
    code, out, err = cli(capsys, *args, "--json")
    assert code == 0, err
    return json.loads(out)


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str,
             interval_s: float = 0.3) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def states(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, str]:
    """{GAME/ATTN/SEED: state} after a reconciling `satrl status`."""
    data = cli_json(capsys, "status", *args)
    return {f"{r['game']}/{r['attn']}/{r['seed']}": r["state"] for r in data["runs"]}


def show(capsys: pytest.CaptureFixture[str], ref: str) -> dict[str, Any]:
    return cli_json(capsys, "show", ref)


def assert_complete(run_dir: Path, total_timesteps: int, attempts: int = 1) -> None:
    """A finished run directory: every file of the contract, checksums matching."""
    exit_info = read_json(run_dir / "exit.json")
    assert exit_info["reason"] == "done" and exit_info["timesteps"] == total_timesteps
    manifest = read_json(run_dir / "manifest.json")
    assert manifest["final"] is True
    assert verify_manifest(run_dir) == []
    assert (run_dir / "checkpoints" / f"model_checkpoint_{total_timesteps}_steps.zip").is_file()
    for name in ("run.json", "status.json", "metrics.csv", "evaluations.npz"):
        assert (run_dir / name).is_file(), name
    assert len(read_json(run_dir / "provenance.json")["attempts"]) == attempts
    for n in range(1, attempts + 1):
        assert (run_dir / "logs" / f"attempt-{n}.out").is_file()
        assert (run_dir / "logs" / f"attempt-{n}.err").is_file()
    assert read_json(run_dir / "run.json")["run_id"] is not None


def checkpoints(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "checkpoints").glob("model_checkpoint_*_steps.zip"))
