"""Claims, interrupted and unclear submissions, and their recovery, against a stand-in scheduler
whose lookups by name return what a real one lists (Slurm forgets finished array tasks, PBS keeps
no history). On SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from orchestrator import dispatching
from orchestrator.registry.db import Registry
from orchestrator.registry.models import Event, Job, Run
from orchestrator.resources import Resources
from orchestrator.schedulers.base import (
    Batch,
    BatchMember,
    PollResult,
    Scheduler,
    Submission,
    run_command,
)
from orchestrator.settings import settings
from tests.dispatch_support import TINY, cli, configure


class StandIn(Scheduler):
    """A scheduler whose find_by_names answers `listed`; submit runs `submit_argv` for real
    (a command that times out, or exits non-zero)."""

    name = "slurm"
    index_variable = "SLURM_ARRAY_TASK_ID"

    def __init__(self, listed: dict[str, dict[int, str]] | None = None,
                 submit_argv: Sequence[str] = ("false",), timeout_s: float = 5.0) -> None:
        super().__init__({})
        self.listed = listed or {}
        self.submit_argv = list(submit_argv)
        self.timeout_s = timeout_s
        self.lookups: list[list[str]] = []
        self.cancelled: list[list[str]] = []
        #: What poll answers.
        self.reply = PollResult()

    def submit_command(self, batch: Batch) -> list[str]:
        return self.submit_argv

    def submit(self, batch: Batch) -> Submission:
        run_command(self.submit_argv, timeout_s=self.timeout_s)
        raise AssertionError("the stand-in submit command must fail")

    def poll(self, job_ids: Sequence[str]) -> PollResult:
        return self.reply

    def cancel(self, job_ids: Sequence[str]) -> None:
        self.cancelled.append(list(job_ids))

    def find_by_names(self, names: Sequence[str],
                      sizes: dict[str, int] | None = None) -> dict[str, dict[int, str]]:
        self.lookups.append(list(names))
        return {name: self.listed[name] for name in names if name in self.listed}


def _queue_four(workspace: Path, capsys: pytest.CaptureFixture[str]) -> list[int]:
    configure(workspace, "")
    assert cli(capsys, "queue", "--games", "Pong,Breakout", "--attn", "NA,SWA", "--seed-list",
               "0", *TINY)[0] == 0
    with Registry(settings().database_url).session() as session:
        return list(session.scalars(select(Run.id).order_by(Run.id)))


def _batch(run_ids: list[int], token: str, tmp_path: Path) -> Batch:
    members = tuple(BatchMember(rid, tmp_path / "runs" / str(rid)) for rid in run_ids)
    return Batch(token, members, Resources(), tmp_path / "batches" / token,
                 ("python", "-m", "agents.train"))


def _jobs(registry: Registry) -> dict[int, tuple[str | None, datetime | None]]:
    with registry.session() as session:
        return {job.run_id: (job.job_id, job.submitted_at)
                for job in session.scalars(select(Job))}


def _states(registry: Registry) -> dict[int, str]:
    with registry.session() as session:
        return dict(session.execute(select(Run.id, Run.state)).all())


def test_recovery_records_ids_by_array_index_when_the_scheduler_lists_only_some_tasks(
        workspace: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    run_ids = _queue_four(workspace, capsys)
    registry = Registry(settings().database_url)
    token = "satrl-0123456789"
    assert dispatching.claim_runs(registry, "slurm", _batch(run_ids, token, tmp_path)) \
        == set(run_ids)
    claimed_at = datetime.now(UTC) - timedelta(minutes=5)
    with registry.write() as session:
        session.execute(update(Job).values(submitted_at=claimed_at))
    # Tasks 0 and 1 finished and Slurm forgot them; 2 and 3 are still listed.
    stand_in = StandIn({token: {2: "77_2", 3: "77_3"}})
    from orchestrator import reconcile

    for module in (dispatching, reconcile):
        monkeypatch.setattr(module, "get_scheduler", lambda name, s: stand_in)
    # `satrl sync` recovers them and says so (it printed "no changes").
    code, out, err = cli(capsys, "sync", "--force")
    assert code == 0 and "recovered 2 run(s) of an interrupted dispatch" in out, (out, err)
    assert "no changes" not in out
    jobs = _jobs(registry)
    assert [jobs[rid][0] for rid in run_ids] == [None, None, "77_2", "77_3"]
    with registry.session() as session:
        assert set(session.scalars(select(Job.array_job_id).where(Job.job_id.is_not(None)))) \
            == {"77"}
    # The claim time stays the job's submission time: files written since it belong to it.
    for rid in run_ids[2:]:
        stored = jobs[rid][1]
        assert stored is not None
        assert abs((stored.replace(tzinfo=UTC) - claimed_at).total_seconds()) < 1
    registry.dispose()


def _planned(run_ids: list[int], token: str, tmp_path: Path) -> dispatching.PlannedBatch:
    return dispatching.PlannedBatch(_batch(run_ids, token, tmp_path),
                                    [(rid, str(rid)) for rid in run_ids], [], "")


def test_submit_that_times_out_but_was_accepted_keeps_the_claim_and_records_the_ids(
        workspace: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_ids = _queue_four(workspace, capsys)
    registry = Registry(settings().database_url)
    token = "satrl-aaaaaaaaaa"
    # sbatch hangs past its timeout, yet the scheduler has the array: no second submission.
    stand_in = StandIn({token: {i: f"78_{i}" for i in range(4)}}, ["sleep", "5"], 0.2)
    planned = _planned(run_ids, token, tmp_path)
    dispatching.submit_batch(registry, stand_in, planned)
    assert stand_in.lookups == [[token]]
    assert planned.job_ids == tuple(f"78_{i}" for i in range(4))
    assert set(_states(registry).values()) == {"submitted"}
    assert [_jobs(registry)[rid][0] for rid in run_ids] == [f"78_{i}" for i in range(4)]
    registry.dispose()


def test_submit_refused_and_not_listed_releases_the_claim(
        workspace: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from orchestrator.errors import SchedulerError

    run_ids = _queue_four(workspace, capsys)
    registry = Registry(settings().database_url)
    stand_in = StandIn({}, ["false"])
    with pytest.raises(SchedulerError, match="false failed with exit code 1"):
        dispatching.submit_batch(registry, stand_in, _planned(run_ids, "satrl-bbbbbbbbbb",
                                                              tmp_path))
    assert set(_states(registry).values()) == {"queued"}
    assert _jobs(registry) == {}
    registry.dispose()


def test_local_runner_that_does_not_announce_itself_is_killed_before_submit_fails(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from orchestrator.errors import SchedulerError
    from orchestrator.schedulers import local

    # A stand-in interpreter that starts, never writes runner.json, and would run for long.
    python = tmp_path / "slow-python"
    python.write_text(f'#!/bin/bash\necho $$ > {tmp_path}/pid\nexec sleep 60\n')
    python.chmod(0o755)
    monkeypatch.setattr(local, "RUNNER_START_TIMEOUT_S", 1.0)
    scheduler = local.LocalScheduler({}, tmp_path / "batches", str(python))
    batch = _batch([1], "satrl-cccccccccc", tmp_path)
    with pytest.raises(SchedulerError, match="did not start"):
        scheduler.submit(batch)
    pid = int((tmp_path / "pid").read_text())
    with pytest.raises(ProcessLookupError):  # killed and reaped: not even a zombie
        os.kill(pid, 0)


def test_a_local_runner_that_ended_is_reaped_by_the_next_poll(tmp_path: Path) -> None:
    import os
    import time

    from orchestrator.schedulers import local

    # A stand-in interpreter that announces itself (runner.json) and exits at once.
    python = tmp_path / "quick-python"
    python.write_text(f'#!/bin/bash\necho $$ > {tmp_path}/pid\n'
                      'echo "{}" > "${@: -1}/runner.json"\n')
    python.chmod(0o755)
    scheduler = local.LocalScheduler({}, tmp_path / "batches", str(python))
    scheduler.submit(_batch([1], "satrl-dddddddddd", tmp_path))
    pid = int((tmp_path / "pid").read_text())

    def state() -> str:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rfind(")") + 2:].split()[0]

    deadline = time.monotonic() + 10
    while state() != "Z" and time.monotonic() < deadline:  # exited: a zombie until reaped
        time.sleep(0.02)
    assert state() == "Z"
    scheduler.poll([])
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_running_runs_whose_ids_were_never_recorded_are_recovered_or_lost_after_the_grace(
        workspace: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    import json
    import time

    from orchestrator import reconcile

    run_ids = _queue_four(workspace, capsys)
    registry = Registry(settings().database_url)
    # Two batches of two whose ids were never recorded (dispatch crashed after sbatch).
    first, second = _batch(run_ids[:2], "satrl-dddddddddd", tmp_path), \
        _batch(run_ids[2:], "satrl-eeeeeeeeee", tmp_path)
    dispatching.claim_runs(registry, "slurm", first)
    dispatching.claim_runs(registry, "slurm", second)
    now = time.time()
    with registry.write() as session:
        session.execute(update(Job).values(submitted_at=datetime.fromtimestamp(now - 1200, UTC)))
        # Heartbeats moved members 0, 1 and 2 to running in an earlier round.
        session.execute(update(Run).where(Run.id.in_(run_ids[:3])).values(state="running"))
    members = [*first.members, *second.members]
    for member, beat in zip(members, (now - 900, now - 900, now - 5), strict=False):
        member.run_dir.mkdir(parents=True)
        (member.run_dir / "status.json").write_text(json.dumps({"updated_at": beat}))
    # Slurm lists task 1 of the first batch only (0 stopped long ago) and forgot the second,
    # whose member 2 still beats (so the batch did reach Slurm) and member 3 never ran.
    stand_in = StandIn({"satrl-dddddddddd": {1: "79_1"}})
    monkeypatch.setattr(dispatching, "get_scheduler", lambda name, s: stand_in)
    monkeypatch.setattr(reconcile, "get_scheduler", lambda name, s: stand_in)
    result = reconcile.reconcile(registry, settings(), force=True, now=now)
    assert _states(registry) == dict(zip(run_ids, ["lost", "running", "running", "lost"],
                                         strict=True))
    jobs = _jobs(registry)
    assert [jobs[rid][0] for rid in run_ids] == [None, "79_1", None, None]
    assert sorted(t.run_id for t in result.transitions) == [run_ids[0], run_ids[3]]
    registry.dispose()


def test_requeue_moves_only_failed_lost_or_cancelled_runs_never_a_resubmitted_one(
        workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from orchestrator.runctl import move_to_queued

    run_ids = _queue_four(workspace, capsys)
    registry = Registry(settings().database_url)
    with registry.write() as session:
        for rid, state in zip(run_ids, ["failed", "lost", "cancelled", "submitted"],
                              strict=True):
            session.execute(update(Run).where(Run.id == rid).values(state=state))
    # The fourth run was requeued and dispatched again by another process meanwhile.
    assert move_to_queued(registry, run_ids, "requeued by the user") == set(run_ids[:3])
    assert set(_states(registry).items()) == {(rid, "queued") for rid in run_ids[:3]} | \
        {(run_ids[3], "submitted")}
    registry.dispose()


def test_named_runs_that_requeue_or_cancel_leave_alone_say_why(
        workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Not a bare 'requeued 0 run(s)' for a run the user named."""
    run_ids = _queue_four(workspace, capsys)
    registry = Registry(settings().database_url)
    with registry.write() as session:
        for rid, state in zip(run_ids, ["succeeded", "failed", "failed", "queued"], strict=True):
            session.execute(update(Run).where(Run.id == rid).values(state=state))
    before = _states(registry)
    code, out, err = cli(capsys, "requeue", str(run_ids[0]), str(run_ids[3]), "--dry-run")
    keys = {rid: key for rid, key in zip(run_ids, ["Breakout/NA/0", "Breakout/SWA/0",
                                                     "Pong/NA/0", "Pong/SWA/0"], strict=True)}
    assert code == 0 and "would requeue 0 run(s)" in out
    assert err.splitlines() == [
        f"skipped {keys[run_ids[0]]}: it is succeeded; requeue takes cancelled, failed or lost "
        "runs",
        f"skipped {keys[run_ids[3]]}: it is queued; requeue takes cancelled, failed or lost runs"]
    code, out, err = cli(capsys, "requeue", str(run_ids[1]), "--walltime", "--dry-run")
    assert err.strip() == (f"skipped {keys[run_ids[1]]}: failed, but its last attempt did not "
                           "hit its walltime")
    code, out, err = cli(capsys, "cancel", str(run_ids[0]), str(run_ids[3]), "--dry-run")
    assert code == 0 and "would cancel 1 run(s)" in out
    assert err.strip() == f"skipped {keys[run_ids[0]]}: it is already succeeded"
    assert _states(registry) == before
    registry.dispose()


