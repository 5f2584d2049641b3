"""A lenient reader of `qstat -f -F json` as real PBS servers print it.

Known defects in the wild (CLUSTER.md): environment values written without escaping (a
`BASH_FUNC_x%%` body with raw newlines and quotes, anything `-V` exported) and numbers with
leading zeros make the whole document invalid JSON. The reader tries, in order:

1. the document as it is (control characters inside strings allowed);
2. the document with leading zeros stripped from numbers;
3. job by job: PBS prints one attribute per line, jobs at two tabs of indentation; each job's
   text is read alone, then without its Variable_List (the usual culprit), and a job that still
   cannot be read is reported by id instead of spoiling the others.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from orchestrator.errors import SchedulerError

_JOB_START = re.compile(r'^\t\t"(?P<id>[^"\n]+)":\s*\{\s*$', re.MULTILINE)
_JOB_END = re.compile(r"^\t\t\},?\s*$", re.MULTILINE)
#: A job whose record is not an object (`"1.x": "garbage",`): listed, so unreadable, not absent.
_OTHER_RECORD = re.compile(r'^\t\t"(?P<id>[^"\n]+)":[ \t]*(?P<value>[^{\s][^\n]*)$',
                           re.MULTILINE)
_VARIABLE_LIST = re.compile(r'^\t\t\t"Variable_List":\s*\{.*?^\t\t\t\},?[ \t]*\n',
                            re.MULTILINE | re.DOTALL)


@dataclass
class QstatDocument:
    """The jobs of one qstat reply, and the ids of those that could not be read."""

    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    unreadable: dict[str, str] = field(default_factory=dict)
    timestamp: int | None = None


def strip_leading_zeros(text: str) -> str:
    """Remove leading zeros of numbers outside strings (`007` -> `7`, `-00.5` -> `-0.5`).

    Only a number's integer part is touched: a number starts after `:`, `,` or `[`.
    """
    out: list[str] = []
    i, n = 0, len(text)
    in_string = False
    previous = ""  # the last character outside strings that is not white space
    while i < n:
        char = text[i]
        if in_string:
            if char == "\\" and i + 1 < n:
                out.append(text[i:i + 2])
                i += 2
                continue
            in_string = char != '"'
            out.append(char)
            i += 1
            continue
        starts_number = previous in (":", ",", "[") and (
            char.isdigit() or (char == "-" and i + 1 < n and text[i + 1].isdigit()))
        if starts_number:
            j = i + 1 if char == "-" else i
            k = j
            while k < n and text[k].isdigit():
                k += 1
            out.append(("-" if char == "-" else "") + (text[j:k].lstrip("0") or "0"))
            previous = "0"
            i = k
            continue
        if char == '"':
            in_string = True
        if not char.isspace():
            previous = char
        out.append(char)
        i += 1
    return "".join(out)


#: What a failed json.loads raises: ValueError for bad JSON, RecursionError for nesting
#: deeper than Python's stack (`[` * 200000), which must be just as unreadable.
_JSON_ERRORS = (ValueError, RecursionError)


def _loads(text: str) -> Any:
    return json.loads(text, strict=False)


def parse_qstat_json(text: str) -> QstatDocument:
    """The jobs in a `qstat -f -F json` reply; SchedulerError if nothing in it can be read."""
    if not text.strip():
        return QstatDocument()
    for candidate in (text, None):
        try:
            data = _loads(candidate if candidate is not None else strip_leading_zeros(text))
        except _JSON_ERRORS:
            continue
        if not isinstance(data, dict):
            raise SchedulerError("qstat -F json printed JSON that is not an object")
        jobs = data.get("Jobs") or {}
        if not isinstance(jobs, dict):
            raise SchedulerError("qstat -F json printed a 'Jobs' entry that is not an object")
        stamp = data.get("timestamp")
        document = QstatDocument(timestamp=stamp if isinstance(stamp, int) else None)
        for job_id, job in jobs.items():
            if isinstance(job, dict):
                document.jobs[job_id] = job
            else:  # listed, so not lost; but nothing in it can be read
                document.unreadable[job_id] = _not_an_object(job)
        return document
    return _parse_job_by_job(text)


def _not_an_object(job: Any) -> str:
    return f"its record is {type(job).__name__} {str(job)[:60]!r}, not a JSON object"


def _parse_job_by_job(text: str) -> QstatDocument:
    document = QstatDocument()
    starts = list(_JOB_START.finditer(text))
    others = list(_OTHER_RECORD.finditer(text))
    if not starts and not others:
        raise SchedulerError("qstat -F json printed text that is neither JSON nor qstat's "
                             f"one-attribute-per-line layout: {text[:120]!r}")
    first = min(match.start() for match in starts + others)
    stamp = re.search(r'"timestamp":\s*0*(\d+)', text[:first])
    document.timestamp = int(stamp.group(1)) if stamp else None
    for k, start in enumerate(starts):
        job_id = start.group("id")
        limit = starts[k + 1].start() if k + 1 < len(starts) else len(text)
        end = _JOB_END.search(text, start.end(), limit)
        if end is None:
            document.unreadable[job_id] = "its record is cut short (no closing brace)"
            continue
        body = "{" + text[start.end():end.start()] + "}"
        job, error = _read_job(body)
        if job is None:
            document.unreadable[job_id] = error
        else:
            document.jobs[job_id] = job
    for other in others:
        if other.group("id") not in document.jobs:
            document.unreadable.setdefault(
                other.group("id"),
                f"its record is not a JSON object: {other.group('value')[:60]!r}")
    return document


def _read_job(body: str) -> tuple[dict[str, Any] | None, str]:
    """One job's attributes, trying the repairs in order; (None, why) if none works."""
    error = ""
    for candidate in (body, _VARIABLE_LIST.sub("", body)):
        for variant in (candidate, strip_leading_zeros(candidate)):
            try:
                job = _loads(_drop_trailing_comma(variant))
            except RecursionError:
                error = error or "invalid JSON: nested too deeply"
                continue
            except ValueError as exc:
                error = error or f"invalid JSON: {exc}"
                continue
            if isinstance(job, dict):
                return job, ""
            error = error or _not_an_object(job)
    return None, error


def _drop_trailing_comma(body: str) -> str:
    """A job cut out of its list may end with `,\\n}` after the Variable_List was removed."""
    return re.sub(r",\s*\}\s*$", "\n}", body)
