"""Reading a run directory's own records (run.json, manifest.json, exit.json) without trusting them.

A malformed document is one clear line (`RunDirError`) and the run is not fetched. A manifest that
is well formed but names a hostile path keeps that entry, flagged: the fetch reports it per file.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from agents.spec import RunSpec, SpecError
from orchestrator.errors import UsageError
from orchestrator.store.layout import path_problem

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class RunDirError(UsageError):
    """A run directory whose records cannot be read: nothing of that run is fetched."""


@dataclass(frozen=True)
class ManifestEntry:
    """One file the worker vouches for: its size and sha256 when the manifest was written."""

    path: str
    kind: str
    size_bytes: int
    sha256: str
    step: int | None
    problem: str | None = None  # set when the path must not be followed


@dataclass(frozen=True)
class Manifest:
    final: bool
    entries: tuple[ManifestEntry, ...]

    @classmethod
    def empty(cls) -> Manifest:
        """A run that has not written its first manifest yet (no checkpoint so far)."""
        return cls(final=False, entries=())


def _json(data: bytes, name: str, where: str) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise RunDirError(f"{where}/{name} is not valid JSON: {error}") from None


def parse_manifest(data: bytes, where: str) -> Manifest:
    """manifest.json's content; raises RunDirError naming the first defect."""
    doc = _json(data, "manifest.json", where)
    prefix = f"{where}/manifest.json"
    if not isinstance(doc, dict) or not isinstance(doc.get("files"), list):
        raise RunDirError(f"{prefix} must be an object with a 'files' list")
    if doc.get("schema") != 1:
        raise RunDirError(f"{prefix} has schema {doc.get('schema')!r}; this satrl reads schema 1")
    if not isinstance(doc.get("final", False), bool):
        raise RunDirError(f"{prefix}: 'final' must be true or false")
    entries = []
    for index, item in enumerate(doc["files"]):
        here = f"{prefix}: files[{index}]"
        if not isinstance(item, dict):
            raise RunDirError(f"{here} is not an object")
        size, sha, step, kind = (item.get(k) for k in ("size", "sha256", "step", "kind"))
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise RunDirError(f"{here}: 'size' must be a byte count, not {size!r}")
        if not isinstance(sha, str) or not _SHA256.match(sha):
            raise RunDirError(f"{here}: 'sha256' must be 64 lowercase hex digits, not {sha!r}")
        if step is not None and (not isinstance(step, int) or isinstance(step, bool)):
            raise RunDirError(f"{here}: 'step' must be an integer or null, not {step!r}")
        if not isinstance(kind, str):
            raise RunDirError(f"{here}: 'kind' must be a string, not {kind!r}")
        path = item.get("path")
        problem = path_problem(path)
        entries.append(ManifestEntry(path=path if isinstance(path, str) else repr(path),
                                     kind=kind, size_bytes=size, sha256=sha, step=step,
                                     problem=problem))
    return Manifest(final=bool(doc.get("final", False)), entries=tuple(entries))


def parse_run_json(data: bytes, where: str) -> RunSpec:
    """run.json's spec, validated exactly as the worker validates it."""
    try:
        return RunSpec.from_dict(_json(data, "run.json", where))
    except SpecError as error:
        raise RunDirError(f"{where}/run.json: {error}") from None


def parse_exit(data: bytes, where: str) -> dict[str, Any]:
    """exit.json's content (the run has exited)."""
    doc = _json(data, "exit.json", where)
    if not isinstance(doc, dict) or not isinstance(doc.get("reason"), str):
        raise RunDirError(f"{where}/exit.json must be an object with a 'reason'")
    return doc
