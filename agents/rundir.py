"""The run directory on disk: file names, atomic writes, checksums and the manifest.

ARCHITECTURE.md, "The one contract between the two halves". Everything here is standard library
(plus agents.spec), so the orchestrator may import it without pulling in torch.

Every file is written to a hidden temporary name in its own folder (`.<name>.<random>.tmp`),
flushed, fsynced and renamed over the target with `os.replace`: a reader, or a fetch that copies
the directory, sees the old file or the new one, never half of one. A worker killed mid-write
leaves only a hidden temporary, which the next attempt deletes (`remove_temp_files`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from agents.spec import RunSpec

#: Layout version of the worker's JSON files (status, exit, provenance, manifest).
FILE_SCHEMA = 1

RUN_JSON = "run.json"
STATUS_JSON = "status.json"
EXIT_JSON = "exit.json"
PROVENANCE_JSON = "provenance.json"
MANIFEST_JSON = "manifest.json"
METRICS_CSV = "metrics.csv"
EVALUATIONS_NPZ = "evaluations.npz"
CHECKPOINTS_DIR = "checkpoints"
OBSERVATIONS_DIR = "observations"
MONITOR_DIR = "monitor"
TB_DIR = "tb"
LOGS_DIR = "logs"
#: Held (flock) by the worker training in the directory; not part of the contract's files.
WORKER_LOCK = ".worker.lock"

_CHECKPOINT_RE = re.compile(r"^model_checkpoint_(\d+)_steps\.zip$")
_OBSERVATION_RE = re.compile(r"^obs_(\d+)_(\d+)\.npy$")
_TEMP_RE = re.compile(r"^\..+\.tmp$")

#: Files the final manifest leaves out: itself, exit.json (written after it) and the job's logs.
_NOT_IN_MANIFEST = {MANIFEST_JSON, EXIT_JSON}


# --- atomic writes -------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_writer(path: Path) -> Iterator[IO[bytes]]:
    """Open a temporary file next to `path` for writing; on success it replaces `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        # mkstemp makes the file 0600; give it the mode a plain open() would (0666 & ~umask),
        # so that results on a shared filesystem stay readable by the group as usual.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process's umask, read without changing it (os.umask would, for every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def write_bytes(path: Path, data: bytes) -> None:
    """Atomically write `data` to `path`."""
    with atomic_writer(path) as handle:
        handle.write(data)


def write_json(path: Path, body: dict[str, Any]) -> None:
    """Atomically write a worker JSON file; `"schema"` comes first and is always FILE_SCHEMA."""
    content = {"schema": FILE_SCHEMA, **{k: v for k, v in body.items() if k != "schema"}}
    write_bytes(path, (json.dumps(content, indent=2) + "\n").encode())


def complete_lines(text: str) -> str:
    """`text` up to its last newline: the lines an appending writer (metrics.csv, a monitor
    CSV) has finished; an unterminated last line is one being written, or cut by a kill."""
    return text[: text.rfind("\n") + 1]


def read_json(path: Path) -> Any:
    """The parsed content of a JSON file, or None if it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_run_json(run_dir: Path, spec: RunSpec) -> Path:
    """Create `run_dir` (if needed) and write the spec as its run.json; returns the file's path.

    This is what the orchestrator does before submitting a job, and what tests call to make a
    run directory for `python -m agents.train RUN_DIR`.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / RUN_JSON
    write_bytes(path, (json.dumps(spec.to_dict(), indent=2) + "\n").encode())
    return path


def remove_temp_files(run_dir: Path) -> list[Path]:
    """Delete temporaries left by a killed writer (never a finished file); returns them."""
    removed = []
    for path in run_dir.rglob(".*.tmp"):
        if path.is_file() and _TEMP_RE.match(path.name):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


# --- names -----------------------------------------------------------------------------------
def checkpoint_path(run_dir: Path, steps: int) -> Path:
    """checkpoints/model_checkpoint_<steps>_steps.zip."""
    return run_dir / CHECKPOINTS_DIR / f"model_checkpoint_{steps}_steps.zip"


def observation_path(run_dir: Path, steps: int, k: int) -> Path:
    """observations/obs_<steps>_<k>.npy, k = 0 ... obs_dump_count - 1."""
    return run_dir / OBSERVATIONS_DIR / f"obs_{steps}_{k}.npy"


def checkpoint_step(path: Path) -> int | None:
    """The step count in a checkpoint's file name, None if the name is not a checkpoint's."""
    match = _CHECKPOINT_RE.match(path.name)
    return int(match.group(1)) if match else None


def observation_step(path: Path) -> int | None:
    """The step count in an observation dump's file name, None if not a dump's."""
    match = _OBSERVATION_RE.match(path.name)
    return int(match.group(1)) if match else None


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(steps, path) of every checkpoint file, oldest first."""
    folder = run_dir / CHECKPOINTS_DIR
    if not folder.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in folder.iterdir() if p.is_file()]
    return sorted((step, p) for step, p in found if step is not None)


# --- manifest --------------------------------------------------------------------------------
def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's content."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def monitor_step(frames_total: int, n_envs: int, frame_skip: int) -> int:
    """The agent step at which a training env's episode ends, from its env's frames so far.

    The Monitor sits inside the AtariWrapper, so a monitor CSV's `l` counts emulator frames of
    one env; the envs step in lockstep, so F frames of one env are near agent step
    F / frame_skip x n_envs (summed over envs, like every step count of the study).
    """
    return round(frames_total / frame_skip) * n_envs


#: The key of the line a resumed attempt appends to each training monitor CSV:
#: `#{"resumed_from_step": N}`. The attempt resets its envs at step N, so the episode each env
#: was playing when the last attempt stopped is never finished: frames since this line count
#: from N, not from the frames of the lines above it.
RESUME_MARK_KEY = "resumed_from_step"