def test_dispatch_lock_is_shared_by_every_workspace_of_a_postgresql_registry(
        registry: Registry, tmp_path: Path) -> None:
    from types import SimpleNamespace

    one, other = (SimpleNamespace(workspace=tmp_path / name) for name in ("one", "two"))
    with dispatching.dispatch_lock(one, registry=registry) as held:
        assert held
        with dispatching.dispatch_lock(one, blocking=False, registry=registry) as again:
            assert again is False  # the workspace's file lock
        with dispatching.dispatch_lock(other, blocking=False, registry=registry) as elsewhere:
            # Another workspace (machine) on the same PostgreSQL waits; SQLite is one machine's.
            assert elsewhere is registry.is_sqlite
    with dispatching.dispatch_lock(other, blocking=False, registry=registry) as released:
        assert released


@pytest.mark.parametrize(("toml", "dispatch", "message"), [
    ("", "max_array = 0", "satrl.toml [dispatch]: max_array must be >= 1, not 0"),
    ("", "max_array = 2.5", "satrl.toml [dispatch]: max_array must be a whole number, not 2.5"),
    ("", 'lost_grace_s = "ten"', "satrl.toml [dispatch]: lost_grace_s must be a number, not"),
    ("", 'max_attempts = "3"', "satrl.toml [dispatch]: max_attempts must be a number, not"),
    ('[local]\npoll_interval_s = "x"\n', "",
     "satrl.toml [local]: poll_interval_s must be a number, not 'x'"),
    ('[local]\nmax_parallel = "x"\n', "",
     "satrl.toml [local]: max_parallel must be a number, not 'x'"),
    ('[local]\nkill_wait_s = -1\n', "", "satrl.toml [local]: kill_wait_s must be >= 0, not -1"),
    # Read as true before ("false" is a non-empty string), and auto-requeue went on.
    ("", 'auto_requeue = "false"',
     "satrl.toml [dispatch]: auto_requeue must be true or false, not 'false'"),
    # Went into the job command line as --gres=5:1 / select=1:ncpus=1:ngpus:x=1.
    ("[slurm]\ngres = 5\n", "--backend=slurm",
     "satrl.toml [slurm]: gres must be a resource name such as 'gpu', not 5"),
    ('[slurm]\ngres = ""\n', "--backend=slurm", "gres must be a resource name"),
    ('[pbs]\ngpu_resource = "ngpus:x"\n', "--backend=pbs",
     "satrl.toml [pbs]: gpu_resource must be a resource name such as 'ngpus', not 'ngpus:x'"),
])
def test_bad_dispatch_settings_are_one_line_before_anything_is_claimed(
        workspace: Path, capsys: pytest.CaptureFixture[str], toml: str, dispatch: str,
        message: str) -> None:
    run_ids = _queue_four(workspace, capsys)
    flags = [dispatch] if dispatch.startswith("--") else []
    configure(workspace, toml, dispatch='backend = "local"\n' + ("" if flags else dispatch))
    code, out, err = cli(capsys, "dispatch", *flags)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    registry = Registry(settings().database_url)
    assert set(_states(registry).values()) == {"queued"} and _jobs(registry) == {}
    assert len(run_ids) == 4
    registry.dispose()


