"""Run-directory helpers (agents/rundir.py) without training."""

from __future__ import annotations

import os
from pathlib import Path

from agents.rundir import (
    ManifestBuilder,
    checkpoint_path,
    keep_monitor_episodes,
    monitor_step,
    resume_mark,
    trim_monitor,
    verify_manifest,
    write_bytes,
)


def test_a_rewritten_checkpoint_of_equal_size_and_mtime_is_hashed_again(tmp_path: Path) -> None:
    # The worker saves the final checkpoint again at a step the schedule already saved; on a
    # filesystem with one-second mtimes both files can share size and mtime.
    path = checkpoint_path(tmp_path, 2048)
    path.parent.mkdir(parents=True)
    write_bytes(path, b"A" * 4096)
    os.utime(path, ns=(1_700_000_000 * 10**9, 1_700_000_000 * 10**9))
    builder = ManifestBuilder(tmp_path)
    builder.write(final=False)
    write_bytes(path, b"B" * 4096)  # new weights, same size, replaced atomically
    os.utime(path, ns=(1_700_000_000 * 10**9, 1_700_000_000 * 10**9))
    builder.write(final=True)
    assert verify_manifest(tmp_path) == []


def test_atomic_writes_get_the_mode_a_plain_open_would(tmp_path: Path) -> None:
    previous = os.umask(0o027)
    try:
        target = tmp_path / "report.html"
        write_bytes(target, b"<html></html>")
        plain = tmp_path / "plain.html"
        plain.write_bytes(b"<html></html>")
    finally:
        os.umask(previous)
    assert target.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777 == 0o640
    assert target.read_bytes() == b"<html></html>"


def test_the_manifest_leaves_symbolic_links_out(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    write_bytes(checkpoint_path(run_dir, 512), b"weights")
    outside = tmp_path / "elsewhere.zip"
    outside.write_bytes(b"not this run's")
    checkpoint_path(run_dir, 1024).symlink_to(outside)
    (run_dir / "metrics.csv").symlink_to(outside)
    paths = [entry["path"] for entry in ManifestBuilder(run_dir).entries()]
    assert paths == ["checkpoints/model_checkpoint_512_steps.zip"]


def test_the_manifest_lists_only_artefacts_under_checkpoints_and_observations(
        tmp_path: Path) -> None:
    # An NFS silly-rename leftover or a note beside the checkpoints is not a checkpoint: listed,
    # it would reach the fetch as one without a step.
    run_dir = tmp_path / "run"
    write_bytes(checkpoint_path(run_dir, 512), b"weights")
    (run_dir / "checkpoints" / ".nfs000000000123abcd00000001").write_bytes(b"x")
    (run_dir / "checkpoints" / "README.txt").write_text("notes")
    (run_dir / "observations").mkdir()
    (run_dir / "observations" / "obs_512_0.npy").write_bytes(b"x")
    (run_dir / "observations" / "obs_512_0.npy.bak").write_bytes(b"x")
    entries = ManifestBuilder(run_dir).entries()
    assert [(e["path"], e["kind"], e["step"]) for e in entries] == [
        ("checkpoints/model_checkpoint_512_steps.zip", "checkpoint", 512),
        ("observations/obs_512_0.npy", "observation", 512),
    ]


def test_trim_monitor_drops_the_episodes_after_the_resume_point(tmp_path: Path) -> None:
    # 2 envs, frame skip 4: an episode of 400 frames of one env ends near agent step 200.
    path = tmp_path / "train_0.monitor.csv"
    header = '#{"t_start": 1.0, "env_id": "PongNoFrameskip-v4"}\nr,l,t\n'
    episodes = ["1.0,400,1.0\n", "2.0,400,2.0\n", "r,l,t\n", "3.0,400,3.0\n", "4.0,4"]
    path.write_text(header + "".join(episodes))
    assert monitor_step(800, n_envs=2, frame_skip=4) == 400
    # Resuming from step 400: the episodes ending at 200 and 400 stay, the one at 600 goes (the
    # unterminated last line is not an episode yet, and goes too).
    assert trim_monitor(path, 400, n_envs=2, frame_skip=4) == 1
    assert path.read_text() == header + "1.0,400,1.0\n2.0,400,2.0\nr,l,t\n"
    assert trim_monitor(path, 400, n_envs=2, frame_skip=4) == 0  # idempotent
    # A line cut by a kill goes even when no episode does: the next Monitor appends after it.
    path.write_text(header + "1.0,400,1.0\n2.0,4")
    assert trim_monitor(path, 10_000, n_envs=2, frame_skip=4) == 0
    assert path.read_text() == header + "1.0,400,1.0\n"


def test_trim_monitor_counts_the_frames_since_the_last_resume_mark(tmp_path: Path) -> None:
    """A resumed attempt resets its envs: the episode each env was playing is never finished,
    so the frames of the lines above a resume mark do not date the episodes below it."""
    path = tmp_path / "train_0.monitor.csv"
    header = '#{"t_start": 1.0, "env_id": "BreakoutNoFrameskip-v4"}\nr,l,t\n'
    # 2 envs, frame skip 4. A: 800 frames, ends at step 400. Killed mid-episode, resumed from
    # 512. B: 600 frames, ends at 512 + 300 = 812; C: 520 frames, ends at 512 + 560 = 1072.
    kept = header + "1.0,800,1.0\n" + resume_mark(512) + "2.0,600,2.0\n"
    path.write_text(kept + "3.0,520,3.0\n")
    assert resume_mark(512) == '#{"resumed_from_step": 512}\n'
    # Resumed again from 1024: C goes (the frames alone, 1920 / 4 x 2 = 960, kept it).
    assert trim_monitor(path, 1024, n_envs=2, frame_skip=4) == 1
    assert path.read_text() == kept
    # Resumed from 400 instead (a newer checkpoint was damaged): B, C and the mark go.
    path.write_text(kept + "3.0,520,3.0\n")
    assert trim_monitor(path, 400, n_envs=2, frame_skip=4) == 2
    assert path.read_text() == header + "1.0,800,1.0\n"
    # A mark beyond the resume point goes even when no episode follows it.
    path.write_text(header + "1.0,800,1.0\n" + resume_mark(512))
    assert trim_monitor(path, 400, n_envs=2, frame_skip=4) == 0
    assert path.read_text() == header + "1.0,800,1.0\n"


def test_keep_monitor_episodes_keeps_the_first_episodes(tmp_path: Path) -> None:
    path = tmp_path / "eval.monitor.csv"
    header = '#{"t_start": 1.0, "env_id": "PongNoFrameskip-v4"}\nr,l,t\n'
    path.write_text(header + "-21,800,1\n-20,900,2\n-19,1000,3\n-18,9")
    assert keep_monitor_episodes(path, 2) == 1
    assert path.read_text() == header + "-21,800,1\n-20,900,2\n"
    assert keep_monitor_episodes(path, 2) == 0  # idempotent
    assert keep_monitor_episodes(path, 5) == 0
    assert keep_monitor_episodes(tmp_path / "absent.monitor.csv", 0) == 0
