"""A malformed or hostile run.json: one clear error in exit.json and on stderr, no training."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.trained import TINY_SPEC, run_worker


def _spec_dict(**changes: Any) -> dict[str, Any]:
    return {**TINY_SPEC.to_dict(), **changes}


def _without_hash(**changes: Any) -> dict[str, Any]:
    data = _spec_dict(**changes)
    del data["spec_hash"]
    return data


def _write(content: str | bytes | dict[str, Any] | list[Any]) -> Callable[[Path], None]:
    def write(run_dir: Path) -> None:
        path = run_dir / "run.json"
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, str):
            path.write_text(content)
        else:
            path.write_text(json.dumps(content))
    return write


# (case id, how run.json is made, words the error must contain)
CASES: list[tuple[str, Callable[[Path], None], tuple[str, ...]]] = [
    ("unknown-game", _write(_without_hash(game="Pongg")), ("game", "Pong")),
    ("negative-steps", _write(_without_hash(total_timesteps=-5)), ("total_timesteps", ">= 1")),
    ("wrong-type", _write(_without_hash(n_envs="16")), ("n_envs", "int")),
    ("bool-for-int", _write(_without_hash(seed=True)), ("seed", "int")),
    ("nan", _write(json.dumps(_without_hash(learning_rate=float("nan")))),
     ("learning_rate", "finite")),
    ("huge-int-for-float", _write(_without_hash(learning_rate=10**400)),
     ("learning_rate", "finite")),
    ("rollout-too-large", _write(_without_hash(n_steps=10**9)), ("n_steps", "<=")),
    ("fields-missing", _write({"schema": 1}), ("lacks", "total_timesteps", "seed")),
    ("env-id-of-another-game", _write(_spec_dict(env_id="BreakoutNoFrameskip-v4")),
     ("env_id", "Breakout")),
    ("unknown-field", _write(_without_hash(rm_rf="/")), ("unknown field", "rm_rf")),
    ("newer-schema", _write(_spec_dict(schema=99)), ("schema 99", "upgrade")),
    ("no-schema", _write({"game": "Pong"}), ("schema",)),
    ("hand-edited", _write(_spec_dict(total_timesteps=4096)), ("spec_hash", "by hand")),
    ("not-json", _write("{'game': 'Pong'"), ("JSON",)),
    ("not-an-object", _write([1, 2, 3]), ("JSON object",)),
    ("binary", _write(b"\x00\xff\xfe" * 10), ("JSON",)),
    ("deeply-nested", _write("[" * 100_000 + "]" * 100_000), ("JSON",)),
    ("too-large", _write(" " * (2 << 20) + "{}"), ("bytes",)),
]


@pytest.mark.parametrize(("make", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_invalid_run_json_fails_with_one_clear_error(
    tmp_path: Path, make: Callable[[Path], None], words: tuple[str, ...]
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    make(run_dir)
    result = run_worker(run_dir, timeout_s=60)

    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("satrl worker: error: invalid run.json")
    exit_info = json.loads((run_dir / "exit.json").read_text())
    assert exit_info["schema"] == 1
    assert (exit_info["reason"], exit_info["exit_code"]) == ("failed", 2)
    assert exit_info["timesteps"] == 0 and exit_info["attempt"] == 1
    assert "\n" not in exit_info["message"] and exit_info["message"] in lines[0]
    for word in words:
        assert word in exit_info["message"]
    # No training started: nothing but run.json, exit.json and the worker's (empty) lock file.
    assert {p.name for p in run_dir.iterdir()} <= {"run.json", "exit.json", ".worker.lock"}


def test_a_directory_without_run_json_is_left_as_it_is(tmp_path: Path) -> None:
    # Not a run directory (a typo'd path): one line, and no exit.json or lock file in it.
    result = run_worker(tmp_path, timeout_s=60)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "holds no run.json" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_an_invalid_run_json_leaves_a_finished_runs_exit_json(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    done = {"schema": 1, "reason": "done", "exit_code": 0, "message": "trained", "timesteps": 8,
            "attempt": 1}
    (run_dir / "exit.json").write_text(json.dumps(done))
    (run_dir / "run.json").write_text('{"schema": 1,')
    result = run_worker(run_dir, timeout_s=60)
    assert result.returncode == 2 and "invalid run.json" in result.stderr
    assert json.loads((run_dir / "exit.json").read_text()) == done


def test_missing_run_dir_is_one_error_line(tmp_path: Path) -> None:
    result = run_worker(tmp_path / "nowhere", timeout_s=60)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "does not exist" in result.stderr
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("deadline", ["tomorrow", "nan", "inf"])
def test_bad_deadline_is_refused_before_training(tmp_path: Path, deadline: str) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _write(TINY_SPEC.to_dict())(run_dir)
    result = run_worker(run_dir, env={"SATRL_DEADLINE": deadline}, timeout_s=60)
    assert result.returncode == 2
    assert "SATRL_DEADLINE" in json.loads((run_dir / "exit.json").read_text())["message"]
    assert not (run_dir / "checkpoints").exists()


def test_a_full_disk_is_one_line_naming_where(tmp_path: Path) -> None:
    """A full disk printed a 30-line traceback ending in a bare "OSError: [Errno 28]"."""
    import errno

    from agents.train import storage_problem

    full = OSError(errno.ENOSPC, "No space left on device")  # write() names no file
    assert storage_problem(full, tmp_path) == f"cannot write {tmp_path}: No space left on device"
    denied = PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "status.json"))
    assert storage_problem(denied, tmp_path) == \
        f"cannot write {tmp_path / 'status.json'}: Permission denied"
    assert storage_problem(OSError(errno.EIO, "I/O error"), tmp_path) is None
    assert storage_problem(ValueError("x"), tmp_path) is None


def test_device_cuda_without_a_gpu_is_one_line_not_a_silent_cpu_run(tmp_path: Path) -> None:
    """SB3 trained on the CPU in silence; `auto` is the setting that allows it."""
    from agents.rundir import write_run_json

    run_dir = tmp_path / "run"
    write_run_json(run_dir, TINY_SPEC.replace(device="cuda"))
    result = run_worker(run_dir, env={"CUDA_VISIBLE_DEVICES": ""}, timeout_s=120)
    assert result.returncode == 1, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "device cuda was asked for, but torch sees no CUDA device" \
        in lines[0], result.stderr
    exit_info = json.loads((run_dir / "exit.json").read_text())
    assert exit_info["reason"] == "failed" and "device cuda" in exit_info["message"]
    assert not (run_dir / "checkpoints").exists()
