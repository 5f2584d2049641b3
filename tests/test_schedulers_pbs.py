"""PBS Pro: the qstat parser and state mapping against real OpenPBS output (every file of
/work/shared/reference/pbs and corrupt variants of them), qsub output, exact qsub command lines
and job scripts. PBS itself cannot run here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.errors import SchedulerError, UsageError
from orchestrator.lifecycle import FileView, SchedulerView, decide
from orchestrator.registry.models import Reason, RunState
from orchestrator.resources import Resources
from orchestrator.schedulers.base import Batch, BatchMember, JobState
from orchestrator.schedulers.pbs import PbsScheduler, job_state, parse_qsub_output
from orchestrator.schedulers.qstat import parse_qstat_json, strip_leading_zeros

REFERENCE = Path(os.environ.get("SATRL_PBS_REFERENCE", "/work/shared/reference/pbs"))
if not REFERENCE.is_dir():  # a checkout beside ../shared
    REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "pbs"

#: file -> {job id: (job_state, satrl state, Exit_status)}: what the README says happened.
EXPECTED = {
    "t1_qstat_queued.json": {"1.pbshost": ("Q", JobState.PENDING, None)},
    "t1_qstat_running.json": {"0.pbshost": ("R", JobState.RUNNING, None)},
    "t1_qstat_x_finished.json": {"0.pbshost": ("F", JobState.COMPLETED, 0)},
    "array_qstat_t_running.json": {
        "2[].pbshost": ("B", JobState.RUNNING, None),
        "2[0].pbshost": ("R", JobState.RUNNING, None),
        "2[1].pbshost": ("Q", JobState.PENDING, None),
        "2[2].pbshost": ("Q", JobState.PENDING, None),
        "2[3].pbshost": ("Q", JobState.PENDING, None)},
    "array_qstat_t_x_finished.json": {
        "2[].pbshost": ("F", JobState.FAILED, 1), "2[0].pbshost": ("F", JobState.COMPLETED, 0),
        "2[1].pbshost": ("F", JobState.FAILED, 1), "2[2].pbshost": ("F", JobState.FAILED, 2),
        "2[3].pbshost": ("F", JobState.FAILED, 3)},
    "del_qstat_x_finished.json": {"3.pbshost": ("F", JobState.CANCELLED, 271)},
    "wall_qstat_x_finished.json": {"4.pbshost": ("F", JobState.TIMEOUT, -29)},
}

BASH_FUNC = ('\t\t\t\t"BASH_FUNC_module%%":\t"() {  eval "$(/usr/bin/modulecmd bash $*)"\n'
             '}",\n\t\t\t\t"PS1":\t"\\u@\\h:"\\w" $ ",\n')


def _files() -> list[Path]:
    if not REFERENCE.is_dir():
        message = f"the captured OpenPBS output is missing: {REFERENCE}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return sorted(REFERENCE.glob("*.json"))


def _mapped(text: str) -> dict[str, tuple[str, JobState, int | None]]:
    document = parse_qstat_json(text)
    return {job_id: (status.raw_state, status.state, status.exit_status)
            for job_id, status in (
                (k, job_state(k, v)) for k, v in document.jobs.items())}


def test_every_captured_file_is_covered() -> None:
    assert {p.name for p in _files()} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_qstat_parser_and_states_against_captured_openpbs_output(name: str) -> None:
    _files()
    assert _mapped((REFERENCE / name).read_text()) == EXPECTED[name]


def _corrupt_env(text: str) -> str:
    """Raw newlines and unescaped quotes in a BASH_FUNC value, as `qsub -V` leaves them."""
    marker = '"PBS_O_HOME":'
    corrupted = "".join(part if i == 0 else BASH_FUNC + "\t\t\t\t" + marker + part
                        for i, part in enumerate(text.split("\t\t\t\t" + marker)))
    with pytest.raises(ValueError):
        json.loads(corrupted, strict=False)
    return corrupted


def _leading_zeros(text: str) -> str:
    corrupted = (text.replace('"Priority":\t0', '"Priority":\t000')
                 .replace('"run_count":\t1', '"run_count":\t01')
                 .replace('"Exit_status":\t-29', '"Exit_status":\t-029')
                 .replace('"Exit_status":\t271', '"Exit_status":\t0271'))
    assert corrupted != text
    with pytest.raises(ValueError):
        json.loads(corrupted)
    return corrupted


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_qstat_parser_survives_unescaped_env_of_captured_openpbs_output(name: str) -> None:
    _files()
    text = _corrupt_env((REFERENCE / name).read_text())
    document = parse_qstat_json(text)
    assert not document.unreadable
    assert _mapped(text) == EXPECTED[name]
    assert document.timestamp == json.loads((REFERENCE / name).read_text())["timestamp"]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_qstat_parser_survives_leading_zeros_in_captured_openpbs_output(name: str) -> None:
    _files()
    text = _leading_zeros((REFERENCE / name).read_text())
    assert _mapped(text) == EXPECTED[name]
    both = _corrupt_env(text)
    assert _mapped(both) == EXPECTED[name]


def test_qstat_parser_names_the_job_it_cannot_read_in_captured_openpbs_output() -> None:
    _files()
    text = (REFERENCE / "array_qstat_t_running.json").read_text()
    # An unescaped quote in an attribute outside Variable_List: no repair can save this job.
    broken = text.replace('"comment":\t"Job run at Thu Nov 26 at 06:05 on (pbshost:ncpus=1)"',
                          '"comment":\t"Job run at "Thu" Nov 26"')
    assert broken != text
    document = parse_qstat_json(broken)
    assert set(document.unreadable) == {"2[0].pbshost"}
    assert "invalid JSON" in document.unreadable["2[0].pbshost"]
    assert set(document.jobs) == {"2[].pbshost", "2[1].pbshost", "2[2].pbshost", "2[3].pbshost"}
    cut = text[: text.index('"2[2].pbshost"') + 200]  # cut short mid-job
    short = parse_qstat_json(cut)
    assert "2[2].pbshost" in short.unreadable and "2[0].pbshost" in short.jobs
    with pytest.raises(SchedulerError, match="neither JSON"):
        parse_qstat_json("qstat: cannot connect to server pbshost (errno=15010)")
    assert parse_qstat_json("").jobs == {}


def test_strip_leading_zeros_touches_only_integer_parts_outside_strings() -> None:
    text = '{"a": 007, "b": -029, "c": 1.05, "d": "00:01:00", "e": [00, 1.5e+15], "f": "x\\"07"}'
    assert json.loads(strip_leading_zeros(text)) == {
        "a": 7, "b": -29, "c": 1.05, "d": "00:01:00", "e": [0, 1.5e15], "f": 'x"07'}


def test_pbs_delete_and_walltime_with_worker_signal_against_captured_openpbs_output() -> None:
    """A qdel (271, 'terminated by') is cancelled and a -29 is a walltime kill, even where the
    worker's exit.json only says signal."""
    _files()
    signal_exit = FileView(exit_reason="signal", exit_code=143, exit_at=time.time())
    for name, job_id, state, reason in (
            ("del_qstat_x_finished.json", "3.pbshost", RunState.CANCELLED, Reason.CANCELLED),
            ("wall_qstat_x_finished.json", "4.pbshost", RunState.FAILED, Reason.WALLTIME)):
        job = parse_qstat_json((REFERENCE / name).read_text()).jobs[job_id]
        status = job_state(job_id, job)
        view = SchedulerView(True, status.state, status.exit_status, status.detail)
        for files in (signal_exit, FileView()):
            decision = decide(RunState.RUNNING, files, view, now=time.time(), since=time.time(),
                              grace_s=600)
            assert (decision.state, decision.reason) == (state, reason)
    # A 271 without a deletion record is some other SIGTERM: failed, reason signal.
    job = json.loads((REFERENCE / "del_qstat_x_finished.json").read_text())["Jobs"]["3.pbshost"]
    job["comment"] = "Job run at Thu Nov 26 at 06:05 on (pbshost:ncpus=1) and failed"
    status = job_state("3.pbshost", job)
    assert status.state == JobState.FAILED
    decision = decide(RunState.RUNNING, signal_exit, SchedulerView(True, status.state, 271),
                      now=time.time(), since=time.time(), grace_s=600)
    assert decision.reason == Reason.SIGNAL


