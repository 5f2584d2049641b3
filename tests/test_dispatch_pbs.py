"""PBS dispatch and reconciliation through stand-in `qsub`/`qstat` on PATH that print the real
captured OpenPBS output (PBS cannot run here): ids recorded, one qstat call per poll, the rate
limit, states from qstat and exit.json, an unreadable record named, omissions lost only after
the grace period. On SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tests.dispatch_support import TINY, cli, cli_json, configure, show, states
from tests.test_schedulers_pbs import REFERENCE, _files


def _stand_ins(folder: Path) -> Path:
    """qsub prints the captured array id; qstat prints folder/reply.json; both log their argv."""
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    for name, body in (("qsub", f"cat {REFERENCE / 'qsub_array.stdout'}"),
                       ("qstat", f"cat {folder / 'reply.json'}")):
        script = bin_dir / name
        script.write_text(f'#!/bin/bash\necho "$*" >> {folder}/{name}.calls\n{body}\n')
        script.chmod(0o755)
    return bin_dir


@pytest.fixture
def pbs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The folder of the stand-in qsub/qstat, first on PATH; qstat prints its reply.json."""
    _files()
    folder = tmp_path / "pbs"
    folder.mkdir()
    monkeypatch.setenv("PATH", f"{_stand_ins(folder)}:{os.environ['PATH']}")
    return folder


def _calls(folder: Path, name: str) -> list[str]:
    path = folder / f"{name}.calls"
    return path.read_text().splitlines() if path.exists() else []


