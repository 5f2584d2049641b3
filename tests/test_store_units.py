"""The store's pure parts: path safety, listings, options, and the file readers' checks."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest

from orchestrator.errors import UsageError
from orchestrator.store.ingest import (
    ContentError,
    read_evaluations,
    read_metrics_csv,
    read_monitor,
    read_provenance,
)
from orchestrator.store.layout import (
    CheckpointChoice,
    kind_of,
    parse_what,
    path_problem,
    store_relpath,
)
from orchestrator.store.manifest import RunDirError, parse_manifest
from orchestrator.store.sources import LocalSource, parse_list_only
from tests.fetch_support import fifo_rescue

SHA = "0" * 64


@pytest.mark.parametrize("path", ["../x", "a/../../x", "/etc/passwd", "a//b", "./a", "a/.",
                                  "a\\..\\b", "a\nb", "", 5, None])
def test_hostile_or_odd_paths_are_refused(path: object) -> None:
    assert path_problem(path) is not None


@pytest.mark.parametrize("path", ["run.json", "checkpoints/model_checkpoint_5_steps.zip",
                                  "tb/PPO_0/events.out.tfevents.1.host", "a..b/c"])
def test_plain_paths_inside_the_run_are_accepted(path: str) -> None:
    assert path_problem(path) is None


def test_store_names_follow_the_paper() -> None:
    assert store_relpath("checkpoints/model_checkpoint_3000000_steps.zip", "checkpoint", "Pong",
                         "CWCA", 42) == \
        "checkpoints/Pong_CWCA_42_model_checkpoint_3000000_steps.zip"
    assert store_relpath("monitor/train_0.monitor.csv", "monitor", "Pong", "NA", 0) == \
        "metrics/monitor/train_0.monitor.csv"


def test_options_parse_and_refuse_typos() -> None:
    assert "checkpoint" not in parse_what("metrics") and "run_json" in parse_what("metrics")
    assert {"checkpoint", "observation", "evaluations"} <= parse_what("all")
    with pytest.raises(UsageError):
        parse_what("metric")
    assert CheckpointChoice.parse(None, "last").select([5, 1, 3]) == {5}
    assert CheckpointChoice.parse("1e3, 3", "all").select([3, 1000, 7]) == {3, 1000}
    assert CheckpointChoice.parse("all", "last").select([]) == set()
    with pytest.raises(UsageError):
        CheckpointChoice.parse("newest", "all")


def test_rsync_listing_is_parsed_without_following_links() -> None:
    listing = parse_list_only(
        "drwxr-xr-x           4096 2025/01/01 10:00:00 .\n"
        "lrwxrwxrwx             11 2025/01/01 10:00:00 observations\n"
        "-rw-r--r--        1234567 2025/01/01 10:00:00 checkpoints/model_checkpoint_5_steps.zip\n"
        "-rw-r--r--             12 2025/01/01 10:00:00 with space.txt\n"
        "srwxr-xr-x              0 2025/01/01 10:00:00 sock\n")
    assert listing["observations"].type == "link"
    assert listing["checkpoints/model_checkpoint_5_steps.zip"].size_bytes == 1234567
    assert listing["with space.txt"].type == "file" and listing["sock"].type == "other"
    assert "." not in listing


def test_local_listing_reports_links_and_copy_never_follows_them(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    (run_dir / "sub").mkdir(parents=True)
    (run_dir / "sub" / "a.txt").write_text("a")
    (run_dir / "link.txt").symlink_to("/etc/passwd")
    (run_dir / "dirlink").symlink_to("/etc", target_is_directory=True)
    source = LocalSource()
    listing = source.listing(str(run_dir))
    assert listing is not None
    assert {k: v.type for k, v in listing.items()} == {
        "sub": "dir", "sub/a.txt": "file", "link.txt": "link", "dirlink": "link"}
    dest = tmp_path / "dest"
    source.copy(str(run_dir), ["sub/a.txt", "link.txt", "dirlink/passwd", "nope"], dest)
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == \
        ["sub/a.txt"]
    assert source.listing(str(tmp_path / "absent")) is None


def _npz(path: Path, **arrays: np.ndarray) -> Path:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    path.write_bytes(buffer.getvalue())
    return path


def test_evaluations_reader_checks_shapes_and_never_unpickles(tmp_path: Path) -> None:
    good = _npz(tmp_path / "g.npz", timesteps=np.array([1, 2]), results=np.ones((2, 3)),
                ep_lengths=np.ones((2, 3), dtype=np.int64))
    data = read_evaluations(good)
    assert data.rows(7)[4] == {"run_id": 7, "timestep": 2, "episode": 1, "score": 1.0,
                               "length": 1, "n_episodes": 1}
    bad = [
        dict(timesteps=np.array([1, 2]), results=np.ones((3, 3)), ep_lengths=np.ones((3, 3))),
        dict(timesteps=np.array([1]), results=np.ones((1, 3)), ep_lengths=np.ones((1, 2))),
        dict(timesteps=np.array([1]), results=np.array([[np.nan]]), ep_lengths=np.ones((1, 1))),
        dict(timesteps=np.array([1], dtype=object), results=np.ones((1, 1)),
             ep_lengths=np.ones((1, 1))),
        dict(timesteps=np.array([1])),
    ]
    for i, arrays in enumerate(bad):
        with pytest.raises(ContentError):
            read_evaluations(_npz(tmp_path / f"b{i}.npz", **arrays))
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(ContentError):
        read_evaluations(tmp_path / "junk.npz")


def test_metrics_and_monitor_readers(tmp_path: Path) -> None:
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text("timesteps,loss,approx_kl\n256,,0.01\n512,0.5,nan\n")
    assert read_metrics_csv(csv_path) == [(256, "approx_kl", 0.01), (512, "loss", 0.5)]
    csv_path.write_text("timesteps,loss\n256,0.1,9\n")
    with pytest.raises(ContentError):
        read_metrics_csv(csv_path)
    csv_path.write_text("timesteps,loss\ninf,0.1\n")  # int(float("inf")) overflows
    with pytest.raises(ContentError):
        read_metrics_csv(csv_path)
    monitor = tmp_path / "train_0.monitor.csv"
    monitor.write_text('#{"t_start": 1}\nr,l,t\n-21,4000,1.0\n-20,2000,2.0\nr,l,t\n3,400,3\n')
    # frames / frame_skip x n_envs: 4000/4*8 = 8000, 6000/4*8 = 12000, 6400/4*8 = 12800.
    assert read_monitor(monitor, n_envs=8, frame_skip=4) == [
        (8000, "episode_score", -21.0), (8000, "episode_frames", 4000.0),
        (12000, "episode_score", -20.0), (12000, "episode_frames", 2000.0),
        (12800, "episode_score", 3.0), (12800, "episode_frames", 400.0)]
    # After a resume mark, frames count from the mark's step (12,000 + 400/4*8).
    monitor.write_text('#{"t_start": 1}\nr,l,t\n-21,4000,1.0\n#{"resumed_from_step": 12000}\n'
                       '3,400,3\n')
    assert read_monitor(monitor, n_envs=8, frame_skip=4) == [
        (8000, "episode_score", -21.0), (8000, "episode_frames", 4000.0),
        (12800, "episode_score", 3.0), (12800, "episode_frames", 400.0)]
    monitor.write_text('#{"t_start": 1}\nr,l,t\n-21,inf,1.0\n')
    with pytest.raises(ContentError):
        read_monitor(monitor, n_envs=8, frame_skip=4)
    provenance = tmp_path / "provenance.json"
    provenance.write_text(json.dumps({"attempts": [{"attempt": "1"}]}))
    with pytest.raises(ContentError):
        read_provenance(provenance)


@pytest.mark.parametrize("doc", [
    b"not json", b"[]", b'{"schema": 1}', b'{"schema": 2, "files": []}',
    b'{"schema": 1, "files": [{"path": "a", "kind": "metrics", "size": -1, "sha256": "x"}]}',
    b'{"schema": 1, "files": [{"path": "a", "kind": "metrics", "size": 1, "sha256": "ABC"}]}',
    b'{"schema": 1, "final": "yes", "files": []}',
])
def test_malformed_manifests_are_refused_whole(doc: bytes) -> None:
    with pytest.raises(RunDirError):
        parse_manifest(doc, "run")


def test_a_hostile_entry_is_kept_flagged_not_refused_whole() -> None:
    manifest = parse_manifest(json.dumps({"schema": 1, "final": True, "files": [
        {"path": "../../etc/passwd", "kind": "metrics", "size": 1, "sha256": SHA, "step": None},
        {"path": "metrics.csv", "kind": "metrics", "size": 1, "sha256": SHA, "step": None},
    ]}).encode(), "run")
    assert [e.problem is None for e in manifest.entries] == [False, True]


@pytest.mark.parametrize("path", ["checkpoints/.nfs000000000123abcd00000001",
                                  "checkpoints/README.txt", "observations/notes.txt",
                                  "checkpoints/model_checkpoint_x_steps.zip"])
def test_a_name_that_is_no_checkpoint_or_dump_has_no_kind(path: str) -> None:
    # Whatever the worker's rundir says: an older worker's manifest lists such files.
    assert kind_of(path) is None
    assert kind_of("checkpoints/model_checkpoint_512_steps.zip") == "checkpoint"
    assert kind_of("observations/obs_512_1.npy") == "observation"


@pytest.mark.parametrize("cell", ["1e30", "-256", "2.5", "nan", "1e12 1", "1000000000001"])
def test_metrics_timesteps_out_of_range_fail_the_content_check(tmp_path: Path,
                                                               cell: str) -> None:
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text(f"timesteps,loss\n256,0.1\n{cell},0.2\n")
    with pytest.raises(ContentError, match="metrics.csv line 3"):
        read_metrics_csv(csv_path)
    csv_path.write_text("timesteps,loss\n1e3,0.1\n2048.0,0.2\n1000000000000,0.3\n")
    assert [t for t, _, _ in read_metrics_csv(csv_path)] == [1000, 2048, 10**12]


def test_metric_names_the_registry_cannot_hold_fail_the_content_check(tmp_path: Path) -> None:
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text(f"timesteps,{'x' * 65}\n256,0.1\n")
    with pytest.raises(ContentError, match="column name"):
        read_metrics_csv(csv_path)
    csv_path.write_text("timesteps,,loss\n256,1,0.1\n")
    with pytest.raises(ContentError, match="column name"):
        read_metrics_csv(csv_path)


@pytest.mark.parametrize("row", ["-21,1e30,1.0", "-21,-4,1.0", "-21,4.5,1.0", "nan,400,1.0",
                                 "inf,400,1.0", "-21,999999999999,1.0\n-20,999999999999,2.0"])
def test_monitor_lengths_and_rewards_out_of_range_fail_the_content_check(
        tmp_path: Path, row: str) -> None:
    monitor = tmp_path / "train_0.monitor.csv"
    monitor.write_text(f'#{{"t_start": 1}}\nr,l,t\n{row}\n')
    with pytest.raises(ContentError, match="train_0.monitor.csv row"):
        read_monitor(monitor, n_envs=8, frame_skip=4)


@pytest.mark.parametrize("arrays", [
    dict(timesteps=np.array([512, 10**13]), results=np.ones((2, 1)),
         ep_lengths=np.ones((2, 1), dtype=np.int64)),
    dict(timesteps=np.array([2**64 - 1], dtype=np.uint64), results=np.ones((1, 1)),
         ep_lengths=np.ones((1, 1), dtype=np.int64)),
    dict(timesteps=np.array([-512]), results=np.ones((1, 1)),
         ep_lengths=np.ones((1, 1), dtype=np.int64)),
    dict(timesteps=np.array([512]), results=np.ones((1, 2)),
         ep_lengths=np.array([[100, -1]])),
    dict(timesteps=np.array([512]), results=np.ones((1, 1)),
         ep_lengths=np.array([[2**31]])),
    dict(timesteps=np.array([512]), results=np.array([[1 + 2j]]),
         ep_lengths=np.ones((1, 1), dtype=np.int64)),
], ids=["timestep_1e13", "timestep_uint64_max", "timestep_negative", "length_negative",
        "length_over_int32", "complex_score"])
def test_evaluations_out_of_range_fail_the_content_check(tmp_path: Path,
                                                          arrays: dict) -> None:
    with pytest.raises(ContentError, match="evaluations.npz"):
        read_evaluations(_npz(tmp_path / "e.npz", **arrays))


def test_local_copy_of_a_fifo_does_not_block_and_leaves_it_absent(tmp_path: Path) -> None:
    # A file swapped for a FIFO between the listing and the copy: opening it to read would wait
    # for a writer forever. fifo_rescue turns such a hang into a failure.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.csv").write_text("timesteps\n")
    os.mkfifo(run_dir / "evaluations.npz")
    dest = tmp_path / "dest"
    with fifo_rescue(run_dir / "evaluations.npz", after_s=5) as rescued:
        LocalSource().copy(str(run_dir), ["evaluations.npz", "metrics.csv"], dest)
    assert not rescued, "LocalSource.copy blocked opening a FIFO"
    assert sorted(p.name for p in dest.iterdir()) == ["metrics.csv"]
