"""Processes identified by pid *and* start time, so that a reused pid is never mistaken."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from agents import rundir
from agents.rundir import write_bytes


def start_ticks(pid: int) -> int | None:
    """The process's start time (clock ticks since boot, /proc/<pid>/stat field 22), or None
    if there is no such process or it is a zombie (exited, not yet reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rfind(")") + 2:].split()
    if not fields or fields[0] in ("Z", "X"):
        return None
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def is_alive(pid: int | None, ticks: int | None) -> bool:
    """The process `pid` that started at `ticks` is still running."""
    return pid is not None and ticks is not None and start_ticks(pid) == ticks


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """A runner's bookkeeping file, written like every run-directory file (temp, rename)."""
    write_bytes(path, json.dumps(data).encode())


def read_json(path: Path) -> dict[str, Any] | None:
    """A bookkeeping file's object, or None if it is missing, unreadable or not an object."""
    data = rundir.read_json(path)
    return data if isinstance(data, dict) else None
