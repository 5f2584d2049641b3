"""The Typer app, its shared option types, and the one place errors become exit codes.

Command modules register on `app`; each command parses, calls one service function and renders
the result with rich (or `--json`). Heavy imports (SQLAlchemy, torch) happen inside commands, so
`satrl --help` stays fast.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from orchestrator.errors import SatrlError, UsageError

app = typer.Typer(
    name="satrl",
    help="Run a self-attention deep-RL study on an HPC cluster, with every run in a SQL registry.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
#: Output to a pipe or a file is read by programs: rich would cut every table to 80 columns
#: ("685.…", "run_…"), so there it is as wide as its widest line instead.
PIPE_WIDTH = 100_000
console = Console() if Console().is_terminal else Console(width=PIPE_WIDTH)
err_console = Console(stderr=True)

# --- option types shared by commands ------------------------------------------------------
ExperimentOpt = Annotated[
    str | None,
    typer.Option("--experiment", "-e", help="Experiment (default: the workspace's, 'main')."),
]
#: For the commands that look across the registry (status, runs, sync).
AnyExperimentOpt = Annotated[
    str | None,
    typer.Option("--experiment", "-e", help="Only this experiment (default: every one)."),
]
GamesOpt = Annotated[
    str | None,
    typer.Option("--games", "--game", "-g",
                 help="all, a comma list (Pong,Breakout) or axis:<class> (axis:horizontal)."),
]
AttnOpt = Annotated[
    str | None, typer.Option("--attn", "-a", help="all or a comma list of NA,SWA,CWRA,CWCA,CWRCA.")
]
SeedListOpt = Annotated[
    str | None, typer.Option("--seed-list", help="Comma list of seeds, e.g. 0,42.")
]
StateOpt = Annotated[
    str | None,
    typer.Option("--state", "-s", help="Comma list of states (queued, submitted, running, "
                 "succeeded, failed, cancelled, lost)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]
DryRunOpt = Annotated[
    bool, typer.Option("--dry-run", help="Show what would happen; change nothing.")
]


def print_json(data: Any) -> None:
    """JSON on stdout, machine-readable (no rich markup, no wrapping): strict JSON, so a
    non-finite number is null (json.dumps would write the invalid NaN or Infinity), and a
    database's exact decimal is a number."""
    sys.stdout.write(json.dumps(_json_safe(data), indent=2, default=_json_default,
                                allow_nan=False) + "\n")


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    return value


def _json_default(value: Any) -> Any:
    from decimal import Decimal

    if isinstance(value, Decimal):  # PostgreSQL's numeric, e.g. avg(seed)
        return float(value) if value.is_finite() else None
    return str(value)


def run(argv: list[str] | None = None) -> int:
    """Run the CLI on `argv` and return the exit code; errors become one line on stderr."""
    from agents.spec import SpecError

    try:
        # Standalone mode: typer reports its own usage errors and raises SystemExit.
        app(args=argv, prog_name="satrl")
    except SystemExit as exit_:
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except SatrlError as error:
        # escape(): messages carry [command: ...] parts that rich would read as markup.
        err_console.print(f"[red]satrl:[/red] {escape(str(error))}", highlight=False,
                          soft_wrap=True)
        return error.exit_code
    except SpecError as error:
        err_console.print(f"[red]satrl:[/red] {escape(str(error))}", highlight=False,
                          soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    except OSError as error:
        # A file the system refused (a full disk, a permission) that no command foresaw: still
        # one line naming it, not a traceback.
        err_console.print(f"[red]satrl:[/red] {escape(os_error_line(error))}", highlight=False,
                          soft_wrap=True)
        return 1
    except Exception as error:
        message = _unreachable_registry(error)
        if message is None:
            raise
        err_console.print(f"[red]satrl:[/red] {escape(message)}", highlight=False,
                          soft_wrap=True)
        return 1
    return 0


#: PostgreSQL's SQLSTATEs of a registry satrl may not use as it is (its role's rights, or a
#: database holding tables satrl did not create): the database's state, not satrl's defect.
#: SQLite reports the same as OperationalError ("attempt to write a readonly database").
UNUSABLE_REGISTRY_SQLSTATES = frozenset({
    "42501",  # insufficient_privilege
    "42P07",  # duplicate_table
    "42P06",  # duplicate_schema
    "42710",  # duplicate_object
})


def _unreachable_registry(error: Exception) -> str | None:
    """One line for a registry that cannot be reached, opened or used, else None."""
    exc = sys.modules.get("sqlalchemy.exc")
    if exc is None:
        return None
    unusable = isinstance(error, exc.DBAPIError) and getattr(
        error.orig, "sqlstate", None) in UNUSABLE_REGISTRY_SQLSTATES
    if not (unusable or isinstance(error, exc.OperationalError | exc.InterfaceError)):
        return None
    from sqlalchemy.engine import make_url

    from orchestrator.settings import settings

    where = make_url(settings().database_url).render_as_string(hide_password=True)
    reason = str(getattr(error, "orig", None) or error).strip().splitlines()[0]
    return f"cannot use the registry at {where}: {reason}"


def os_error_line(error: OSError) -> str:
    """`path: reason` of an OSError, as one line."""
    reason = error.strerror or str(error) or type(error).__name__
    return f"{error.filename}: {reason}" if error.filename else reason


def check_output_folder(folder: Path, option: str = "--out") -> None:
    """Refuse, before any expensive work, an output folder that cannot be made or written.

    Nothing is created: the nearest existing folder on the way must be a writable folder.
    """
    folder = folder.expanduser()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "exists and is not a folder" if existing == folder else f"{existing} is not a folder"
        raise UsageError(f"{option} {folder}: {what}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {folder}: {existing} is not writable")


def main() -> None:
    """Console-script entry point."""
    sys.exit(run())


def current_experiment(experiment: str | None) -> str:
    """The experiment a command acts on: the option, else the workspace's default."""
    from orchestrator.paths import check_experiment_name
    from orchestrator.settings import settings

    return check_experiment_name(settings().experiment if experiment is None else experiment)


def make_filter(
    experiment: str | None = None,
    games: str | None = None,
    attn: str | None = None,
    seed_list: str | None = None,
    state: str | None = None,
    *,
    default_experiment: bool = True,
) -> Any:
    """A RunFilter from the shared options (validated: typos are refused with a suggestion)."""
    from orchestrator import catalog
    from orchestrator.registry.queries import RunFilter, parse_states

    run_filter = RunFilter(
        experiment=current_experiment(experiment) if default_experiment else experiment,
        games=tuple(catalog.parse_games(games)) if games else (),
        attns=tuple(catalog.parse_attn(attn)) if attn else (),
        seeds=tuple(catalog.parse_seeds(None, seed_list)) if seed_list else (),
        states=parse_states(state),
    )
    if experiment is not None:
        check_known_experiment(current_experiment(experiment))
    return run_filter


def check_known_experiment(name: str) -> None:
    """UsageError, with the nearest name, for an --experiment the registry does not hold: a
    typo would otherwise select no runs and look like an empty (or finished) study."""
    from sqlalchemy import select

    from agents.catalog import nearest
    from orchestrator.registry.db import open_registry
    from orchestrator.registry.models import Experiment

    registry = open_registry()
    try:
        with registry.session() as session:
            names = list(session.scalars(select(Experiment.name).order_by(Experiment.name)))
    finally:
        registry.dispose()
    if name not in names:
        known = f"; experiments: {', '.join(names[:10])}" if names else "; none is queued yet"
        raise UsageError(f"no experiment {name!r}{nearest(name, names)}{known}")
