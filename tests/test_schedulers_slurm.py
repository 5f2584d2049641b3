"""Slurm's and the local backend's command lines and records, and the resources table.
(The real-Slurm end-to-end tests are in test_dispatch_slurm.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from orchestrator.errors import SchedulerError, UsageError
from orchestrator.resources import Resources, hms, pbs_flags, resolve_resources, slurm_flags
from orchestrator.schedulers import get_scheduler
from orchestrator.schedulers.base import Batch, BatchMember, JobState
from orchestrator.schedulers.local import LocalScheduler
from orchestrator.schedulers.procs import is_alive, start_ticks
from orchestrator.schedulers.slurm import SlurmScheduler
from tests.fixtures.slurm import SlurmCluster


def _settings(raw: dict) -> SimpleNamespace:
    return SimpleNamespace(section=lambda name: raw.get(name, {}), scratch=Path("/scratch"),
                           workspace=Path("/ws"))


def _batch(tmp_path: Path, n: int, resources: Resources) -> Batch:
    members = tuple(BatchMember(i + 1, tmp_path / f"run {i}") for i in range(n))
    return Batch("satrl-abc", members, resources, tmp_path / "b", ("python", "-m",
                                                                   "agents.train"), None, 120)


def test_sbatch_command_line_array_gpus_memory_partition(tmp_path: Path) -> None:
    scheduler = SlurmScheduler({"gres": "gpu:a100", "max_running": 8})
    batch = _batch(tmp_path, 5, Resources(cpus=16, gpus=2, mem_gb=64, walltime_min=1500,
                                          queue="gpu", account="proj"))
    assert scheduler.submit_command(batch) == [
        "sbatch", "--parsable", "--job-name=satrl-abc", "--array=0-4%8",
        f"--output={tmp_path}/b/slurm-%A_%a.out", "--signal=B:USR1@120",
        "--cpus-per-task=16", "--time=25:00:00", "--gres=gpu:a100:2", "--mem=65536M",
        "--partition=gpu", "--account=proj", f"{tmp_path}/b/job.sh"]
    single = SlurmScheduler().submit_command(_batch(tmp_path, 1, Resources()))
    assert "--array=0-0" in single and "--time=01:00:00" in single
    assert not any(flag.startswith(("--gres", "--mem", "--partition")) for flag in single)
    assert "INDEX=${SLURM_ARRAY_TASK_ID:-0}" in scheduler.render_script(batch)


def test_resources_from_toml_layers_and_flags() -> None:
    raw = {"resources": {"cpus": 8, "gpus": 1, "mem_gb": 32, "walltime_min": 600},
           "pbs": {"queue": "gpuq", "walltime_min": 720, "gpu_resource": "ngpus"},
           "slurm": {"partition": "a100", "cpus": 4}}
    pbs = resolve_resources(_settings(raw), "pbs", {"gpus": 2, "account": None})
    assert pbs == Resources(cpus=8, gpus=2, mem_gb=32.0, walltime_min=720.0, queue="gpuq")
    assert pbs_flags(pbs, raw["pbs"]) == ["-l", "select=1:ncpus=8:ngpus=2:mem=32gb",
                                          "-l", "walltime=12:00:00", "-q", "gpuq"]
    slurm = resolve_resources(_settings(raw), "slurm")
    assert (slurm.cpus, slurm.queue, slurm.walltime_min) == (4, "a100", 600.0)
    assert slurm_flags(slurm, {}) == ["--cpus-per-task=4", "--time=10:00:00", "--gres=gpu:1",
                                      "--mem=32768M", "--partition=a100"]
    assert resolve_resources(_settings({}), "local").walltime_s == 0
    assert hms(59) == "00:00:59" and hms(100 * 3600 + 61) == "100:01:01"
    assert resolve_resources(_settings({}), "pbs", {"walltime_min": 0.5}).walltime_s == 30


@pytest.mark.parametrize(("raw", "message"), [
    ({"resources": {"cpus": 0}}, "cpus must be >= 1"),
    ({"resources": {"gpus": 1.5}}, "gpus must be a whole number"),
    ({"slurm": {"mem_gb": -1}}, "mem_gb must be >= 0 and > 0"),
    ({"resources": {"walltime_min": "2h"}}, "walltime_min must be a number"),
    ({"resources": {"walltime_min": 0}}, "walltime_min must be > 0 for the slurm backend"),
    ({"slurm": {"partition": ""}}, "queue must be a non-empty string"),
])
def test_bad_resources_are_refused_with_their_source(raw: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        resolve_resources(_settings(raw), "slurm")


def test_unknown_backend_suggests_the_nearest() -> None:
    with pytest.raises(UsageError, match="did you mean slurm"):
        get_scheduler("slurn", _settings({}))


def test_local_records_tell_a_reused_pid_from_the_worker(tmp_path: Path) -> None:
    """A member record whose pid now belongs to another process (other start time) is not
    running; with its runner gone too, the member is not listed at all (lost after grace)."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                               start_new_session=True)  # a worker leads its process group
    try:
        ticks = start_ticks(sleeper.pid)
        assert ticks is not None and is_alive(sleeper.pid, ticks)
        assert not is_alive(sleeper.pid, ticks - 1)
        folder = tmp_path / "satrl-x"
        (folder / "members").mkdir(parents=True)
        (folder / "batch.json").write_text(json.dumps({"count": 1, "max_parallel": 1}))
        (folder / "runner.json").write_text(json.dumps({"pid": sleeper.pid,
                                                        "start_ticks": ticks - 1}))
        record = {"index": 0, "pid": sleeper.pid, "start_ticks": ticks - 1}
        (folder / "members" / "0.json").write_text(json.dumps(record))
        local = LocalScheduler({}, tmp_path)
        assert local.poll(["satrl-x[0]"]).jobs == {}
        record["start_ticks"] = ticks
        (folder / "members" / "0.json").write_text(json.dumps(record))
        assert local.poll(["satrl-x[0]"]).jobs["satrl-x[0]"].state == JobState.RUNNING
        local.cancel(["satrl-x[0]"])
        assert sleeper.wait(timeout=10) == -15  # SIGTERM to the member's process group
    finally:
        sleeper.kill()
        sleeper.wait()
    assert local.find_by_names(["satrl-x", "satrl-y"]) == {"satrl-x": {0: "satrl-x[0]"}}
    assert (folder / "cancel" / "0").exists()


