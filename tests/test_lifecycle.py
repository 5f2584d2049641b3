"""The run state machine and `decide`, over every combination of what can be observed."""

from __future__ import annotations

import itertools

import pytest

from orchestrator.errors import ConflictError
from orchestrator.lifecycle import (
    NOT_ASKED,
    TRANSITIONS,
    FileView,
    SchedulerView,
    can_transition,
    check_transition,
    decide,
)
from orchestrator.registry.models import Reason, RunState
from orchestrator.schedulers.base import JobState

S = RunState
NOW = 10_000.0
GRACE = 600.0

#: The moves the architecture names (ARCHITECTURE.md, "Run states"); all others are refused.
EXPECTED_MOVES = {
    (S.QUEUED, S.SUBMITTED), (S.QUEUED, S.CANCELLED),
    (S.SUBMITTED, S.RUNNING), (S.SUBMITTED, S.SUCCEEDED), (S.SUBMITTED, S.FAILED),
    (S.SUBMITTED, S.CANCELLED), (S.SUBMITTED, S.LOST), (S.SUBMITTED, S.QUEUED),
    (S.RUNNING, S.SUCCEEDED), (S.RUNNING, S.FAILED), (S.RUNNING, S.CANCELLED),
    (S.RUNNING, S.LOST),
    (S.FAILED, S.QUEUED), (S.CANCELLED, S.QUEUED), (S.LOST, S.QUEUED),
    (S.LOST, S.SUCCEEDED), (S.LOST, S.FAILED),
}


@pytest.mark.parametrize(("src", "dst"), list(itertools.product(S, S)))
def test_every_pair_of_states_is_allowed_exactly_when_listed(src: S, dst: S) -> None:
    assert can_transition(src, dst) == ((src, dst) in EXPECTED_MOVES)
    if (src, dst) in EXPECTED_MOVES:
        check_transition(src.value, dst.value)
    else:
        with pytest.raises(ConflictError, match=f"from {src.value} to {dst.value}"):
            check_transition(src, dst)


def test_state_graph_shape() -> None:
    assert set(TRANSITIONS) == set(S)
    assert not TRANSITIONS[S.SUCCEEDED]  # absorbing
    for state in S:
        assert state not in TRANSITIONS[state]
        if state.is_terminal() and state != S.SUCCEEDED:
            assert S.QUEUED in TRANSITIONS[state]  # requeue reaches every ended run
    for active in (S.SUBMITTED, S.RUNNING):
        assert {S.SUCCEEDED, S.FAILED, S.CANCELLED, S.LOST} <= TRANSITIONS[active]


EXIT_REASONS = [None, "done", "failed", "walltime", "signal"]
SCHEDULER_VIEWS = [NOT_ASKED, SchedulerView(True, None)] + [
    SchedulerView(True, state, status) for state in JobState
    for status in ((None, 0, 271, -29) if state in (JobState.COMPLETED, JobState.FAILED)
                   else (None,))]
HEARTBEATS = [None, NOW - 5, NOW - 2 * GRACE]
SINCES = [NOW - 10, NOW - 2 * GRACE]
CASES = list(itertools.product((S.SUBMITTED, S.RUNNING, S.LOST), EXIT_REASONS, SCHEDULER_VIEWS,
                               HEARTBEATS, SINCES, (NOW - 5, NOW - 2 * GRACE)))


@pytest.mark.parametrize(("current", "reason", "view", "heartbeat", "since", "exit_at"), CASES)
def test_decide_over_every_observation(current: S, reason: str | None, view: SchedulerView,
                                       heartbeat: float | None, since: float,
                                       exit_at: float) -> None:
    files = FileView(exit_reason=reason, exit_code=None, exit_at=exit_at if reason else None,
                     heartbeat_at=heartbeat)
    decision = decide(current, files, view, now=NOW, since=since, grace_s=GRACE)
    # Only allowed moves, and an ended attempt always carries its reason.
    assert decision.state == current or can_transition(current, decision.state)
    if decision.state != current and decision.state.is_terminal():
        assert decision.reason is not None and decision.why
    listed = view.state if view.listed else None
    # exit.json is the truth for what the worker did.
    if reason == "done":
        assert decision.state == S.SUCCEEDED and decision.reason == Reason.DONE
    elif reason == "walltime":
        assert decision.state == S.FAILED and decision.reason == Reason.WALLTIME
    elif reason == "failed":
        assert decision.state == S.FAILED and decision.reason == Reason.FAILED
    elif current == S.LOST:
        assert decision.state == S.LOST or reason == "signal"
    # A user's cancel and a scheduler's time limit win over the worker's "signal".
    if reason in (None, "signal") and current != S.LOST:
        if listed == JobState.CANCELLED:
            assert decision.state == S.CANCELLED and decision.reason == Reason.CANCELLED
        if listed == JobState.TIMEOUT:
            assert decision.state == S.FAILED and decision.reason == Reason.WALLTIME
    # Lost only from a fresh poll that omitted the job, after the grace, with no exit.json; from
    # the scheduler giving the job up (preemption, node failure), whatever signal the worker
    # saw; or from a successful end whose exit.json stayed invisible past the grace.
    completed_ok = listed == JobState.COMPLETED and view.exit_status in (None, 0)
    last_seen = heartbeat if heartbeat is not None else since
    if decision.state == S.LOST and current != S.LOST:
        assert decision.reason == Reason.LOST
        assert (reason is None and (listed == JobState.LOST or (
            view.asked and listed is None and NOW - since > GRACE) or (
            completed_ok and NOW - last_seen > GRACE))) or (
            reason == "signal" and listed == JobState.LOST)
    if current != S.LOST and listed == JobState.LOST and reason in (None, "signal"):
        assert decision.state == S.LOST
    # A successful end never fails a run for want of an exit.json: it waits, then is lost.
    if current != S.LOST and reason is None and completed_ok:
        assert decision.state == (S.LOST if NOW - last_seen > GRACE else current)
    if not view.asked and reason is None:
        assert decision.state in (current, S.RUNNING)
    # A signal without the scheduler's word waits (never a guess between cancel and walltime).
    if reason == "signal" and not view.asked:
        assert decision.state == current