def test_pbs_dispatch_and_status_against_captured_openpbs_output(
        workspace: Path, pbs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = pbs
    configure(workspace, '[pbs]\npoll_interval_s = 3600\nqueue = "workq"\n',
              dispatch='backend = "pbs"\nlost_grace_s = 2')
    assert cli(capsys, "queue", "--games", "Pong,Breakout", "--attn", "NA,SWA", "--seed-list",
               "0", *TINY)[0] == 0
    code, out, err = cli(capsys, "dispatch", "--walltime-min", "30")
    assert code == 0 and "dispatched 4 run(s) to pbs as 2[0].pbshost .. 2[3].pbshost" in out, err
    (qsub,) = _calls(folder, "qsub")
    assert qsub.startswith("-N satrl-") and " -J 0-3 -l select=1:ncpus=1 -l walltime=00:30:00 " \
        "-q workq -r y -j oe -o " in qsub
    refs = ["Breakout/NA/0", "Breakout/SWA/0", "Pong/NA/0", "Pong/SWA/0"]  # array order
    assert [show(capsys, r)["jobs"][0]["job_id"] for r in refs] == \
        [f"2[{i}].pbshost" for i in range(4)]

    # Subjob 0 running, 1-3 queued: one qstat call, without ids, covers all four.
    (folder / "reply.json").write_text((REFERENCE / "array_qstat_t_running.json").read_text())
    assert [states(capsys)[r] for r in refs] == ["running", "submitted", "submitted",
                                                 "submitted"]
    assert _calls(folder, "qstat") == ["-f -F json -x -t"]
    states(capsys)  # within poll_interval_s: the scheduler is not asked again
    assert len(_calls(folder, "qstat")) == 1
    assert show(capsys, refs[0])["jobs"][0]["node"] == "pbshost"

    # A record PBS printed broken is named, and its run is left alone (not lost).
    text = (REFERENCE / "array_qstat_t_running.json").read_text()
    (folder / "reply.json").write_text(text.replace(
        '"Job_Name":\t"arr",\n\t\t\t"Job_Owner":\t"pbsuser@pbshost",\n\t\t\t"job_state":\t"Q"',
        '"Job_Name":\t"a"r"r",\n\t\t\t"Job_Owner":\t"pbsuser@pbshost",\n\t\t\t"job_state":\t"Q"',
        1))
    code, out, err = cli(capsys, "sync", "--force")
    assert code == 0 and "could not read the scheduler's record of job 2[1].pbshost" in err
    assert len(_calls(folder, "qstat")) == 2

    # Finished: subjob 0's worker wrote exit.json done; 1-3 exited 1-3 without one.
    run_dir = Path(show(capsys, refs[0])["run_dir"])
    (run_dir / "exit.json").write_text(json.dumps({
        "schema": 1, "exit_code": 0, "reason": "done", "message": "trained 256 of 256 steps",
        "timesteps": 256, "attempt": 1, "ended_at": time.time()}))
    (folder / "reply.json").write_text(
        (REFERENCE / "array_qstat_t_x_finished.json").read_text())
    result = cli_json(capsys, "sync", "--force")
    assert result["polled"] == {"pbs": True}
    assert {t["key"]: (t["to_state"], t["reason"]) for t in result["transitions"]} == {
        refs[0]: ("succeeded", "done"), refs[1]: ("failed", "failed"),
        refs[2]: ("failed", "failed"), refs[3]: ("failed", "failed")}
    assert [show(capsys, r)["jobs"][0]["exit_status"] for r in refs] == [0, 1, 2, 3]

    # Requeued and dispatched again, then the server forgets the jobs: lost only after the grace.
    code, out, err = cli(capsys, "requeue", "--failed", "--dry-run")
    assert code == 0 and "would requeue 3 run(s)" in out
    (folder / "reply.json").write_text('{"timestamp": 1, "Jobs": {}}')
    # What dispatch would refuse is refused before requeue moves a run.
    configure(workspace, '[pbs]\npoll_interval_s = 3600\nqueue = "workq"\ncpus = 0\n',
              dispatch='backend = "pbs"\nlost_grace_s = 2')
    code, out, err = cli(capsys, "requeue", "--failed")
    assert code == 2 and "satrl.toml [pbs]: cpus must be >= 1, not 0" in err
    assert [states(capsys)[r] for r in refs[1:]] == ["failed"] * 3
    assert len(_calls(folder, "qsub")) == 1
    configure(workspace, '[pbs]\npoll_interval_s = 3600\nqueue = "workq"\n',
              dispatch='backend = "pbs"\nlost_grace_s = 2')
    code, out, err = cli(capsys, "requeue", "--failed")
    assert code == 0 and "requeued 3 run(s); dispatched 3" in out, err
    # Resubmitted with the walltime dispatch was given on the command line, not the default.
    assert len(_calls(folder, "qsub")) == 2
    assert " -l walltime=00:30:00 " in _calls(folder, "qsub")[1]
    first = cli_json(capsys, "sync", "--force")
    assert first["transitions"] == []  # omitted once: not lost at once
    time.sleep(2.5)
    later = cli_json(capsys, "sync", "--force")
    assert sorted(t["key"] for t in later["transitions"]) == sorted(refs[1:])
    assert {t["to_state"] for t in later["transitions"]} == {"lost"}
    assert show(capsys, refs[1])["attempts"] == 2

    # requeue's own resource flags change the last dispatch's: a bad one refuses, dry run
    # included, with nothing moved; a good one goes into qsub and into the next requeue.
    for dry in ((), ("--dry-run",)):
        code, out, err = cli(capsys, "requeue", "--lost", "--walltime-min", "-5", *dry)
        assert code == 2 and "the command line: walltime_min must be >= 0, not -5.0" in err
    assert [states(capsys)[r] for r in refs[1:]] == ["lost"] * 3
    code, out, err = cli(capsys, "requeue", "--lost", "--walltime-min", "90", "--mem-gb", "4",
                         "--dry-run")
    assert code == 0 and "would requeue 3 run(s)" in out
    assert f"  3 on pbs with cpus 1, gpus 0, mem 4 GB, walltime 01:30:00, queue workq: " \
        f"{', '.join(refs[1:])}" in out, out
    code, out, err = cli(capsys, "requeue", "--lost", "--walltime-min", "90", "--mem-gb", "4")
    assert code == 0 and "requeued 3 run(s); dispatched 3" in out, err
    third = _calls(folder, "qsub")[2]
    assert " -l select=1:ncpus=1:mem=4gb -l walltime=01:30:00 -q workq " in third, third
    cli_json(capsys, "sync", "--force")
    time.sleep(2.5)
    assert len(cli_json(capsys, "sync", "--force")["transitions"]) == 3  # lost again
    assert cli(capsys, "requeue", "--lost")[0] == 0
    assert " -l select=1:ncpus=1:mem=4gb -l walltime=01:30:00 -q workq " in \
        _calls(folder, "qsub")[3]


def test_a_job_settled_by_its_exit_json_while_pbs_lists_it_running_is_not_left_running(
        workspace: Path, pbs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Against captured OpenPBS output: the run is never polled again once settled, so the
    job's scheduler_state must not stay 'R' (show listed a succeeded run's job as running)."""
    folder = pbs
    configure(workspace, '[pbs]\npoll_interval_s = 3600\n', dispatch='backend = "pbs"')
    assert cli(capsys, "queue", "--games", "Pong,Breakout", "--attn", "NA,SWA", "--seed-list",
               "0", *TINY)[0] == 0
    assert cli(capsys, "dispatch", "--walltime-min", "30")[0] == 0
    (folder / "reply.json").write_text((REFERENCE / "array_qstat_t_running.json").read_text())
    run_dir = Path(show(capsys, "Breakout/NA/0")["run_dir"])  # subjob 0: listed R
    (run_dir / "exit.json").write_text(json.dumps({
        "schema": 1, "exit_code": 0, "reason": "done", "message": "trained 256 of 256 steps",
        "timesteps": 256, "attempt": 1, "ended_at": time.time()}))
    result = cli_json(capsys, "sync", "--force")
    assert [(t["key"], t["to_state"]) for t in result["transitions"]] == [
        ("Breakout/NA/0", "succeeded")]
    assert show(capsys, "Breakout/NA/0")["jobs"][0]["state"] == "ended"
    assert show(capsys, "Pong/NA/0")["jobs"][0]["state"] == "Q"  # still polled, as PBS says


def _queued_untouched(capsys: pytest.CaptureFixture[str], folder: Path) -> None:
    """Nothing was claimed, written or submitted."""
    assert set(states(capsys).values()) == {"queued"}
    assert _calls(folder, "qsub") == []
    assert not (Path(show(capsys, "Pong/NA/0").get("run_dir") or "/nonexistent")).exists()


def test_dispatch_refuses_a_walltime_within_the_workers_deadline_margin(
        workspace: Path, pbs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = pbs
    configure(workspace, "", dispatch='backend = "pbs"')
    # The paper's margin (the smoke preset has 30 s).
    assert cli(capsys, "queue", "--games", "Pong,Breakout", "--attn", "NA", "--seed-list", "0",
               *TINY, "--set", "deadline_margin_s=300")[0] == 0
    for walltime_min, dry_run in (("4", False), ("5", False), ("4", True)):
        code, out, err = cli(capsys, "dispatch", "--walltime-min", walltime_min,
                             *(["--dry-run"] if dry_run else []))
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert f"walltime_min {walltime_min} ({int(walltime_min) * 60} s) must exceed the " \
            "worker's deadline margin of 300 s (deadline_margin_s of run Breakout/NA/0)" in err
        _queued_untouched(capsys, folder)
    code, out, err = cli(capsys, "dispatch", "--walltime-min", "5.5")
    assert code == 0 and "dispatched 2 run(s) to pbs" in out, err
    assert len(_calls(folder, "qsub")) == 1


@pytest.mark.parametrize("separator", [":", ","])
def test_dispatch_in_an_image_refuses_a_scratch_path_apptainer_would_split(
        workspace: Path, tmp_path: Path, pbs: Path, capsys: pytest.CaptureFixture[str],
        separator: str) -> None:
    folder = pbs
    scratch = tmp_path / f"scratch{separator}2024"
    sif = tmp_path / "satrl.sif"  # an image file that exists: only the scratch path is wrong
    sif.write_bytes(b"SIF")
    image = f'[image]\npath = "{sif}"\nflavor = "cuda"\n'
    configure(workspace, f'[paths]\nscratch = "{scratch}"\n{image}', dispatch='backend = "pbs"')
    assert cli(capsys, "queue", "--games", "Pong,Breakout", "--attn", "NA", "--seed-list", "0",
               *TINY)[0] == 0
    for dry_run in (True, False):
        code, out, err = cli(capsys, "dispatch", "--walltime-min", "30",
                             *(["--dry-run"] if dry_run else []))
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert f"the scratch path {scratch} contains {separator!r}, on which apptainer splits " \
            "--bind" in err
        _queued_untouched(capsys, folder)
    assert not scratch.exists()
    # Without an image nothing is bound: the same scratch path is fine.
    configure(workspace, f'[paths]\nscratch = "{scratch}"\n', dispatch='backend = "pbs"')
    code, out, err = cli(capsys, "dispatch", "--walltime-min", "30")
    assert code == 0 and "dispatched 2 run(s) to pbs" in out, err


def test_a_qstat_that_prints_garbage_is_a_warning_and_sync_fails_not_a_rate_limit(
        workspace: Path, pbs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Against captured OpenPBS output (qsub), with qstat printing garbage: sync said
    "no changes (pbs not asked (rate limit))" and exited 0."""
    folder = pbs
    configure(workspace, '[pbs]\npoll_interval_s = 3600\n', dispatch='backend = "pbs"')
    assert cli(capsys, "queue", "--games", "Pong,Breakout", "--attn", "NA", "--seed-list",
               "0", *TINY)[0] == 0
    assert cli(capsys, "dispatch", "--walltime-min", "30")[0] == 0
    (folder / "reply.json").write_text("<html>Service Unavailable</html>\n")
    code, out, err = cli(capsys, "sync", "--force")
    assert code == 1 and "no changes (pbs could not be asked)" in out, (out, err)
    assert "rate limit" not in out
    assert err.startswith("warning: pbs: ") and err.strip().splitlines()[-1] == (
        "satrl: could not ask pbs (see the warning); only the run directories were read")
    code, out, _ = cli(capsys, "sync", "--force", "--json")
    result = json.loads(out)
    assert code == 1
    assert result["polled"] == {"pbs": False} and result["poll_failed"] == ["pbs"]
    assert set(states(capsys).values()) == {"submitted"}  # nothing lost for it