def test_squeue_and_scancel_of_a_real_slurm(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    scheduler = SlurmScheduler({})
    batch = Batch("satrl-unit1", tuple(BatchMember(i, tmp_path / f"r{i}") for i in range(3)),
                  Resources(walltime_min=1), tmp_path / "b",
                  ("bash", "-c", "sleep 30", "worker"), None, 10)
    submission = scheduler.submit(batch)
    array = submission.array_job_id
    assert submission.job_ids == tuple(f"{array}_{i}" for i in range(3))
    assert scheduler.find_by_names(["satrl-unit1", "other"]) == {
        "satrl-unit1": {i: f"{array}_{i}" for i in range(3)}}
    reply = scheduler.poll([*submission.job_ids, "999999_0"])
    assert set(reply.jobs) == set(submission.job_ids)
    # One forgotten array alone: squeue -j exits 1 ("Invalid job id"), which means "no jobs".
    assert scheduler.poll(["999999_0"]).jobs == {}
    assert {s.state for s in reply.jobs.values()} <= {JobState.PENDING, JobState.RUNNING}
    scheduler.cancel(list(submission.job_ids))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        states = {s.raw_state for s in scheduler.poll(submission.job_ids).jobs.values()}
        if states == {"CANCELLED"}:
            break
        time.sleep(0.5)
    assert states == {"CANCELLED"}
    scheduler.cancel(list(submission.job_ids))  # already ended: not an error


@pytest.mark.parametrize(("flavor", "flag"), [("cuda", "--nv"), ("rocm", "--rocm")])
def test_job_script_command_line_in_an_apptainer_image(tmp_path: Path, flavor: str,
                                                       flag: str) -> None:
    from orchestrator.dispatching import launch_command
    from orchestrator.images import JobImage

    settings = _settings({"image": {"binds": ["/datasets"], "python": "/opt/venv/bin/python"}})
    image = JobImage("/shared/images/satrl cuda.sif", flavor, "ab" * 32)
    launch = launch_command(settings, image)
    assert launch == ("apptainer", "exec", flag, "--bind", "/scratch:/scratch", "--bind",
                      "/datasets", "/shared/images/satrl cuda.sif", "/opt/venv/bin/python",
                      "-m", "agents.train")
    batch = Batch("satrl-img", (BatchMember(1, tmp_path / "r"),), Resources(), tmp_path / "b",
                  launch, image.digest, 300)
    script = SlurmScheduler().render_script(batch)
    assert f"export SATRL_IMAGE_DIGEST={'ab' * 32}\n" in script
    assert (f"exec apptainer exec {flag} --bind /scratch:/scratch --bind /datasets "
            "'/shared/images/satrl cuda.sif' /opt/venv/bin/python -m agents.train \"$RUN_DIR\""
            ) in script
    plain = launch_command(_settings({"dispatch": {"python": "/usr/bin/python3"}}), None)
    assert plain == ("/usr/bin/python3", "-m", "agents.train")


def _fake_squeue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, output: bytes) -> None:
    """A `squeue` first on PATH that prints `output` and exits 0, as a broken one may."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "squeue.out").write_bytes(output)
    squeue = bin_dir / "squeue"
    squeue.write_text(f"#!/bin/sh\ncat '{bin_dir / 'squeue.out'}'\n")
    squeue.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


@pytest.mark.parametrize("output", [
    b"slurm_load_jobs error: Unable to contact slurm controller (connect failure)\n",
    b"12_0|RUNNING|node1|satrl-abc|None\nsqueue: error: Invalid user\n",
    b"12_0|RUNNING|node1\n",
])
def test_squeue_line_that_is_not_a_job_is_a_scheduler_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, output: bytes) -> None:
    """squeue exiting 0 with an error instead of jobs must not read as "no jobs"."""
    _fake_squeue(tmp_path, monkeypatch, output)
    scheduler = SlurmScheduler({})
    for call in (lambda: scheduler.poll(["12_0"]),
                 lambda: scheduler.find_by_names(["satrl-abc"])):
        with pytest.raises(SchedulerError, match="squeue printed a line that is not a job") \
                as caught:
            call()
        message = str(caught.value)
        assert "\n" not in message and "[command: squeue -h" in message
        assert output.decode().splitlines()[-1][:40] in message


def test_squeue_lines_with_odd_names_and_bytes_are_read(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A `|` in a job name adds fields (still a job); a Latin-1 byte is replaced, not fatal."""
    _fake_squeue(tmp_path, monkeypatch,
                 b"12_0|RUNNING|node1|satrl-abc|None\n"
                 b"12_[1-2%1]|PENDING||satrl-abc|JobArrayTaskLimit\n"
                 b"13|RUNNING|node2|caf\xe9 a|b|None\n"
                 b"14_[0-1]|CANCELLED||satrl-abc|JobArrayTaskLimit\n")
    reply = SlurmScheduler({}).poll(["12_0", "12_1", "12_2", "13", "14_0"])
    assert {k: v.state for k, v in reply.jobs.items()} == {
        "12_0": JobState.RUNNING, "12_1": JobState.PENDING, "12_2": JobState.PENDING,
        "13": JobState.RUNNING, "14_0": JobState.CANCELLED}
    assert reply.jobs["12_1"].detail == "JobArrayTaskLimit" and reply.jobs["12_1"].node is None
    # "None" is no reason; a cancelled job's stale pending reason is not why it ended.
    assert reply.jobs["12_0"].detail is None and reply.jobs["14_0"].detail is None
    assert reply.jobs["13"].name == "caf\ufffd a"


