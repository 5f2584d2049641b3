"""A malformed value in one run directory's files (a time out of range, an exit code of the wrong
type, NaN in provenance) is read as absent with a warning, and the round goes on for every other
run. On SQLite and PostgreSQL."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from orchestrator import dispatching, reconcile
from orchestrator.registry.db import Registry
from orchestrator.registry.models import Job, Run
from orchestrator.settings import settings
from tests.dispatch_support import cli
from tests.test_dispatch_recovery import StandIn, _dispatched, _queue_four


def _exit_json(run_dir: Path, **values: Any) -> None:
    body = {"schema": 1, "exit_code": 0, "reason": "done", "message": "trained",
            "attempt": 1, "ended_at": time.time(), **values}
    # json.dumps writes float("inf") as Infinity, as a careless writer would.
    (run_dir / "exit.json").write_text(json.dumps(body))


def _rows(registry: Registry) -> dict[int, tuple[str, str | None, int | None, Any]]:
    with registry.session() as session:
        return {rid: (state, reason, status, ended) for rid, state, reason, status, ended in
                session.execute(select(Run.id, Run.state, Job.reason, Job.exit_status,
                                       Job.ended_at).join(Job, Job.run_id == Run.id))}


@pytest.mark.parametrize(("bad", "shown"), [
    ({"ended_at": 1e20}, "ended_at 1e+20 is not a time between 2000 and 2200"),
    ({"ended_at": float("inf")}, "ended_at inf is not a time"),
    ({"ended_at": -1e20}, "ended_at -1e+20 is not a time"),
    ({"ended_at": 10**400}, "ended_at 1000000000"),
    ({"ended_at": "yesterday"}, "ended_at 'yesterday' is not a time"),
    ({"exit_code": 10**12}, "exit_code 1000000000000 is not an exit code"),
    ({"exit_code": "x"}, "exit_code 'x' is not an exit code"),
])
def test_a_malformed_exit_json_value_is_ignored_with_a_warning_and_the_round_goes_on(
        workspace: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch, bad: dict[str, Any], shown: str) -> None:
    run_ids = _queue_four(workspace, capsys)
    registry = Registry(settings().database_url)
    run_dirs = _dispatched(registry, run_ids, tmp_path, "satrl-8888888888")
    _exit_json(run_dirs[0], **bad)
    _exit_json(run_dirs[1], reason="failed", exit_code=3)
    monkeypatch.setattr(reconcile, "get_scheduler", lambda name, s: StandIn())
    monkeypatch.setattr(dispatching, "get_scheduler", lambda name, s: StandIn())

    code, out, err = cli(capsys, "sync", "--force")
    assert code == 0, err
    assert err.count("warning:") == 1 and shown in err, err
    assert str(run_dirs[0] / "exit.json") in err.replace("\n", "")
    rows = _rows(registry)
    # The bad value is absent: the run still ends as exit.json says, at the round's time.
    assert rows[run_ids[0]][:2] == ("succeeded", "done")
    assert rows[run_ids[0]][2] == (0 if "exit_code" not in bad else None)
    assert rows[run_ids[0]][3] is not None
    assert rows[run_ids[1]][:3] == ("failed", "failed", 3)
    assert [rows[rid][0] for rid in run_ids[2:]] == ["submitted", "submitted"]
    # `status` (a reconciling listing) works too, and a second round has nothing left to do.
    code, _, err = cli(capsys, "status")
    assert code == 0 and "Traceback" not in err, err
    registry.dispose()


def test_malformed_heartbeat_and_provenance_times_are_ignored(
        workspace: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    run_ids = _queue_four(workspace, capsys)
    registry = Registry(settings().database_url)
    run_dirs = _dispatched(registry, run_ids, tmp_path, "satrl-9999999999")
    now = time.time()
    # A heartbeat far in the future would keep the run "alive" for ever.
    (run_dirs[0] / "status.json").write_text(json.dumps({"updated_at": 1e20}))
    # An attempt that "started" in year 3e12: no datetime can hold it.
    _exit_json(run_dirs[1])
    (run_dirs[1] / "provenance.json").write_text(json.dumps(
        {"attempts": [{"started_at": 1e20, "host": "n1"}]}))
    # NaN, which PostgreSQL's JSON refuses (and the whole round's transaction with it).
    _exit_json(run_dirs[2])
    (run_dirs[2] / "provenance.json").write_text(json.dumps(
        {"attempts": [{"started_at": now, "host": "n2", "steps_per_s": float("nan")}]}))
    _exit_json(run_dirs[3])
    (run_dirs[3] / "provenance.json").write_text(json.dumps(
        {"attempts": [{"started_at": now, "host": "n3"}]}))
    monkeypatch.setattr(reconcile, "get_scheduler", lambda name, s: StandIn())
    monkeypatch.setattr(dispatching, "get_scheduler", lambda name, s: StandIn())

    result = reconcile.reconcile(registry, settings(), force=True, now=now)
    assert len(result.errors) == 2, result.errors
    assert "status.json: updated_at 1e+20 is not a time" in result.errors[0]
    assert "provenance.json: the newest attempt's entry holds NaN" in result.errors[1]
    assert [_rows(registry)[rid][0] for rid in run_ids] == ["submitted"] + ["succeeded"] * 3
    with registry.session() as session:
        provenance = dict(session.execute(select(Job.run_id, Job.provenance)).all())
    assert provenance[run_ids[1]] is None and provenance[run_ids[2]] is None
    assert provenance[run_ids[3]]["host"] == "n3"
    registry.dispose()