@pytest.mark.parametrize(("setting", "message"), [
    # Written into the job script as `exec 5 -m agents.train`.
    ("python = 5", "satrl.toml [dispatch]: python must be the path of an interpreter, not 5"),
    # `dispatch --wait` failed with a traceback after it had submitted the jobs.
    ('wait_interval_s = "x"', "satrl.toml [dispatch]: wait_interval_s must be a number"),
    ("wait_interval_s = 0", "satrl.toml [dispatch]: wait_interval_s must be >= 0.1, not 0"),
])
def test_bad_job_settings_are_one_line_before_anything_is_claimed(
        workspace: Path, capsys: pytest.CaptureFixture[str], setting: str, message: str
        ) -> None:
    _queue_four(workspace, capsys)
    (workspace / "satrl.toml").write_text(f'[dispatch]\nbackend = "local"\n{setting}\n')
    settings.cache_clear()
    for args in (("dispatch", "--wait"), ("dispatch", "--dry-run")):
        code, out, err = cli(capsys, *args)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert message in err
    registry = Registry(settings().database_url)
    assert set(_states(registry).values()) == {"queued"} and _jobs(registry) == {}
    registry.dispose()


class AcceptsOnce(StandIn):
    """Accepts the first batch (recorded with made-up ids), then refuses like StandIn."""

    def __init__(self) -> None:
        super().__init__({}, ["false"])
        self.accepted: list[str] = []

    def submit(self, batch: Batch) -> Submission:
        if self.accepted:
            return super().submit(batch)
        self.accepted.append(batch.token)
        return Submission(tuple(f"90_{i}" for i in range(len(batch.members))), "90")