@pytest.mark.parametrize(("name", "members", "ids"), [
    ("qsub_t1.stdout", 1, ("0.pbshost",)),
    ("qsub_t1b.stdout", 1, ("1.pbshost",)),
    ("qsub_del.stdout", 1, ("3.pbshost",)),
    ("qsub_wall.stdout", 1, ("4.pbshost",)),
    ("qsub_array.stdout", 4, ("2[0].pbshost", "2[1].pbshost", "2[2].pbshost", "2[3].pbshost")),
])
def test_qsub_output_against_captured_openpbs_output(name: str, members: int,
                                                     ids: tuple[str, ...]) -> None:
    _files()
    submission = parse_qsub_output((REFERENCE / name).read_text(), members)
    assert submission.job_ids == ids
    assert submission.array_job_id == ("2[].pbshost" if members > 1 else None)
    with pytest.raises(SchedulerError):
        parse_qsub_output((REFERENCE / name).read_text(), 7 if members == 1 else 1)
    with pytest.raises(SchedulerError, match="not a job id"):
        parse_qsub_output("qsub: Unknown queue\n", members)


def _batch(tmp_path: Path, n: int, resources: Resources, digest: str | None = None) -> Batch:
    members = tuple(BatchMember(i + 1, tmp_path / "runs" / "main" / "Pong" / "NA" / f"it's {i}")
                    for i in range(n))
    return Batch("satrl-0123456789", members, resources, tmp_path / "batches" / "satrl-01",
                 ("/opt/venv/bin/python", "-m", "agents.train"), digest, 300)


