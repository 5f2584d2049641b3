"""`satrl fetch`: checkpoints, metrics and observation dumps of runs into the store, verified."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from orchestrator.cli.app import (
    AttnOpt,
    ExperimentOpt,
    GamesOpt,
    JsonOpt,
    SeedListOpt,
    StateOpt,
    app,
    console,
    current_experiment,
    err_console,
    make_filter,
    print_json,
)
from orchestrator.errors import SatrlError, UsageError

#: Above this, the total is shown (and the copy announced) before any byte moves.
LARGE_COPY_BYTES = 100 * 1024**2


@app.command()
def fetch(
    game: Annotated[str | None, typer.Argument(metavar="GAME", help="One run: its game,")] = None,
    attn_name: Annotated[str | None, typer.Argument(metavar="ATTN", help="attention type")] = None,
    seed: Annotated[int | None, typer.Argument(metavar="SEED", help="and seed.")] = None,
    experiment: ExperimentOpt = None,
    what: Annotated[str, typer.Option("--what", help="checkpoints, metrics, observations "
                                      "(comma list) or all; run.json and provenance.json "
                                      "always.")] = "all",
    checkpoints: Annotated[str | None, typer.Option(
        "--checkpoints", help="all, last or a comma list of step counts (default: all for one "
        "run, last for several).")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every dispatched run of the "
                                       "experiment.")] = False,
    games: GamesOpt = None,
    attn: AttnOpt = None,
    seed_list: SeedListOpt = None,
    state: StateOpt = None,
    finished_only: Annotated[bool, typer.Option("--finished-only", help="Only runs that have "
                                                "ended (succeeded, failed, cancelled, lost).")
                             ] = False,
    json_: JsonOpt = False,
) -> None:
    """Copy runs' results into the store, verify every checksum, and ingest them.

    One run: `satrl fetch Pong CWCA 42`. Several: `--all`, or `--games/--attn/--seed-list/--state`.
    A second fetch copies only what is missing, changed or no longer matches.
    """
    from orchestrator import catalog
    from orchestrator.registry.db import open_registry
    from orchestrator.registry.queries import RunFilter, get_run
    from orchestrator.settings import settings
    from orchestrator.store.fetch import FetchRequest, open_source, select_targets
    from orchestrator.store.layout import CheckpointChoice, parse_what

    positional = [v for v in (game, attn_name, seed) if v is not None]
    filters = any(v is not None for v in (games, attn, seed_list, state)) or finished_only
    if positional and len(positional) != 3:
        raise UsageError("one run takes GAME ATTN SEED (e.g. satrl fetch Pong CWCA 42)")
    if positional and (filters or all_):
        raise UsageError("give GAME ATTN SEED or --all/filters, not both")
    if not positional and not (filters or all_):
        raise UsageError("fetch what? GAME ATTN SEED for one run, --all or --games/--attn/"
                         "--seed-list/--state for several")
    single = bool(positional)
    _check_steps(checkpoints)
    request = FetchRequest(parse_what(what),
                           CheckpointChoice.parse(checkpoints, "all" if single else "last"))
    settings_ = settings()
    registry = open_registry()
    with registry.session() as session:
        if single:
            run = get_run(session, current_experiment(experiment), catalog.parse_game(str(game)),
                          catalog.parse_attn_one(str(attn_name)), int(str(seed)))
            run_filter = RunFilter(run_ids=(run.id,))
        else:
            run_filter = make_filter(experiment, games, attn, seed_list, state)
        targets = select_targets(session, settings_, run_filter, finished_only=finished_only,
                                 dispatched_only=not single)
    if not targets and single:
        raise UsageError(f"{game}/{attn_name}/{seed} of experiment "
                         f"{current_experiment(experiment)!r} was imported: its results are in "
                         "the registry already, and it has no run directory to fetch")
    if not targets:
        if json_:
            print_json({"runs": [], "ok": True})
        else:
            console.print("no runs match (runs never dispatched, and imported experiments' "
                          "runs, have nothing to fetch)")
        return
    with open_source(settings_) as source:
        results = _fetch(registry, source, targets, request, quiet=json_)
    if single and results[0].error:
        # One run whose records cannot be read: one clear line, its exit code, nothing changed.
        raise SatrlError(f"{results[0].key}: {results[0].error}",
                         exit_code=results[0].exit_code)
    if json_:
        print_json({"runs": [r.to_json() for r in results], "ok": all(r.ok for r in results)})
    else:
        _render(results)
    if not all(r.ok for r in results):
        raise typer.Exit(1)


def _check_steps(checkpoints: str | None) -> None:
    """Step counts must be whole numbers: `inf` would overflow and `128.7` be truncated to a
    checkpoint the user did not name (`2e6` is a whole number and stays allowed)."""
    import math

    if checkpoints is None or checkpoints.strip().lower() in ("all", "last"):
        return
    for item in checkpoints.replace("_", "").split(","):
        try:
            value = float(item)
        except ValueError:
            continue  # not a number at all: CheckpointChoice.parse says so
        if not math.isfinite(value) or not value.is_integer():
            raise UsageError(f"--checkpoints takes all, last or whole step counts, not "
                             f"{item.strip()!r}")


def _fetch(registry: Any, source: Any, targets: list[Any], request: Any, *, quiet: bool
           ) -> list[Any]:
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    from orchestrator.store.fetch import plan_fetch, run_fetch

    hidden = quiet or not err_console.is_terminal  # bars only for a person watching
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeRemainingColumn(), console=err_console, disable=hidden,
                        transient=True)
    with progress:
        task = progress.add_task("checking runs", total=len(targets))
        planned = plan_fetch(source, targets, request, on_run=lambda _t: progress.advance(task))
    total = planned.bytes_to_copy
    if not quiet and (total >= LARGE_COPY_BYTES or len(targets) > 1):
        err_console.print(f"to copy: {planned.files_to_copy} files, {_size(total)} from "
                          f"{len(planned.plans)} run(s)")
    bytes_bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                         TransferSpeedColumn(), TimeRemainingColumn(), console=err_console,
                         disable=hidden, transient=True)
    results = list(planned.failed)
    with bytes_bar:
        runs_task = bytes_bar.add_task("runs ", total=len(planned.plans))
        bytes_task = bytes_bar.add_task("bytes", total=max(total, 1))
        for plan in planned.plans:
            results.append(run_fetch(registry, source, plan,
                                     on_bytes=lambda n: bytes_bar.advance(bytes_task, n)))
            bytes_bar.advance(runs_task)
    order = {t.run_id: i for i, t in enumerate(targets)}
    return sorted(results, key=lambda r: order[r.run_id])


def _render(results: list[Any]) -> None:
    from rich.table import Table

    table = Table("run", "copied", "same", "problems", "bytes", "evaluations", "metrics",
                  box=None, header_style="bold")
    for r in results:
        if r.error:
            table.add_row(r.key, "", "", "[red]run skipped[/red]", "", "", "")
            continue
        table.add_row(r.key, str(r.count("copied")), str(r.count("unchanged")),
                      f"[red]{len(r.problems)}[/red]" if r.problems else "0",
                      _size(r.bytes_copied), _rows(r.evaluations), _rows(r.metrics))
    console.print(table)
    stores = {str(Path(r.store_dir).parents[3]) for r in results if r.store_dir}
    if len(results) == 1:
        console.print(f"store: {results[0].store_dir}", highlight=False, soft_wrap=True,
                      markup=False)
    elif stores:
        console.print(f"store: {', '.join(sorted(stores))}", highlight=False, soft_wrap=True,
                      markup=False)
    for r in results:
        if r.error:
            err_console.print(f"[red]{r.key}:[/red] {escape(str(r.error))}", highlight=False,
                              soft_wrap=True)
        for f in r.problems:
            # Paths and problems come from a manifest: never read them as markup.
            err_console.print(f"[red]{r.key}: {escape(str(f.path))}:[/red] "
                              f"{escape(str(f.problem))} (not registered)",
                              highlight=False, soft_wrap=True)


def _rows(count: int | None) -> str:
    return "unchanged" if count is None else f"{count} rows"


def _size(n_bytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n_bytes < 1024 or unit == "GB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024  # type: ignore[assignment]
    return f"{n_bytes} B"