@pytest.mark.parametrize(("value", "message"), [
    ("4x", "max_running must be a number"),
    (-2, "max_running must be >= 1"),
    (0, "max_running must be >= 1"),
    (2.7, "max_running must be a whole number"),
])
def test_sbatch_max_running_is_checked(tmp_path: Path, value: object, message: str) -> None:
    with pytest.raises(UsageError, match=f"satrl.toml \\[slurm\\]: {message}"):
        SlurmScheduler({"max_running": value}).submit_command(_batch(tmp_path, 3, Resources()))
    command = SlurmScheduler({"max_running": 3.0}).submit_command(_batch(tmp_path, 3,
                                                                         Resources()))
    assert "--array=0-2%3" in command
    assert "--array=0-2" in SlurmScheduler({}).submit_command(_batch(tmp_path, 3, Resources()))


def test_poll_sees_jobs_that_another_user_of_a_shared_registry_submitted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Slurm's squeue shows only your own jobs with --me; a colleague's status must see yours."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    squeue = bin_dir / "squeue"
    squeue.write_text(
        "#!/bin/sh\n"
        'case " $* " in *" --me "*|*" -u "*|*" --user"*) mine=1 ;; *) mine=0 ;; esac\n'
        "echo '12_0|RUNNING|node1|satrl-mine|None'\n"
        "[ $mine = 1 ] || echo '40_3|PENDING||satrl-colleague|Priority'\n")
    squeue.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    reply = SlurmScheduler({}).poll(["12_0", "40_3"])
    assert {job_id: status.state for job_id, status in reply.jobs.items()} == {
        "12_0": JobState.RUNNING, "40_3": JobState.PENDING}


