"""Where things live and how jobs are sized: `satrl.toml`, `SATRL_*` variables, defaults.

The workspace is the nearest folder, walking up from the current one, that holds `satrl.toml`;
without one, the current folder. `SATRL_HOME` overrides both. Defaults inside it: registry
`.satrl/satrl.db` (SQLite), store `store/`, run directories `runs/`.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from orchestrator.errors import UsageError

CONFIG_NAME = "satrl.toml"


def find_workspace(start: Path | None = None) -> Path:
    """SATRL_HOME, else the nearest folder upwards holding satrl.toml, else the start folder."""
    home = os.environ.get("SATRL_HOME")
    if home:
        return Path(home).expanduser().resolve()
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / CONFIG_NAME).is_file():
            return folder
    return here


@dataclass(frozen=True)
class Settings:
    """The resolved configuration of one workspace."""

    workspace: Path
    database_url: str
    store: Path
    scratch: Path
    backend: str = "local"
    experiment: str = "main"
    #: The whole parsed satrl.toml, for sections owned by one module (schedulers, images).
    raw: dict[str, Any] = field(default_factory=dict)

    def section(self, name: str) -> dict[str, Any]:
        """A table of satrl.toml (empty when absent)."""
        return _table(self.raw, name)

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


def _read_config(workspace: Path) -> dict[str, Any]:
    path = workspace / CONFIG_NAME
    if not path.is_file():
        return {}
    try:
        text = path.read_text()
    except OSError as error:
        # A link to something unreadable (/proc/self/mem), a permission: name the file.
        raise UsageError(f"{path}: cannot be read: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise UsageError(f"{path}: not valid TOML: {error}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise UsageError(f"{path}: not valid TOML: {error}") from None
    check_names(raw, path)
    return raw


#: Every setting satrl reads, by table (None: a top-level value, not a table). A name not here
#: is a typo whose setting would silently not apply (a walltime, auto_requeue, the queue).
_RESOURCE_KEYS = frozenset({"cpus", "gpus", "mem_gb", "walltime_min", "queue", "partition",
                            "account"})
_SCHEDULER_KEYS = _RESOURCE_KEYS | {"poll_interval_s", "max_running"}
KNOWN_SETTINGS: dict[str, frozenset[str] | None] = {
    "experiment": None,
    "registry": frozenset({"url"}),
    "paths": frozenset({"store", "scratch"}),
    "dispatch": frozenset({"backend", "python", "wait_interval_s", "auto_requeue",
                           "max_attempts", "max_array", "lost_grace_s"}),
    "resources": _RESOURCE_KEYS,
    "pbs": _SCHEDULER_KEYS | {"gpu_resource"},
    "slurm": _SCHEDULER_KEYS | {"gres"},
    "local": _SCHEDULER_KEYS | {"max_parallel", "kill_wait_s"},
    "image": frozenset({"path", "flavor", "python", "dir", "digest", "binds"}),
    "fetch": frozenset({"host", "port", "ssh_options", "identity_file", "scratch"}),
}


def check_names(raw: dict[str, Any], path: Path) -> None:
    """UsageError, with the nearest valid name, for a table or key satrl does not read."""
    from agents.catalog import nearest

    for name, value in raw.items():
        if name not in KNOWN_SETTINGS:
            raise UsageError(f"{path}: unknown setting {name!r}"
                             f"{nearest(name, KNOWN_SETTINGS)}; satrl reads "
                             f"{', '.join(KNOWN_SETTINGS)}")
        keys = KNOWN_SETTINGS[name]
        if keys is None or not isinstance(value, dict):
            continue  # a wrong type is refused where the value is read, with its expectation
        for key in value:
            if key not in keys:
                raise UsageError(f"{path}: [{name}] has no setting {key!r}"
                                 f"{nearest(key, keys)}; it takes {', '.join(sorted(keys))}")


def _table(raw: dict[str, Any], name: str) -> dict[str, Any]:
    value = raw.get(name, {})
    if not isinstance(value, dict):
        raise UsageError(f"{CONFIG_NAME}: [{name}] must be a table, not {value!r}")
    return value


def _path(workspace: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else workspace / path


def load_settings(start: Path | None = None) -> Settings:
    """Settings of the workspace around `start` (default: the current folder)."""
    workspace = find_workspace(start)
    raw = _read_config(workspace)
    registry, paths, dispatch = (_table(raw, name) for name in ("registry", "paths", "dispatch"))
    for table, key in ((registry, "url"), (paths, "store"), (paths, "scratch"),
                       (dispatch, "backend"), (raw, "experiment")):
        if key in table and not isinstance(table[key], str):
            raise UsageError(f"{CONFIG_NAME}: {key} must be a string, not {table[key]!r}")
    url = os.environ.get("SATRL_DATABASE_URL") or registry.get("url")
    if not url:
        url = f"sqlite:///{workspace / '.satrl' / 'satrl.db'}"
    url = normalise_database_url(_sqlite_in_workspace(workspace, url))
    store = os.environ.get("SATRL_STORE") or paths.get("store", "store")
    scratch = os.environ.get("SATRL_SCRATCH") or paths.get("scratch", "runs")
    return Settings(
        workspace=workspace,
        database_url=url,
        store=_path(workspace, store),
        scratch=_path(workspace, scratch),
        backend=os.environ.get("SATRL_BACKEND") or dispatch.get("backend", "local"),
        experiment=os.environ.get("SATRL_EXPERIMENT") or raw.get("experiment", "main"),
        raw=raw,
    )


def _sqlite_in_workspace(workspace: Path, url: str) -> str:
    """A SQLite URL's relative or `~` path resolved as store and scratch are, against the
    workspace: `sqlite:///reg.db` run from a subfolder must not start a second registry there.
    In-memory and `file:` URI forms are left as they are."""
    scheme, separator, rest = url.partition(":///")
    if not separator or not scheme.startswith("sqlite"):
        return url
    path, question, query = rest.partition("?")
    if not path or path == ":memory:" or path.startswith("file:"):
        return url
    return f"{scheme}:///{_path(workspace, path)}{question}{query}"


def normalise_database_url(url: str) -> str:
    """Use psycopg 3 for plain `postgresql://` URLs (SQLAlchemy would pick psycopg2)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


@cache
def settings() -> Settings:
    """The current process's settings, read once."""
    return load_settings()