def test_qsub_command_line_array_with_gpus_queue_account(tmp_path: Path) -> None:
    scheduler = PbsScheduler({"gpu_resource": "gpus"})
    batch = _batch(tmp_path, 4, Resources(cpus=16, gpus=1, mem_gb=64, walltime_min=720,
                                          queue="gpuq", account="ab12"))
    assert scheduler.submit_command(batch) == [
        "qsub", "-N", "satrl-0123456789", "-J", "0-3",
        "-l", "select=1:ncpus=16:gpus=1:mem=64gb", "-l", "walltime=12:00:00",
        "-q", "gpuq", "-A", "ab12", "-r", "y", "-j", "oe",
        "-o", f"{tmp_path}/batches/satrl-01/", f"{tmp_path}/batches/satrl-01/job.sh"]


def test_qsub_command_line_single_job_is_plain_with_default_gpu_name(tmp_path: Path) -> None:
    scheduler = PbsScheduler({"max_running": 5})
    batch = _batch(tmp_path, 1, Resources(cpus=4, gpus=2, mem_gb=7.5, walltime_min=90.5))
    assert scheduler.submit_command(batch) == [
        "qsub", "-N", "satrl-0123456789",
        "-l", "select=1:ncpus=4:ngpus=2:mem=7680mb", "-l", "walltime=01:30:30",
        "-r", "y", "-j", "oe", "-o", f"{tmp_path}/batches/satrl-01/",
        f"{tmp_path}/batches/satrl-01/job.sh"]
    array = _batch(tmp_path, 3, Resources(cpus=1, walltime_min=1))
    command = scheduler.submit_command(array)
    assert command[3:5] == ["-J", "0-2%5"]
    assert command[5:9] == ["-l", "select=1:ncpus=1", "-l", "walltime=00:01:00"]


def test_pbs_job_script_maps_the_array_index_and_quotes_paths(tmp_path: Path) -> None:
    scheduler = PbsScheduler()
    batch = _batch(tmp_path, 3, Resources(walltime_min=2), digest="sha256:ab'cd")
    script = scheduler.render_script(batch)
    assert 'INDEX=${PBS_ARRAY_INDEX:-0}' in script
    assert "WALLTIME_S=120" in script
    assert "export SATRL_IMAGE_DIGEST='sha256:ab'\"'\"'cd'" in script
    assert "exec /opt/venv/bin/python -m agents.train \"$RUN_DIR\"" in script
    assert f"'{tmp_path}/runs/main/Pong/NA/it'\"'\"'s 1'" in script
    assert "#SBATCH" not in script and "#PBS" not in script