def resume_mark(step: int) -> str:
    return f"#{json.dumps({RESUME_MARK_KEY: step})}\n"


class MonitorClock:
    """The agent step at which each episode of a training monitor CSV ended, read in order:
    `monitor_step` of the frames since the last resume mark, from the mark's step."""

    def __init__(self, n_envs: int, frame_skip: int) -> None:
        self.n_envs, self.frame_skip = n_envs, frame_skip
        self.base_step, self.frames = 0, 0

    @staticmethod
    def mark_of(line: str) -> int | None:
        """The step of a resume mark line; None for any other line."""
        if not line.startswith(f'#{{"{RESUME_MARK_KEY}"'):
            return None
        try:
            value = json.loads(line[1:]).get(RESUME_MARK_KEY)
        except (ValueError, AttributeError):
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            return None
        return value

    def restart(self, step: int) -> None:
        self.base_step, self.frames = step, 0

    def end_of(self, frames: int) -> int:
        """The step at which an episode of `frames` frames, the next in the file, ended."""
        return self.base_step + monitor_step(self.frames + frames, self.n_envs, self.frame_skip)

    def advance(self, frames: int) -> None:
        self.frames += frames


def _rewrite_monitor(path: Path, choose: Callable[[list[str]], tuple[list[str], int]]) -> int:
    """Keep the lines of a monitor CSV that `choose` keeps (it returns them and the episodes
    it dropped); a line cut by a kill goes too, since the next attempt's Monitor appends to
    this file. The file is rewritten (atomically) only when it changes; returns the episodes
    dropped."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return 0  # nothing readable to trim; the fetch reports a broken file
    lines = complete_lines(text).splitlines(keepends=True)
    kept, dropped = choose(lines)
    if len(kept) != len(lines) or (text and not text.endswith("\n")):
        write_bytes(path, "".join(kept).encode())
    return dropped


def trim_monitor(path: Path, step: int, n_envs: int, frame_skip: int) -> int:
    """Drop a training monitor CSV's episodes that end after agent step `step` (a resume
    point), and resume marks beyond it: the attempt that played them was cut, and the next one
    plays that stretch again. Returns the episodes dropped."""
    def choose(lines: list[str]) -> tuple[list[str], int]:
        kept, dropped = [], 0
        clock = MonitorClock(n_envs, frame_skip)
        for line in lines:
            mark = clock.mark_of(line)
            if mark is not None:
                if mark <= step:
                    clock.restart(mark)
                    kept.append(line)
                continue
            cells = line.strip().split(",")
            if line.startswith("#") or cells[:2] == ["r", "l"] or len(cells) < 2:
                kept.append(line)
                continue
            try:
                frames = int(float(cells[1]))
            except ValueError:
                kept.append(line)
                continue
            if clock.end_of(frames) > step:
                dropped += 1
                continue
            clock.advance(frames)
            kept.append(line)
        return kept, dropped

    return _rewrite_monitor(path, choose)


def keep_monitor_episodes(path: Path, count: int) -> int:
    """Keep the first `count` episodes of a monitor CSV (the evaluation monitor: one line per
    episode evaluations.npz holds, in order). Returns the episodes dropped."""
    def choose(lines: list[str]) -> tuple[list[str], int]:
        kept, episodes = [], 0
        for line in lines:
            if not line.strip() or line.startswith("#") or line.split(",")[:2] == ["r", "l"]:
                kept.append(line)
            elif episodes < count:
                episodes += 1
                kept.append(line)
        return kept, len(lines) - len(kept)

    return _rewrite_monitor(path, choose)


def file_kind(relative: str) -> str | None:
    """The manifest kind of a file by its relative posix path; None for files left out."""
    top, _, rest = relative.partition("/")
    if not rest:
        return {
            RUN_JSON: "run_json",
            STATUS_JSON: "status",
            PROVENANCE_JSON: "provenance",
            METRICS_CSV: "metrics",
            EVALUATIONS_NPZ: "evaluations",
        }.get(top)
    # A stray file beside the checkpoints or dumps (an NFS silly-rename leftover, a README) is
    # not an artefact: listed, it would reach the fetch as a checkpoint without a step.
    if top == CHECKPOINTS_DIR:
        return "checkpoint" if _CHECKPOINT_RE.match(rest) else None
    if top == OBSERVATIONS_DIR:
        return "observation" if _OBSERVATION_RE.match(rest) else None
    return {MONITOR_DIR: "monitor", TB_DIR: "tensorboard"}.get(top)


class ManifestBuilder:
    """Builds manifest.json, hashing each immutable artefact (checkpoint, observation) once.

    A paper run has ~21 checkpoints of ~8 MB; the manifest is rewritten after each one, so their
    digests are cached by (size, mtime) rather than recomputed. Live files are always rehashed.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self._cache: dict[str, tuple[int, int, str]] = {}

    def entries(self) -> list[dict[str, Any]]:
        """One entry per file of the contract, sorted by path.

        Symbolic links are left out: the worker writes none, the fetch refuses them, and a link
        would put a file from outside the run directory under its name.
        """
        entries = []
        for path in sorted(self.run_dir.rglob("*")):
            if path.is_symlink() or not path.is_file() or _TEMP_RE.match(path.name):
                continue
            relative = path.relative_to(self.run_dir).as_posix()
            kind = file_kind(relative)
            if relative in _NOT_IN_MANIFEST or kind is None:
                continue
            try:
                stat = path.stat()
                digest = self._digest(relative, path, stat, immutable=kind in (
                    "checkpoint", "observation"))
            except FileNotFoundError:  # replaced or dropped between listing and hashing
                continue
            step = checkpoint_step(path) if kind == "checkpoint" else (
                observation_step(path) if kind == "observation" else None)
            entries.append({"path": relative, "kind": kind, "size": stat.st_size,
                            "sha256": digest, "step": step})
        return entries

    def _digest(self, relative: str, path: Path, stat: os.stat_result, immutable: bool) -> str:
        # The inode too: os.replace() gives a rewritten checkpoint a new one, while size and a
        # coarse (one-second) mtime on Lustre or NFS can stay the same.
        key = (stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_ctime_ns)
        cached = self._cache.get(relative)
        if immutable and cached is not None and cached[:-1] == key:
            return cached[-1]
        digest = sha256_file(path)
        self._cache[relative] = (*key, digest)
        return digest

    def write(self, final: bool) -> dict[str, Any]:
        """Write manifest.json; `final` only at exit, when every other file is closed."""
        body = {"updated_at": time.time(), "final": final, "files": self.entries()}
        write_json(self.run_dir / MANIFEST_JSON, body)
        return {"schema": FILE_SCHEMA, **body}


def verify_manifest(run_dir: Path) -> list[str]:
    """Problems of a run directory against its manifest (empty when every checksum matches)."""
    manifest = read_json(run_dir / MANIFEST_JSON)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), list):
        return ["manifest.json is missing or malformed"]
    problems = []
    for entry in manifest["files"]:
        path = run_dir / entry["path"]
        if not path.is_file():
            problems.append(f"{entry['path']}: missing")
        elif path.stat().st_size != entry["size"]:
            problems.append(f"{entry['path']}: size {path.stat().st_size} != {entry['size']}")
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"{entry['path']}: sha256 mismatch")
    return problems
