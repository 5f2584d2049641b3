"""What a fetch takes from a run directory, where it goes in the store, which paths are safe.

Store layout of one run (`<store>/<experiment>/<Game>/<TYPE>/<seed>/`), browsable by a person:

    run.json  provenance.json  exit.json
    checkpoints/<Game>_<TYPE>_<seed>_model_checkpoint_<steps>_steps.zip   (the paper's names)
    observations/obs_<steps>_<k>.npy
    metrics/metrics.csv  metrics/evaluations.npz  metrics/monitor/*.monitor.csv  metrics/tb/...

status.json (a heartbeat), manifest.json and the job's logs/ are not fetched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath

from agents import rundir
from orchestrator import paths
from orchestrator.errors import UsageError

#: `--what` categories -> the manifest kinds they take.
WHAT_KINDS: dict[str, frozenset[str]] = {
    "checkpoints": frozenset({"checkpoint"}),
    "observations": frozenset({"observation"}),
    "metrics": frozenset({"metrics", "evaluations", "monitor", "tensorboard"}),
}
#: Kinds every fetch takes, whatever `--what` says: the run's identity and history.
RECORD_KINDS = frozenset({"run_json", "provenance", "exit"})
#: Kinds that never change once written: verified against the manifest even while a run goes on.
IMMUTABLE_KINDS = frozenset({"checkpoint", "observation"})

EXIT_JSON = rundir.EXIT_JSON
_CONTROL = re.compile(r"[\x00-\x1f\x7f\\]")


def parse_what(text: str | None) -> frozenset[str]:
    """`checkpoints,metrics` / `all` -> the manifest kinds to fetch (records always included)."""
    if not text or text.strip().lower() == "all":
        return frozenset().union(*WHAT_KINDS.values()) | RECORD_KINDS
    kinds: set[str] = set(RECORD_KINDS)
    for item in (part.strip().lower() for part in text.split(",")):
        if item == "all":
            kinds.update(*WHAT_KINDS.values())
        elif item in WHAT_KINDS:
            kinds.update(WHAT_KINDS[item])
        elif item:
            from orchestrator.catalog import nearest

            raise UsageError(f"--what: unknown category {item!r}{nearest(item, list(WHAT_KINDS))};"
                             f" categories: {', '.join(WHAT_KINDS)}, all")
    return frozenset(kinds)


@dataclass(frozen=True)
class CheckpointChoice:
    """`--checkpoints`: every checkpoint, the newest one, or these step counts."""

    mode: str  # "all" | "last" | "steps"
    steps: frozenset[int] = frozenset()

    @classmethod
    def parse(cls, text: str | None, default: str) -> CheckpointChoice:
        value = (text or default).strip().lower()
        if value in ("all", "last"):
            return cls(value)
        try:
            steps = frozenset(int(float(item)) for item in value.replace("_", "").split(",")
                              if item.strip())
        except ValueError:
            raise UsageError(f"--checkpoints takes all, last or a comma list of step counts, "
                             f"not {text!r}") from None
        if not steps or min(steps) < 0:
            raise UsageError(f"--checkpoints: no valid step count in {text!r}")
        return cls("steps", steps)

    def select(self, available: list[int]) -> set[int]:
        """The chosen steps among those a run has."""
        if self.mode == "all":
            return set(available)
        if self.mode == "last":
            return {max(available)} if available else set()
        return self.steps & set(available)


def kind_of(relative: str) -> str | None:
    """The kind of a run-directory file by its path (None: not something a fetch takes).

    A file beside the checkpoints or dumps whose name is not one (an NFS silly-rename leftover
    `.nfs...`, a README) is None: `rundir.file_kind` only names files whose name holds a step,
    which matters here because an older worker's manifest lists such files.
    """
    if relative == EXIT_JSON:
        return "exit"
    kind = rundir.file_kind(relative)
    return None if kind == "status" else kind


def path_problem(relative: object) -> str | None:
    """Why a manifest path must not be followed, or None when it is a plain path inside the run.

    Refused: non-strings, absolute paths, `..`, `.` or empty components, backslashes and control
    characters (which could smuggle another path past a reader of the listing).
    """
    if not isinstance(relative, str) or not relative:
        return "not a path"
    if relative.startswith("/"):
        return "absolute path, outside the run directory"
    if _CONTROL.search(relative):
        return "control character or backslash in the path"
    parts = relative.split("/")
    if ".." in parts:
        return "'..' in the path, outside the run directory"
    if any(part in ("", ".") for part in parts):
        return "empty or '.' component in the path"
    return None


def store_relpath(relative: str, kind: str, game: str, attn: str, seed: int) -> str:
    """Where a run-directory file goes below the run's store folder."""
    if kind == "checkpoint":
        step = rundir.checkpoint_step(PurePosixPath(relative))
        if step is None:
            raise ValueError(f"{relative}: not a checkpoint name")
        return f"checkpoints/{paths.paper_checkpoint_name(game, attn, seed, step)}"
    if kind in ("metrics", "evaluations", "monitor", "tensorboard"):
        return f"metrics/{relative}"
    return relative


def step_of(relative: str, kind: str) -> int | None:
    """The step count in a checkpoint's or observation dump's name."""
    if kind == "checkpoint":
        return rundir.checkpoint_step(PurePosixPath(relative))
    if kind == "observation":
        return rundir.observation_step(PurePosixPath(relative))
    return None
