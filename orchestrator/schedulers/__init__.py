"""Scheduler backends behind one small interface (base.Scheduler), chosen by name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator.errors import UsageError
from orchestrator.schedulers.base import Scheduler

BACKENDS = ("local", "slurm", "pbs")


def batches_folder(settings: Any) -> Path:
    """Where batch folders (job scripts, scheduler output, local runner records) live: beside
    the run directories on scratch, which compute nodes see too."""
    return Path(settings.scratch) / ".batches"


def python_interpreter(settings: Any) -> str:
    """The interpreter jobs run the worker with: satrl.toml [dispatch] python, else this one."""
    import sys

    value = settings.section("dispatch").get("python", sys.executable)
    if not isinstance(value, str) or not value.strip():
        raise UsageError(f"satrl.toml [dispatch]: python must be the path of an interpreter, "
                         f"not {value!r}")
    return value


def get_scheduler(name: str, settings: Any) -> Scheduler:
    """The backend `name`, configured from satrl.toml's table of the same name."""
    config = settings.section(name) if name in BACKENDS else {}
    if name == "local":
        from orchestrator.schedulers.local import LocalScheduler

        return LocalScheduler(config, batches_folder(settings), python_interpreter(settings))
    if name == "slurm":
        from orchestrator.schedulers.slurm import SlurmScheduler

        return SlurmScheduler(config)
    if name == "pbs":
        from orchestrator.schedulers.pbs import PbsScheduler

        return PbsScheduler(config)
    from orchestrator.catalog import nearest

    raise UsageError(f"unknown backend {name!r}{nearest(name, list(BACKENDS))}; "
                     f"backends: {', '.join(BACKENDS)}")
