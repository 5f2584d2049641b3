"""The local backend's runner: `python -m orchestrator.schedulers.local_runner BATCH_FOLDER`.

One detached runner per batch (the local analogue of a job array) runs the batch's job script once
per member, `SATRL_ARRAY_INDEX` set, at most `max_parallel` at once. Each member's record,
`members/<index>.json`, holds its pid and process start time while it runs and its exit code
after; a marker `cancel/<index>` (written by `satrl cancel`, which also sends SIGTERM) keeps a
member from starting, and a running one that outlives it by `kill_wait_s` gets SIGKILL. The
runner's own pid and start time are in `runner.json`. Each worker leads its own process group, as
a batch job does, so a cancel signals the worker and its environment processes together.

With a walltime (batch.json's `walltime_s` > 0) the runner ends a member the way Slurm ends a job
at its time limit: SIGTERM to its process group when the walltime is up, SIGKILL `kill_wait_s`
later if it is still there, and `timed_out` in its record. The worker normally stops first, on
SATRL_DEADLINE minus its margin; this is for one that hangs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from orchestrator.schedulers.procs import read_json, start_ticks, write_json_atomic

#: Seconds between two looks at the running members.
TICK_S = 0.2
#: Seconds between SIGTERM and SIGKILL at the walltime (Slurm's KillWait default).
DEFAULT_KILL_WAIT_S = 30.0


def member_path(folder: Path, index: int) -> Path:
    return folder / "members" / f"{index}.json"


def cancel_path(folder: Path, index: int) -> Path:
    return folder / "cancel" / str(index)


def run_batch(folder: Path) -> int:
    batch = read_json(folder / "batch.json")
    try:
        if batch is None:
            raise ValueError("missing or not a JSON object")
        count, max_parallel = int(batch["count"]), max(1, int(batch["max_parallel"]))
        walltime_s = float(batch.get("walltime_s", 0))
        kill_wait_s = float(batch.get("kill_wait_s", DEFAULT_KILL_WAIT_S))
    except (KeyError, TypeError, ValueError) as error:
        # One line in runner.log (not a traceback); no runner.json, so dispatch sees it fail.
        print(f"local runner: {folder}/batch.json is unreadable: {error}", file=sys.stderr)
        return 2
    script = str(folder / "job.sh")
    (folder / "members").mkdir(exist_ok=True)
    (folder / "cancel").mkdir(exist_ok=True)
    write_json_atomic(folder / "runner.json",
                      {"pid": os.getpid(), "start_ticks": start_ticks(os.getpid())})
    # The runner outlives the terminal that started it; a hang-up must not stop the batch.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    pending = list(range(count))
    running: dict[int, subprocess.Popen[bytes]] = {}
    started_at: dict[int, float] = {}
    terminated_at: dict[int, float] = {}  # members sent SIGTERM at their walltime
    cancelled_at: dict[int, float] = {}  # members whose cancel marker the runner has seen
    while pending or running:
        while pending and len(running) < max_parallel:
            index = pending.pop(0)
            if cancel_path(folder, index).exists():
                write_json_atomic(member_path(folder, index),
                                  {"index": index, "cancelled": True, "ended_at": time.time()})
                continue
            running[index] = _start(folder, script, index)
            started_at[index] = time.time()
        time.sleep(TICK_S)
        for index, process in list(running.items()):
            code = process.poll()
            if code is None:
                now = time.time()
                if cancel_path(folder, index).exists():
                    # `satrl cancel` sent SIGTERM; a worker that ignores it (hung, stopped) is
                    # killed kill_wait_s later, as Slurm and PBS do, and frees its slot.
                    if now - cancelled_at.setdefault(index, now) >= kill_wait_s:
                        _signal_group(process.pid, signal.SIGKILL)
                    continue
                if walltime_s <= 0 or now - started_at[index] < walltime_s:
                    continue
                if index not in terminated_at:
                    terminated_at[index] = now
                    _mark_timed_out(folder, index)
                    _signal_group(process.pid, signal.SIGTERM)
                elif now - terminated_at[index] >= kill_wait_s:
                    _signal_group(process.pid, signal.SIGKILL)
                continue
            record = read_json(member_path(folder, index)) or {"index": index}
            # A negative return code is a signal; report it like a shell would (128 + n).
            record.update(exit_code=code if code >= 0 else 128 - code, ended_at=time.time(),
                          cancelled=cancel_path(folder, index).exists())
            write_json_atomic(member_path(folder, index), record)
            del running[index]
    return 0


def _mark_timed_out(folder: Path, index: int) -> None:
    record = read_json(member_path(folder, index)) or {"index": index}
    record["timed_out"] = True
    write_json_atomic(member_path(folder, index), record)


def _signal_group(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # ended meanwhile
        os.killpg(pid, signum)


def _start(folder: Path, script: str, index: int) -> subprocess.Popen[bytes]:
    env = dict(os.environ, SATRL_ARRAY_INDEX=str(index))
    with (folder / f"local-{index}.out").open("ab") as log:
        process = subprocess.Popen(["bash", script], env=env, stdin=subprocess.DEVNULL,
                                   stdout=log, stderr=subprocess.STDOUT, cwd=folder,
                                   start_new_session=True)
    write_json_atomic(member_path(folder, index), {
        "index": index, "pid": process.pid, "start_ticks": start_ticks(process.pid),
        "started_at": time.time(),
    })
    return process


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m orchestrator.schedulers.local_runner BATCH_FOLDER",
              file=sys.stderr)
        return 2
    return run_batch(Path(args[0]))


if __name__ == "__main__":
    sys.exit(main())