def test_a_dispatch_that_fails_after_a_submitted_batch_says_what_went_out(
        workspace: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    run_ids = _queue_four(workspace, capsys)
    configure(workspace, "", dispatch='backend = "slurm"\nmax_array = 2')
    stand_in = AcceptsOnce()
    monkeypatch.setattr(dispatching, "get_scheduler", lambda name, s: stand_in)
    code, out, err = cli(capsys, "dispatch")
    assert code == 4 and len(err.strip().splitlines()) == 1, err
    assert "false failed with exit code 1" in err
    assert "1 batch(es) were submitted and recorded: 2 run(s) as 90_0 .. 90_1" in err
    registry = Registry(settings().database_url)
    states = _states(registry)
    assert [states[rid] for rid in run_ids] == ["submitted", "submitted", "queued", "queued"]
    assert {rid: job for rid, (job, _) in _jobs(registry).items()} == {
        run_ids[0]: "90_0", run_ids[1]: "90_1"}
    registry.dispose()


def test_a_round_judging_an_attempt_replaced_meanwhile_writes_nothing_for_it(
        workspace: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from orchestrator import reconcile

    run_id = _queue_four(workspace, capsys)[0]
    registry = Registry(settings().database_url)
    first = _batch([run_id], "satrl-1111111111", tmp_path)
    assert dispatching.claim_runs(registry, "slurm", first) == {run_id}
    dispatching.record_submission(registry, first.token, {0: "5"}, None)
    # The first attempt failed: its exit.json says so.
    run_dir = first.members[0].run_dir
    run_dir.mkdir(parents=True)
    (run_dir / "exit.json").write_text(json.dumps(
        {"reason": "failed", "exit_code": 1, "message": "boom", "ended_at": 1.0}))
    monkeypatch.setattr(reconcile, "_poll", lambda *args, **kwargs: {})
    real_read_files = reconcile.read_files

    def read_then_race(*args: object, **kwargs: object) -> object:
        # This round has read the run (submitted, job 5) and now reads exit.json. Meanwhile
        # another process judged the run failed, requeued it and dispatched it again (job 6):
        # it is "submitted" once more, under a newer job.
        view = real_read_files(*args, **kwargs)
        with registry.write() as session:
            session.execute(update(Run).where(Run.id == run_id).values(state="queued"))
        second = _batch([run_id], "satrl-2222222222", tmp_path)
        assert dispatching.claim_runs(registry, "slurm", second) == {run_id}
        dispatching.record_submission(registry, second.token, {0: "6"}, None)
        return view

    monkeypatch.setattr(reconcile, "read_files", read_then_race)
    result = reconcile.reconcile(registry, settings(), force=True)
    # The round's verdict (failed, from the first attempt's exit.json) is not written over the
    # second attempt, although the run is in the state the round read.
    assert result.transitions == []
    assert _states(registry)[run_id] == "submitted"
    with registry.session() as session:
        reasons = dict(session.execute(select(Job.job_id, Job.reason)).all())
    assert reasons == {"5": None, "6": None}
    registry.dispose()


def _dispatched(registry: Registry, run_ids: list[int], tmp_path: Path, token: str
                ) -> list[Path]:
    """The runs claimed and recorded as one batch (job ids `<n>_<index>`); their run dirs."""
    batch = _batch(run_ids, token, tmp_path)
    assert dispatching.claim_runs(registry, "slurm", batch) == set(run_ids)
    dispatching.record_submission(registry, token, {i: f"81_{i}" for i in range(len(run_ids))},
                                  "81")
    for member in batch.members:
        member.run_dir.mkdir(parents=True, exist_ok=True)
    return [member.run_dir for member in batch.members]


def _write_exit(run_dir: Path, reason: str, code: int) -> None:
    import json
    import time

    (run_dir / "exit.json").write_text(json.dumps({
        "schema": 1, "exit_code": code, "reason": reason, "message": f"{reason} here",
        "attempt": 1, "ended_at": time.time()}))


def _reasons(registry: Registry) -> dict[int, str | None]:
    with registry.session() as session:
        return dict(session.execute(select(Job.run_id, Job.reason)).all())


def test_cancel_settles_runs_whose_worker_already_wrote_its_exit_json_and_cancels_the_rest(
        workspace: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator import runctl
    from orchestrator.registry.queries import RunFilter

    run_ids = _queue_four(workspace, capsys)
    registry = Registry(settings().database_url)
    done_dir, failed_dir, _ = _dispatched(registry, run_ids[:3], tmp_path, "satrl-3333333333")
    # Two workers finished before the user's cancel (their jobs are gone); one still runs;
    # the fourth run is still queued.
    _write_exit(done_dir, "done", 0)
    _write_exit(failed_dir, "failed", 1)
    stand_in = StandIn()
    monkeypatch.setattr(runctl, "get_scheduler", lambda name, s: stand_in)
    monkeypatch.setattr(dispatching, "get_scheduler", lambda name, s: stand_in)
    everything = RunFilter(run_ids=tuple(run_ids))

    preview = runctl.cancel(registry, settings(), everything, dry_run=True)
    assert [rid for rid, _ in preview.cancelled] == run_ids[2:]
    assert [(rid, state) for rid, _, state in preview.settled] == [
        (run_ids[0], "succeeded"), (run_ids[1], "failed")]
    assert preview.jobs == {"slurm": ["81_2"]} and stand_in.cancelled == []
    assert [_states(registry)[rid] for rid in run_ids] == ["submitted"] * 3 + ["queued"]
    code, out, _ = cli(capsys, "cancel", "--all", "--dry-run")  # the words say so too
    assert code == 0 and "would cancel 2 run(s)" in out
    assert "would settle 2 finished run(s) from their exit.json" in out and "-> succeeded" in out

    result = runctl.cancel(registry, settings(), everything)
    assert [rid for rid, _ in result.cancelled] == run_ids[2:]
    assert stand_in.cancelled == [["81_2"]]  # no cancel of a job that has ended
    assert [_states(registry)[rid] for rid in run_ids] == [
        "succeeded", "failed", "cancelled", "cancelled"]
    assert _reasons(registry) == {run_ids[0]: "done", run_ids[1]: "failed",
                                  run_ids[2]: "cancelled"}
    assert result.to_json()["settled"][0]["state"] == "succeeded"
    with registry.session() as session:
        why = session.scalar(select(Event.why).where(Event.run_id == run_ids[0],
                                                     Event.to_state == "succeeded"))
    assert why == "finished: done here"
    registry.dispose()


def test_cancel_settles_a_run_whose_worker_finished_while_its_job_was_being_cancelled(
        workspace: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator import runctl
    from orchestrator.registry.queries import RunFilter

    run_ids = _queue_four(workspace, capsys)
    registry = Registry(settings().database_url)
    run_dirs = _dispatched(registry, run_ids[:2], tmp_path, "satrl-4444444444")

    class FinishesMeanwhile(StandIn):
        def cancel(self, job_ids: Sequence[str]) -> None:
            super().cancel(job_ids)
            _write_exit(run_dirs[0], "done", 0)  # the worker wrote exit.json before the kill

    stand_in = FinishesMeanwhile()
    monkeypatch.setattr(runctl, "get_scheduler", lambda name, s: stand_in)
    result = runctl.cancel(registry, settings(), RunFilter(run_ids=tuple(run_ids[:2])))
    assert stand_in.cancelled == [["81_0", "81_1"]]
    assert [rid for rid, _ in result.cancelled] == [run_ids[1]]
    assert [_states(registry)[rid] for rid in run_ids[:2]] == ["succeeded", "cancelled"]
    assert _reasons(registry) == {run_ids[0]: "done", run_ids[1]: "cancelled"}
    registry.dispose()


def test_requeue_leaves_a_run_whose_job_is_listed_unreadable_or_in_an_unknown_state(
        workspace: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator import runctl
    from orchestrator.registry.queries import RunFilter
    from orchestrator.schedulers.base import JobState, JobStatus

    run_ids = _queue_four(workspace, capsys)
    registry = Registry(settings().database_url)
    _dispatched(registry, run_ids, tmp_path, "satrl-5555555555")
    with registry.write() as session:
        session.execute(update(Run).values(state="lost"))
    stand_in = StandIn()
    # 81_0 listed in a state satrl does not know, 81_1 listed but unreadable, 81_2 running,
    # 81_3 no longer listed: only the last may get a second worker in its run directory.
    stand_in.reply = PollResult(
        {"81_0": JobStatus("81_0", JobState.UNKNOWN, "RESV_DEL_HOLD2"),
         "81_2": JobStatus("81_2", JobState.RUNNING, "RUNNING")},
        {"81_1": "invalid JSON at line 3"})
    monkeypatch.setattr(runctl, "get_scheduler", lambda name, s: stand_in)
    result = runctl.requeue(registry, settings(), RunFilter(run_ids=tuple(run_ids)),
                            dry_run=True)
    with registry.session() as session:
        key_of = {run.id: run.key for run in session.scalars(select(Run))}
    assert result.requeued == [(run_ids[3], key_of[run_ids[3]])]
    assert set(result.skipped) == {key_of[rid] for rid in run_ids[:3]}
    assert result.skipped[key_of[run_ids[0]]] == (
        "job 81_0 is still listed in state 'RESV_DEL_HOLD2' in slurm: requeue it once it has "
        "stopped")
    assert "job 81_1 is still listed (its record could not be read)" in \
        result.skipped[key_of[run_ids[1]]]
    assert "job 81_2 is still running" in result.skipped[key_of[run_ids[2]]]
    registry.dispose()


class QueryFails(StandIn):
    """A stand-in whose lookups by name fail as a missing qstat/squeue does."""

    def find_by_names(self, names: Sequence[str],
                      sizes: dict[str, int] | None = None) -> dict[str, dict[int, str]]:
        self.lookups.append(list(names))
        run_command(["satrl-no-such-query-command"])
        raise AssertionError("the query command must not exist")


@pytest.mark.parametrize("unstartable", ["missing", "not executable"])
def test_a_submit_command_that_cannot_be_started_releases_the_claim_at_once(
        workspace: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        unstartable: str) -> None:
    from orchestrator.errors import SchedulerError

    run_ids = _queue_four(workspace, capsys)
    registry = Registry(settings().database_url)
    command = tmp_path / "qsub"
    if unstartable == "not executable":
        command.write_text("#!/bin/sh\necho 1.server\n")  # mode 0644: PermissionError
    # Nothing was submitted, so nothing is looked up: (the query command is missing too, as on
    # a machine without the scheduler's tools) the claim must not wait for it.
    stand_in = QueryFails({}, [str(command)])
    with pytest.raises(SchedulerError) as raised:
        dispatching.submit_batch(registry, stand_in, _planned(run_ids, "satrl-6666666666",
                                                              tmp_path))
    message = str(raised.value)
    assert "nothing was submitted: 4 run(s) stay queued" in message, message
    assert "is unknown" not in message and len(message.splitlines()) == 1
    assert stand_in.lookups == []
    assert set(_states(registry).values()) == {"queued"} and _jobs(registry) == {}
    with registry.session() as session:
        whys = list(session.scalars(select(Event.why).where(Event.to_state == "queued",
                                                            Event.from_state == "submitted")))
    assert len(whys) == 4 and all(w.startswith("submission failed: ") for w in whys)
    registry.dispose()


def test_dispatch_to_pbs_without_qsub_leaves_the_runs_queued_and_blocks_nothing(
        workspace: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    run_ids = _queue_four(workspace, capsys)
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # no qsub, no qstat
    for _ in range(2):  # and again: the same answer, nothing left behind
        code, out, err = cli(capsys, "dispatch", "--backend", "pbs", "--games", "Pong")
        assert code == 4 and len(err.strip().splitlines()) == 1, err
        assert "qsub not found on PATH" in err and "nothing was submitted" in err
        assert "unknown" not in err
        registry = Registry(settings().database_url)
        assert set(_states(registry).values()) == {"queued"} and _jobs(registry) == {}
        registry.dispose()
    assert len(run_ids) == 4


def test_a_pending_batch_whose_scheduler_cannot_be_asked_blocks_no_other_dispatch_or_cancel(
        workspace: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from orchestrator import reconcile, runctl

    run_ids = _queue_four(workspace, capsys)
    registry = Registry(settings().database_url)
    # An earlier dispatch to pbs left a claim whose fate is unknown (token, no id), and qstat
    # cannot be run here.
    token = "satrl-7777777777"
    assert dispatching.claim_runs(registry, "pbs", _batch(run_ids[:1], token, tmp_path)) \
        == {run_ids[0]}
    with registry.write() as session:  # long past the grace period
        session.execute(update(Job).values(submitted_at=datetime.now(UTC) - timedelta(hours=1)))
    unaskable, slurm = QueryFails(), AcceptsOnce()

    def get_scheduler(name: str, _settings: object) -> Scheduler:
        return unaskable if name == "pbs" else slurm

    for module in (dispatching, runctl, reconcile):
        monkeypatch.setattr(module, "get_scheduler", get_scheduler)

    code, out, err = cli(capsys, "dispatch", "--backend", "slurm")
    assert code == 0 and "dispatched 3 run(s) to slurm as 90_0 .. 90_2" in out, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("warning: "), err
    assert token in err and "satrl-no-such-query-command not found on PATH" in err
    states = _states(registry)
    assert [states[rid] for rid in run_ids] == ["submitted"] * 4
    assert _jobs(registry)[run_ids[0]][0] is None  # still pending, for a later recovery

    # status/sync: the pending run is neither lost (nobody could ask about it) nor a failure.
    result = reconcile.reconcile(registry, settings(), force=True, now=time.time())
    assert any(token in error for error in result.errors), result.errors
    assert _states(registry)[run_ids[0]] == "submitted"

    # Cancelling other runs goes on too (with the same one-line warning).
    with registry.session() as session:
        refs = [run.key for run in session.scalars(select(Run).where(Run.id.in_(run_ids[1:3])))]
    code, out, err = cli(capsys, "cancel", *refs)
    assert code == 0 and "cancelled 2 run(s) (2 scheduler job(s))" in out, err
    assert len(err.strip().splitlines()) == 1 and token in err, err
    assert slurm.cancelled == [["90_0", "90_1"]]
    states = _states(registry)
    assert [states[rid] for rid in run_ids] == ["submitted", "cancelled", "cancelled",
                                                "submitted"]
    registry.dispose()


def test_one_reply_omitting_a_job_after_a_quiet_hour_does_not_make_it_lost(
        workspace: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from orchestrator import reconcile
    from orchestrator.schedulers.base import JobState, JobStatus

    run_ids = _queue_four(workspace, capsys)[:1]
    registry = Registry(settings().database_url)
    token = "satrl-ffffffffff"
    dispatching.claim_runs(registry, "slurm", _batch(run_ids, token, tmp_path))
    dispatching.record_submission(registry, token, {0: "81"}, None)
    now = time.time()
    with registry.write() as session:
        session.execute(update(Job).values(submitted_at=datetime.fromtimestamp(now - 7200, UTC)))
    stand_in = StandIn()
    monkeypatch.setattr(dispatching, "get_scheduler", lambda name, s: stand_in)
    monkeypatch.setattr(reconcile, "get_scheduler", lambda name, s: stand_in)
    grace_s = reconcile.DEFAULT_LOST_GRACE_S

    # Listed as pending an hour ago; nobody asked since.
    stand_in.reply = PollResult({"81": JobStatus("81", JobState.PENDING, "PENDING")})
    reconcile.reconcile(registry, settings(), force=True, now=now - 3600)
    assert _states(registry)[run_ids[0]] == "submitted"
    # The first reply that omits it (a scheduler hiccup): not lost, however long the quiet was.
    stand_in.reply = PollResult()
    reconcile.reconcile(registry, settings(), force=True, now=now)
    assert _states(registry)[run_ids[0]] == "submitted"
    # Still omitted a grace period after that first omission: lost.
    reconcile.reconcile(registry, settings(), force=True, now=now + grace_s / 2)
    assert _states(registry)[run_ids[0]] == "submitted"
    reconcile.reconcile(registry, settings(), force=True, now=now + grace_s + 1)
    assert _states(registry)[run_ids[0]] == "lost"
    registry.dispose()


def test_logs_are_numbered_as_show_numbers_the_jobs_when_one_never_started(
        workspace: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Attempt 1 was cancelled while pending (no log), attempt 2 ran and wrote
    logs/attempt-1.*: `show` said attempt 2, `logs --attempt 2` said there was none."""
    run_ids = _queue_four(workspace, capsys)
    registry = Registry(settings().database_url)
    run_dir = tmp_path / "run"
    (run_dir / "logs").mkdir(parents=True)
    (run_dir / "logs" / "attempt-1.out").write_text(
        "satrl job: batch satrl-bbbbbbbbbb, index 0, log 1, host h, 2026-12-02T00:00:00Z\n"
        "trained\n")
    (run_dir / "logs" / "attempt-1.err").write_text("")
    with registry.write() as session:
        session.execute(update(Run).where(Run.id == run_ids[0]).values(
            run_dir=str(run_dir), attempts=2, state="succeeded"))
        for attempt, token in ((1, "satrl-aaaaaaaaaa"), (2, "satrl-bbbbbbbbbb")):
            session.add(Job(run_id=run_ids[0], attempt=attempt, backend="slurm", batch=token,
                            array_index=0, job_id=f"{attempt}_0"))
        key = session.get(Run, run_ids[0]).key
    registry.dispose()
    for args in ((), ("--attempt", "2")):
        code, out, err = cli(capsys, "logs", key, "--stream", "out", *args)
        assert code == 0 and out.endswith("trained\n"), (args, err)
    code, out, err = cli(capsys, "logs", key, "--attempt", "1")
    assert code == 2 and "has no logs of attempt 1 (its job never started); attempts with " \
        "logs: 2" in err, err