def test_pbs_job_script_runs_the_member_of_its_index(tmp_path: Path) -> None:
    """The rendered script, run by bash as a subjob would: the right run directory, the log of
    attempt n, SATRL_DEADLINE = start + walltime, the digest exported, and the worker exec'd."""
    probe = ("import os, sys; print(sys.argv[1], os.environ['SATRL_DEADLINE'], "
             "os.environ['SATRL_IMAGE_DIGEST'], os.getpid())")
    batch = _batch(tmp_path, 3, Resources(walltime_min=2), digest="sha256:abc")
    batch = Batch(batch.token, batch.members, batch.resources, batch.folder,
                  (sys.executable, "-c", probe), batch.image_digest, 300)
    script = PbsScheduler().write_script(batch)
    for attempt in (1, 2):
        started = int(time.time())
        process = subprocess.Popen(["bash", str(script)], env=dict(os.environ,
                                                                   PBS_ARRAY_INDEX="1"))
        assert process.wait(timeout=60) == 0
        log = batch.members[1].run_dir / "logs" / f"attempt-{attempt}.out"
        lines = log.read_text().splitlines()
        assert lines[0].startswith("satrl job: batch satrl-0123456789, index 1, log "
                                   f"{attempt}")
        run_dir, deadline, digest, pid = lines[1].split(" ")[-4:]
        assert lines[1].startswith(str(batch.members[1].run_dir))
        assert started + 120 <= int(deadline) <= int(time.time()) + 120
        assert digest == "sha256:abc"
        assert int(pid) == process.pid  # exec: the worker is the job's own process
    assert not (batch.members[0].run_dir / "logs").exists()
    bad = subprocess.run(["bash", str(script)], env=dict(os.environ, PBS_ARRAY_INDEX="3"),
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "outside 0..2" in bad.stderr


def _fake_qstat(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, output: bytes) -> None:
    """A `qstat` first on PATH that prints `output` (bytes, as a server would) and exits 0."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "qstat.out").write_bytes(output)
    qstat = bin_dir / "qstat"
    qstat.write_text(f"#!/bin/sh\ncat '{bin_dir / 'qstat.out'}'\n")
    qstat.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_qstat_reads_a_latin1_byte_in_captured_output(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Another user's Variable_List with a Latin-1 byte (not UTF-8) must not spoil the poll."""
    _files()
    raw = (REFERENCE / "t1_qstat_running.json").read_bytes()
    latin1 = raw.replace(b'"PBS_O_HOME":\t"/home/pbsuser"', b'"PBS_O_HOME":\t"/home/j\xe9r\xf4me"')
    assert latin1 != raw
    with pytest.raises(UnicodeDecodeError):
        latin1.decode()
    _fake_qstat(tmp_path, monkeypatch, latin1)
    reply = PbsScheduler().poll(["0.pbshost"])
    assert reply.jobs["0.pbshost"].state == JobState.RUNNING
    assert reply.jobs["0.pbshost"].name == "t1" and not reply.unreadable


def test_qstat_nested_too_deeply_is_a_scheduler_error_not_a_traceback(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_qstat(tmp_path, monkeypatch, b"[" * 200000)
    with pytest.raises(SchedulerError, match="qstat -F json printed text") as caught:
        PbsScheduler().poll(["0.pbshost"])
    assert "\n" not in str(caught.value)


def test_qstat_job_nested_too_deeply_in_captured_output_is_unreadable() -> None:
    _files()
    text = (REFERENCE / "array_qstat_t_running.json").read_text()
    marker = '"comment":\t"Job run at Thu Nov 26 at 06:05 on (pbshost:ncpus=1)"'
    assert marker in text
    deep = text.replace(marker, '"comment":\t' + "[" * 200000, 1)
    document = parse_qstat_json(deep)
    assert set(document.unreadable) == {"2[0].pbshost"}
    assert "nested too deeply" in document.unreadable["2[0].pbshost"]
    assert set(document.jobs) == {"2[].pbshost", "2[1].pbshost", "2[2].pbshost", "2[3].pbshost"}


@pytest.mark.parametrize("raw_state", ["F", "X"])
@pytest.mark.parametrize(("comment", "state", "run_state"), [
    ("Job deleted by pbsuser@pbshost", JobState.CANCELLED, RunState.CANCELLED),
    ("Job run at Thu Nov 26 at 06:05 on (pbshost:ncpus=1) and terminated by root@pbshost",
     JobState.CANCELLED, RunState.CANCELLED),
    ("Job run at Thu Nov 26 at 06:05 on (pbshost:ncpus=1) and finished", JobState.FAILED,
     RunState.FAILED),
    (None, JobState.FAILED, RunState.FAILED),
])
def test_finished_job_without_exit_status_in_captured_output_is_terminal(
        raw_state: str, comment: str | None, state: JobState, run_state: RunState) -> None:
    """F and X end a job: without Exit_status it is cancelled (deletion comment) or failed,
    never UNKNOWN (which counts as active for ever)."""
    _files()
    job = json.loads((REFERENCE / "del_qstat_x_finished.json").read_text())["Jobs"]["3.pbshost"]
    del job["Exit_status"]
    job["job_state"] = raw_state
    if comment is None:
        del job["comment"]
    else:
        job["comment"] = comment
    status = job_state("3.pbshost", job)
    assert (status.state, status.exit_status) == (state, None)
    assert not status.state.is_active()
    decision = decide(RunState.RUNNING, FileView(), SchedulerView(True, status.state, None,
                                                                  status.detail),
                      now=time.time(), since=time.time(), grace_s=600)
    assert decision.state == run_state


def test_job_record_that_is_not_an_object_in_captured_output_is_unreadable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    document = parse_qstat_json('{"Jobs": {"1.x": "garbage"}}')
    assert document.jobs == {}
    assert set(document.unreadable) == {"1.x"}
    assert "not a JSON object" in document.unreadable["1.x"]
    _files()
    data = json.loads((REFERENCE / "array_qstat_t_running.json").read_text())
    data["Jobs"]["2[1].pbshost"] = ["Q"]
    data["Jobs"]["2[2].pbshost"] = None
    _fake_qstat(tmp_path, monkeypatch, json.dumps(data).encode())
    reply = PbsScheduler().poll(["2[0].pbshost", "2[1].pbshost", "2[2].pbshost",
                                 "2[3].pbshost"])
    assert set(reply.jobs) == {"2[0].pbshost", "2[3].pbshost"}
    assert set(reply.unreadable) == {"2[1].pbshost", "2[2].pbshost"}
    # The same in qstat's one-attribute-per-line layout, read job by job (invalid JSON).
    text = _corrupt_env((REFERENCE / "array_qstat_t_running.json").read_text())
    start = text.index('\t\t"2[1].pbshost":')
    end = text.index('\t\t"2[2].pbshost":')
    broken = text[:start] + '\t\t"2[1].pbshost":\t"garbage",\n' + text[end:]
    document = parse_qstat_json(broken)
    assert set(document.jobs) == {"2[].pbshost", "2[0].pbshost", "2[2].pbshost", "2[3].pbshost"}
    assert set(document.unreadable) == {"2[1].pbshost"}
    assert "not a JSON object" in document.unreadable["2[1].pbshost"]
    first = broken.index('\t\t"2[].pbshost":')
    leading = broken[:first] + '\t\t"1.pbshost":\t[],\n' + broken[first:]
    assert set(parse_qstat_json(leading).unreadable) == {"1.pbshost", "2[1].pbshost"}


@pytest.mark.parametrize(("value", "message"), [
    ("4x", "max_running must be a number"),
    (-2, "max_running must be >= 1"),
    (0, "max_running must be >= 1"),
    (2.7, "max_running must be a whole number"),
    (True, "max_running must be a number"),
])
def test_qsub_max_running_is_checked(tmp_path: Path, value: object, message: str) -> None:
    scheduler = PbsScheduler({"max_running": value})
    for members in (3, 1):
        with pytest.raises(UsageError, match=f"satrl.toml \\[pbs\\]: {message}"):
            scheduler.submit_command(_batch(tmp_path, members, Resources()))
    command = PbsScheduler({"max_running": 2.0}).submit_command(_batch(tmp_path, 3, Resources()))
    assert command[3:5] == ["-J", "0-2%2"]
    assert "-J" in PbsScheduler({}).submit_command(_batch(tmp_path, 3, Resources()))
    assert "0-2" in PbsScheduler({}).submit_command(_batch(tmp_path, 3, Resources()))
