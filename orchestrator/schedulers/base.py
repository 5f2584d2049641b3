"""The small scheduler interface: submit a batch, poll many jobs in one call, cancel.

A backend overrides only what differs: the submit command line and its output, how one call lists
jobs, how jobs are cancelled and found by name. The job script is the same for every backend
(templates/job.sh.tmpl); only the variable holding the array index differs.
"""

from __future__ import annotations

import enum
import re
import shlex
import subprocess
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources as package_files
from pathlib import Path
from typing import Any, ClassVar

from agents.rundir import write_bytes
from orchestrator.errors import SchedulerError, UsageError
from orchestrator.resources import Resources

#: Seconds one scheduler command may take before it counts as failed.
COMMAND_TIMEOUT_S = 120.0


class JobState(enum.StrEnum):
    """A scheduler's word for a job, in satrl's vocabulary (the raw word is kept beside it)."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"
    #: The scheduler gave up on the job (node failure, preemption): like a job it forgot.
    LOST = "lost"
    #: Listed, but in a state this module does not know: never a reason to change anything.
    UNKNOWN = "unknown"

    def is_active(self) -> bool:
        return self in (JobState.PENDING, JobState.RUNNING, JobState.UNKNOWN)


@dataclass(frozen=True)
class JobStatus:
    """One job as the scheduler reported it."""

    job_id: str
    state: JobState
    #: The scheduler's own state word (stored on jobs.scheduler_state).
    raw_state: str
    exit_status: int | None = None
    node: str | None = None
    name: str | None = None
    #: The scheduler's comment (PBS) or reason (Slurm), for messages.
    detail: str = ""


@dataclass
class PollResult:
    """What one poll learnt: the jobs it listed, and those it listed but could not read."""

    jobs: dict[str, JobStatus] = field(default_factory=dict)
    #: job id -> why its record could not be read (it is listed, so it is not lost).
    unreadable: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class BatchMember:
    """One run of a batch; its position in `Batch.members` is its array index."""

    run_id: int
    run_dir: Path


@dataclass(frozen=True)
class Batch:
    """Runs submitted together (an array where the backend has arrays)."""

    #: The dispatch token: the job's name, recorded before submission (crash recovery).
    token: str
    members: tuple[BatchMember, ...]
    resources: Resources
    #: Folder of the job script and the scheduler's own output files.
    folder: Path
    #: The worker's command line before RUN_DIR: `python -m agents.train` or `apptainer exec ...`.
    launch: tuple[str, ...]
    #: Exported as SATRL_IMAGE_DIGEST where the job runs in a recorded image.
    image_digest: str | None = None
    #: Seconds before the time limit the warning signal (USR1) is due, where the backend has one.
    signal_margin_s: int = 300

    @property
    def script_path(self) -> Path:
        return self.folder / "job.sh"


@dataclass(frozen=True)
class Submission:
    """The ids the scheduler gave a batch: one per member, in member order."""

    job_ids: tuple[str, ...]
    #: The array's own id (PBS `12[].server`, Slurm `12`), None for a plain job.
    array_job_id: str | None = None


class CommandNotStarted(SchedulerError):
    """A scheduler command that could not be started at all (not installed, not executable):
    it did nothing, so whatever it was to do (a submission) certainly did not happen."""

    def __init__(self, message: str, *, command: list[str] | None = None,
                 script: str | None = None) -> None:
        super().__init__(message, command=command, script=script)
        #: The message without the command and script details (to build on it).
        self.reason = message


def run_command(command: Sequence[str], *, script: Path | None = None,
                timeout_s: float = COMMAND_TIMEOUT_S,
                ok_codes: Sequence[int] = (0,)) -> subprocess.CompletedProcess[str]:
    """Run a scheduler command (no shell); SchedulerError with command and stderr on failure,
    CommandNotStarted where it could not even be started (then it did nothing).

    Output is read as UTF-8 with undecodable bytes replaced: qstat lists every user's jobs, and
    one Latin-1 byte in somebody's environment must not make the whole reply unreadable.
    """
    try:
        completed = subprocess.run(list(command), capture_output=True, encoding="utf-8",
                                   errors="replace", timeout=timeout_s,
                                   stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise CommandNotStarted(f"{command[0]} not found on PATH: is this a login node of the "
                                "cluster?", command=list(command),
                                script=str(script) if script else None) from None
    except PermissionError:
        raise CommandNotStarted(f"{command[0]} cannot be executed (permission denied)",
                                command=list(command),
                                script=str(script) if script else None) from None
    except subprocess.TimeoutExpired:
        raise SchedulerError(f"{command[0]} did not answer within {timeout_s:.0f} s",
                             command=list(command), script=str(script) if script else None
                             ) from None
    if completed.returncode not in ok_codes:
        raise SchedulerError(f"{command[0]} failed with exit code {completed.returncode}",
                             command=list(command), stderr=completed.stderr,
                             script=str(script) if script else None)
    return completed


def config_number(table: dict[str, Any], key: str, default: float, source: str, *,
                  kind: type = int, minimum: float = 0) -> float:
    """A number of a satrl.toml table, checked: UsageError naming it and its table otherwise."""
    import math

    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value):
        raise UsageError(f"{source}: {key} must be a number, not {value!r}")
    if kind is int and not float(value).is_integer():
        raise UsageError(f"{source}: {key} must be a whole number, not {value!r}")
    if value < minimum:
        raise UsageError(f"{source}: {key} must be >= {minimum:g}, not {value!r}")
    return int(value) if kind is int else float(value)


def config_flag(table: dict[str, Any], key: str, default: bool, source: str) -> bool:
    """A true/false setting of a satrl.toml table: `auto_requeue = "false"` is refused, not
    read as true."""
    value = table.get(key, default)
    if not isinstance(value, bool):
        raise UsageError(f"{source}: {key} must be true or false, not {value!r}")
    return value


def _template() -> str:
    return (package_files.files("orchestrator.schedulers") / "templates" / "job.sh.tmpl"
            ).read_text()


class Scheduler(ABC):
    """One backend. `config` is its satrl.toml table; `settings` the workspace's settings."""

    name: ClassVar[str]
    #: The environment variable holding the array index inside a job.
    index_variable: ClassVar[str]
    #: Seconds between two polls of the scheduler (shared by every satrl process).
    default_poll_interval_s: ClassVar[float] = 30.0

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        self.config = dict(config or {})

    def check_config(self) -> None:
        """Refuse (UsageError) a value of this backend's satrl.toml table that a dispatch
        would trip over, before anything is claimed; backends add their own settings."""
        _ = self.poll_interval_s

    @property
    def poll_interval_s(self) -> float:
        return float(config_number(self.config, "poll_interval_s", self.default_poll_interval_s,
                                   f"satrl.toml [{self.name}]", kind=float, minimum=0))

    @property
    def max_running(self) -> int | None:
        """How many members of an array may run at once (`-J ...%n`, `--array=...%n`); None
        (no limit) where satrl.toml does not say. A value given must be a whole number >= 1:
        the scheduler would refuse `%0`, `%-2` or `%4x` only at submission, if at all."""
        if "max_running" not in self.config:
            return None
        return int(config_number(self.config, "max_running", 1, f"satrl.toml [{self.name}]",
                                 minimum=1))

    # --- the job script ------------------------------------------------------------------
    def render_script(self, batch: Batch) -> str:
        """The bash script every member of `batch` runs; every path in it is shell-quoted."""
        run_dirs = "\n".join(f"  {shlex.quote(str(m.run_dir))}" for m in batch.members)
        exports = (f"export SATRL_IMAGE_DIGEST={shlex.quote(batch.image_digest)}"
                   if batch.image_digest else "# no image digest to export")
        values = {
            "@TOKEN@": batch.token,
            "@COUNT@": str(len(batch.members)),
            "@RUN_DIRS@": run_dirs,
            "@INDEX_VAR@": self.index_variable,
            "@WALLTIME_S@": str(batch.resources.walltime_s),
            "@EXPORTS@": exports,
            "@LAUNCH@": " ".join(shlex.quote(part) for part in batch.launch),
        }
        # One pass: a value holding a placeholder (a path with @LAUNCH@ in it) stays as it is.
        return re.sub(r"@[A-Z_]+@", lambda m: values.get(m.group(0), m.group(0)), _template())

    def write_script(self, batch: Batch) -> Path:
        """Write the job script into the batch folder (temp name, then renamed)."""
        batch.folder.mkdir(parents=True, exist_ok=True)
        path = batch.script_path
        write_bytes(path, self.render_script(batch).encode())
        path.chmod(0o755)
        return path

    # --- what a backend provides ---------------------------------------------------------
    @abstractmethod
    def submit_command(self, batch: Batch) -> list[str]:
        """The exact command line that submits `batch` (shown by `dispatch --dry-run`)."""

    @abstractmethod
    def submit(self, batch: Batch) -> Submission:
        """Write the script, submit it, return the ids (SchedulerError if refused)."""

    @abstractmethod
    def poll(self, job_ids: Sequence[str]) -> PollResult:
        """The state of many jobs in one scheduler call; jobs it does not list are omitted."""

    @abstractmethod
    def cancel(self, job_ids: Sequence[str]) -> None:
        """Cancel jobs (those already ended are not an error)."""

    @abstractmethod
    def find_by_names(self, names: Sequence[str],
                      sizes: dict[str, int] | None = None) -> dict[str, dict[int, str]]:
        """{job name: {array index: job id}} of the jobs with these names, in one call
        (`sizes`: members per name, for schedulers that may list a whole array as one job)."""