def test_poll_asks_squeue_for_the_polled_arrays_only(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A lab cluster lists tens of thousands of jobs: poll names its arrays (any user's)."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    squeue = bin_dir / "squeue"
    squeue.write_text(f"#!/bin/sh\necho \"$*\" >> '{calls}'\n"
                      "echo '12_0|RUNNING|node1|satrl-a|None'\n")
    squeue.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr("orchestrator.schedulers.slurm.POLL_CHUNK", 2)
    reply = SlurmScheduler({}).poll(["12_0", "12_1", "40_3", "7", "not-slurm_1", "9_0", "0_1",
                                     "4294967296_0", "\u00b2_0"])
    assert set(reply.jobs) == {"12_0"}
    assert [line.split(" -o ")[0] for line in calls.read_text().splitlines()] == [
        "-h -r -t all -j 12,40", "-h -r -t all -j 7,9"]
    calls.unlink()
    assert SlurmScheduler({}).poll([]).jobs == {} and not calls.exists()


@pytest.mark.parametrize(("ids", "stderr", "forgotten"), [
    (["12_0"], "slurm_load_jobs error: Invalid job id specified", True),
    (["12_0", "13_0"], "slurm_load_jobs error: Invalid job id specified", False),
    (["12_0"], "slurm_load_jobs error: Unable to contact slurm controller", False),
])
def test_squeue_exit_1_is_no_jobs_only_for_one_forgotten_id(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ids: list[str], stderr: str,
        forgotten: bool) -> None:
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    squeue = bin_dir / "squeue"
    squeue.write_text(f"#!/bin/sh\necho '{stderr}' >&2\nexit 1\n")
    squeue.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    if forgotten:
        assert SlurmScheduler({}).poll(ids).jobs == {}
    else:
        with pytest.raises(SchedulerError, match="squeue failed with exit code 1"):
            SlurmScheduler({}).poll(ids)