def test_heartbeat_starts_a_submitted_run_and_an_omission_waits_for_the_grace() -> None:
    fresh = FileView(heartbeat_at=NOW - 1)
    omitted = SchedulerView(True, None)
    assert decide(S.SUBMITTED, fresh, NOT_ASKED, now=NOW, since=NOW, grace_s=GRACE).state \
        == S.RUNNING
    assert decide(S.RUNNING, FileView(), omitted, now=NOW, since=NOW - GRACE + 1,
                  grace_s=GRACE).state == S.RUNNING
    lost = decide(S.RUNNING, FileView(), omitted, now=NOW, since=NOW - GRACE - 1, grace_s=GRACE)
    assert lost.state == S.LOST and lost.reason == Reason.LOST
    # A fresh heartbeat keeps a run the scheduler forgot alive.
    assert decide(S.RUNNING, fresh, omitted, now=NOW, since=NOW - 10 * GRACE,
                  grace_s=GRACE).state == S.RUNNING


def test_pbs_exit_statuses_without_exit_json() -> None:
    killed = decide(S.RUNNING, FileView(), SchedulerView(True, JobState.FAILED, 271), now=NOW,
                    since=NOW, grace_s=GRACE)
    assert killed.state == S.FAILED and killed.reason == Reason.SIGNAL
    failed = decide(S.RUNNING, FileView(), SchedulerView(True, JobState.FAILED, 1), now=NOW,
                    since=NOW, grace_s=GRACE)
    assert failed.reason == Reason.FAILED


def test_a_preempted_job_whose_worker_saw_the_signal_is_lost_so_it_is_requeued() -> None:
    # PREEMPTED / NODE_FAIL: the worker wrote exit.json "signal"; the scheduler's LOST wins,
    # as it does without exit.json, so auto-requeue resumes the run from its checkpoint.
    files = FileView(exit_reason="signal", exit_code=143, exit_at=NOW - 5)
    for current in (S.SUBMITTED, S.RUNNING):
        decision = decide(current, files, SchedulerView(True, JobState.LOST, None, "PREEMPTED"),
                          now=NOW, since=NOW, grace_s=GRACE)
        assert (decision.state, decision.reason) == (S.LOST, Reason.LOST)
        assert "PREEMPTED" in decision.why
    without_file = decide(S.RUNNING, FileView(), SchedulerView(True, JobState.LOST), now=NOW,
                          since=NOW, grace_s=GRACE)
    assert (without_file.state, without_file.reason) == (S.LOST, Reason.LOST)


@pytest.mark.parametrize("exit_status", [0, None])
def test_a_completed_job_whose_exit_json_is_not_visible_yet_waits_then_is_lost(
        exit_status: int | None) -> None:
    completed = SchedulerView(True, JobState.COMPLETED, exit_status)
    # NFS on the login node may hide the new exit.json for a while: the run stays as it is.
    beating = FileView(heartbeat_at=NOW - 30)
    assert decide(S.RUNNING, beating, completed, now=NOW, since=NOW - 10,
                  grace_s=GRACE).state == S.RUNNING
    assert decide(S.SUBMITTED, FileView(), completed, now=NOW, since=NOW - 10,
                  grace_s=GRACE).state == S.SUBMITTED
    # Past the grace since the worker was last seen: lost (never failed, which is final) ...
    quiet = FileView(heartbeat_at=NOW - GRACE - 1)
    lost = decide(S.RUNNING, quiet, completed, now=NOW, since=NOW - 10, grace_s=GRACE)
    assert (lost.state, lost.reason) == (S.LOST, Reason.LOST)
    assert "exit.json is still not visible" in lost.why
    assert decide(S.SUBMITTED, FileView(), completed, now=NOW, since=NOW - GRACE - 1,
                  grace_s=GRACE).state == S.LOST
    # ... from which the exit file, once visible, still settles the run.
    done = decide(S.LOST, FileView(exit_reason="done", exit_at=NOW - 700), NOT_ASKED, now=NOW,
                  since=NOW, grace_s=GRACE)
    assert (done.state, done.reason) == (S.SUCCEEDED, Reason.DONE)
    # A job that ended with a failure still fails at once.
    failed = decide(S.RUNNING, FileView(), SchedulerView(True, JobState.FAILED, 1), now=NOW,
                    since=NOW, grace_s=GRACE)
    assert (failed.state, failed.reason) == (S.FAILED, Reason.FAILED)
