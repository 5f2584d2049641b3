"""Study commands: queue, status, runs, show, sql."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from orchestrator.cli.app import (
    AnyExperimentOpt,
    AttnOpt,
    DryRunOpt,
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
from orchestrator.errors import UsageError

STATE_STYLE = {
    "queued": "dim", "submitted": "cyan", "running": "yellow", "succeeded": "green",
    "failed": "red", "cancelled": "magenta", "lost": "red",
}


def _registry() -> Any:
    from orchestrator.registry.db import open_registry

    return open_registry()


def _parse_sets(sets: list[str] | None) -> dict[str, str]:
    overrides: dict[str, str] = {}
    for item in sets or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set takes KEY=VALUE, not {item!r}")
        overrides[key.strip()] = value.strip()
    return overrides


@app.command()
def queue(
    games: GamesOpt = None,
    attn: AttnOpt = None,
    seeds: Annotated[int | None, typer.Option("--seeds", help="The first N paper seeds "
                                              "(0, 1, 10, 42, 1234).")] = None,
    seed_list: SeedListOpt = None,
    experiment: ExperimentOpt = None,
    preset: Annotated[str, typer.Option("--preset", help="Spec preset: paper or smoke.")] = "paper",
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a spec field: "
                                                   "KEY=VALUE (repeatable).")] = None,
    dry_run: DryRunOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Record games x attention types x seeds as queued runs (once: repeating adds nothing)."""
    from orchestrator import catalog
    from orchestrator.queueing import QueueRequest, queue_runs, resolve_spec

    if games is None or attn is None:
        raise UsageError("queue needs --games and --attn (e.g. --games all --attn all --seeds 5)")
    if seeds is not None and seed_list is not None:
        raise UsageError("give --seeds or --seed-list, not both")
    request = QueueRequest(
        experiment=current_experiment(experiment),
        games=catalog.parse_games(games),
        attns=catalog.parse_attn(attn),
        seeds=catalog.parse_seeds(seeds, seed_list),
        preset=preset,
        overrides=_parse_sets(set_),
    )
    # A bad --preset or --set is refused before the registry is opened (and so created).
    resolve_spec(request.preset, request.overrides)
    result = queue_runs(_registry(), request, dry_run=dry_run)
    if json_:
        print_json(result.to_json())
        return
    shape = f"{len(request.games)} games x {len(request.attns)} types x {len(request.seeds)} seeds"
    verb = "would queue" if dry_run else "queued"
    if result.added == 0:
        console.print(f"nothing to add: all {result.requested} runs ({shape}) are already "
                      f"recorded in experiment [bold]{escape(result.experiment)}[/bold]")
    else:
        plural = "run" if result.added == 1 else "runs"
        settings_ = f"preset {request.preset}" + (
            f", {len(request.overrides)} override(s)" if request.overrides else "")
        console.print(f"{verb} [bold]{result.added}[/bold] {plural} in experiment "
                      f"[bold]{escape(result.experiment)}[/bold] ({shape}; {settings_})"
                      + (f"; {result.existing} already recorded" if result.existing else ""))
    if result.kept:
        # The same science, other execution settings: the recorded runs are not changed.
        kept = ", ".join(f"{key} {' / '.join(map(str, old))}"
                         for key, old in sorted(result.kept.items()))
        err_console.print(f"note: the runs already recorded keep their own {kept}; only "
                          "runs added now take this command's settings", markup=False,
                          highlight=False, soft_wrap=True)


@app.command()
def status(
    experiment: AnyExperimentOpt = None,
    games: GamesOpt = None,
    attn: AttnOpt = None,
    state: StateOpt = None,
    json_: JsonOpt = False,
    no_sync: Annotated[bool, typer.Option("--no-sync", help="Show the registry as it is, "
                                          "without reconciling first.")] = False,
    watch: Annotated[bool, typer.Option("--watch", help="Reconcile and redraw until Ctrl-C.")
                     ] = False,
    interval: Annotated[float, typer.Option("--interval", help="Seconds between redraws "
                                            "with --watch.")] = 5.0,
) -> None:
    """Counts per state and a game x attention grid of the runs, reconciled first."""
    import math

    run_filter = make_filter(experiment, games, attn, None, state, default_experiment=False)
    # nan would pass a `<= 0` test and make time.sleep fail mid-watch.
    if not math.isfinite(interval) or interval <= 0:
        raise UsageError(f"--interval must be a number of seconds > 0, not {interval}")
    registry = _registry()
    if not watch:
        summary = _status_once(registry, run_filter, json_=json_, sync=not no_sync)
        if json_:
            print_json(summary.to_json())
        else:
            _render_status(summary)
        return
    import time

    from rich.live import Live

    if not console.is_terminal:
        # A pipe or a log file: rich's Live would show nothing until the end; one dated
        # snapshot per round instead.
        while True:
            summary = _status_once(registry, run_filter, json_=False, sync=not no_sync)
            console.print(Text(time.strftime("%Y-%m-%d %H:%M:%S")))
            _render_status(summary)
            console.print()
            console.file.flush()
            time.sleep(interval)
    with Live(console=console, auto_refresh=False) as live:
        while True:
            summary = _status_once(registry, run_filter, json_=False, sync=not no_sync)
            live.update(_status_view(summary), refresh=True)
            time.sleep(interval)


def _status_once(registry: Any, run_filter: Any, *, json_: bool, sync: bool) -> Any:
    from orchestrator.registry.queries import status_summary

    if sync:
        from orchestrator.cli.dispatch import render_reconcile
        from orchestrator.reconcile import reconcile
        from orchestrator.settings import settings

        # A subset of runs by state may change state in the round: reconcile without it.
        reconcile_filter = run_filter.__class__(**{**run_filter.__dict__, "states": ()})
        render_reconcile(reconcile(registry, settings(), reconcile_filter), quiet=True)
    with registry.session() as session:
        return status_summary(session, run_filter, with_runs=json_)


def _status_view(summary: Any) -> Any:
    from rich.console import Group

    if summary.total == 0:
        return Text("no runs match; queue some with `satrl queue --games ... --attn ...`")
    if len(summary.experiments) <= 1:
        return Group(_counts_line(summary), _grid(summary.grid))
    # One block per experiment: pooled, a study's runs would be added to an imported study's.
    parts: list[Any] = [_counts_line(summary, Text(f"{len(summary.experiments)} experiments, "))]
    for name, part in summary.experiments.items():
        heading = Text.assemble((f"experiment {name}", "bold"), ": ")
        parts += [Text(), _counts_line(part, heading), _grid(part.grid)]
    return Group(*parts)


def _counts_line(summary: Any, prefix: Text | None = None) -> Text:
    # Text, not markup: an experiment or a state this satrl does not know is shown as data.
    line = prefix or Text()
    line.append(str(summary.total), "bold").append(" run " if summary.total == 1 else " runs ")
    for name, count in summary.counts.items():
        if count:
            line.append("  ").append(f"{name} {count}", STATE_STYLE.get(name, ""))
    return line


def _render_status(summary: Any) -> None:
    console.print(_status_view(summary))


def _grid(grid: dict[tuple[str, str], Any]) -> Table:
    """Games as rows, attention types as columns; a cell is done/total, coloured by its worst."""
    from orchestrator.catalog import ATTENTION_TYPES, GAMES

    attns = [a for a in ATTENTION_TYPES if any(key[1] == a for key in grid)]
    table = Table(show_edge=False, pad_edge=False, box=None, header_style="bold")
    table.add_column("game")
    for attn in attns:
        table.add_column(attn, justify="right")
    for game in (g for g in GAMES if any(key[0] == g for key in grid)):
        cells = []
        for attn in attns:
            counter = grid.get((game, attn))
            if not counter:
                cells.append("")
                continue
            total = sum(counter.values())
            worst = next(s for s in ("failed", "lost", "cancelled", "running", "submitted",
                                     "queued", "succeeded") if counter.get(s))
            cells.append(f"[{STATE_STYLE[worst]}]{counter.get('succeeded', 0)}/{total}[/]")
        table.add_row(game, *cells)
    return table


#: Rows `satrl runs` prints in its table unless --limit says otherwise.
TABLE_ROWS = 200


@app.command()
def runs(
    experiment: AnyExperimentOpt = None,
    games: GamesOpt = None,
    attn: AttnOpt = None,
    seed_list: SeedListOpt = None,
    state: StateOpt = None,
    limit: Annotated[int | None, typer.Option(
        "--limit", help="At most this many rows (0: all; default: 200 in the table, all "
        "with --json).", show_default=False)] = None,
    json_: JsonOpt = False,
) -> None:
    """List runs with their state and attempts."""
    from sqlalchemy import select

    from orchestrator.registry.models import Experiment, Run
    from orchestrator.registry.queries import MAX_ID, RunFilter

    if limit is None:  # a script reading --json gets every run unless it asks for fewer
        limit = 0 if json_ else TABLE_ROWS
    if not 0 <= limit < MAX_ID:  # the database would refuse (PostgreSQL) or overflow (SQLite)
        raise UsageError(f"--limit takes a number of rows >= 0 (0: all), not {limit}")

    run_filter: RunFilter = make_filter(experiment, games, attn, seed_list, state,
                                        default_experiment=False)
    statement = run_filter.apply(
        select(Run.id, Experiment.name, Run.game, Run.attn, Run.seed, Run.state, Run.attempts,
               Run.spec_hash)
        .join(Experiment, Run.experiment_id == Experiment.id)
        .order_by(Run.id)
    )
    if limit:
        statement = statement.limit(limit + 1)  # one more: whether there are more
    registry = _registry()
    with registry.session() as session:
        rows = session.execute(statement).all()
    more = bool(limit) and len(rows) > limit
    rows = rows[:limit] if more else rows
    keys = ["id", "experiment", "game", "attn", "seed", "state", "attempts", "spec_hash"]
    if json_:
        print_json([dict(zip(keys, row, strict=True)) for row in rows])
        return
    table = Table(*keys[:-1], "spec", header_style="bold", box=None)
    for row in rows:
        # Registry text is data, never markup (Text): a '[' in it must print as itself.
        values = [Text(str(v)) for v in row]
        values[5].stylize(STATE_STYLE.get(row[5], ""))
        values[7] = Text(row[7][:12])
        table.add_row(*values)
    console.print(table)
    if more:
        console.print(f"[dim](first {limit}; --limit 0 lists all)[/dim]")


@app.command()
def show(
    run_ref: Annotated[str, typer.Argument(metavar="RUN", help="Run id or GAME/ATTN/SEED.")],
    experiment: ExperimentOpt = None,
    json_: JsonOpt = False,
) -> None:
    """One run: spec, state, jobs, event history and fetched artefacts."""
    from sqlalchemy import select

    from orchestrator.registry.models import Artifact
    from orchestrator.registry.queries import resolve_run, run_history

    registry = _registry()
    with registry.session() as session:
        run = resolve_run(session, run_ref, current_experiment(experiment))
        events, jobs = run_history(session, run)
        artifacts = list(session.scalars(
            select(Artifact).where(Artifact.run_id == run.id).order_by(Artifact.path)))
        data: dict[str, Any] = {
            "id": run.id, "experiment": run.experiment.name, "game": run.game, "attn": run.attn,
            "seed": run.seed, "state": run.state, "attempts": run.attempts,
            "spec_hash": run.spec_hash, "run_dir": run.run_dir, "spec": run.spec,
            "jobs": [
                {"attempt": j.attempt, "backend": j.backend, "job_id": j.job_id,
                 "state": j.scheduler_state, "submitted_at": j.submitted_at,
                 "ended_at": j.ended_at, "exit_status": j.exit_status, "reason": j.reason,
                 "node": j.node} for j in jobs
            ],
            "events": [{"at": e.at, "from": e.from_state, "to": e.to_state, "why": e.why}
                       for e in events],
            "artifacts": [{"kind": a.kind, "path": a.path, "size_bytes": a.size_bytes,
                           "sha256": a.sha256, "step": a.step} for a in artifacts],
        }
    if json_:
        print_json(data)
        return
    # Everything below comes from the registry (scheduler replies, reasons, paths): escaped, so
    # an event's "[command: qsub ...]" prints as itself instead of vanishing as a markup tag.
    style = STATE_STYLE.get(data["state"], "")
    console.print(f"[bold]run {data['id']}[/bold]  {escape(data['experiment'])} / "
                  f"{escape(data['game'])} / {escape(data['attn'])} / seed {data['seed']}   "
                  f"[{style}]{escape(data['state'])}[/]   attempts {data['attempts']}   "
                  f"spec {escape(data['spec_hash'][:12])}")
    if data["run_dir"]:
        console.print(f"run directory: {data['run_dir']}", highlight=False, markup=False)
    spec = Table("field", "value", box=None, header_style="bold", title="spec")
    for key, value in data["spec"].items():
        spec.add_row(Text(key), Text(json.dumps(value)))
    console.print(spec)
    if data["jobs"]:
        table = Table("attempt", "backend", "job id", "state", "exit", "reason", "node",
                      box=None, header_style="bold", title="jobs")
        for j in data["jobs"]:
            table.add_row(*(Text(str(j[k])) if j[k] is not None else "" for k in
                            ("attempt", "backend", "job_id", "state", "exit_status", "reason",
                             "node")))
        console.print(table)
    table = Table("time", "from", "to", "why", box=None, header_style="bold", title="events")
    for e in data["events"]:
        table.add_row(str(e["at"])[:19], Text(e["from"] or ""), Text(e["to"]), Text(e["why"]))
    console.print(table)
    if data["artifacts"]:
        table = Table("kind", "path", "bytes", "sha256", box=None, header_style="bold",
                      title="artefacts in the store")
        for a in data["artifacts"]:
            table.add_row(Text(a["kind"]), Text(a["path"]), str(a["size_bytes"]),
                          Text(a["sha256"][:12]))
        console.print(table)


#: Rows `satrl sql` lays out as a table; --csv and --json print every row.
SQL_TABLE_ROWS = 1000


def _unique_names(columns: list[str]) -> list[str]:
    """Column names as JSON keys: a repeated name gets `_2`, `_3`, ... (`SELECT r.id, e.id`
    or two `count(...)` kept only the last column)."""
    taken = set(columns)
    names: list[str] = []
    for column in columns:
        name, n = column, 1
        while name in names or (n > 1 and name in taken):  # nor another column's own name
            n += 1
            name = f"{column}_{n}"
        names.append(name)
    return names


@app.command()
def sql(
    statement: Annotated[str, typer.Argument(help="One SQL statement (read-only).")],
    json_: JsonOpt = False,
    csv_: Annotated[bool, typer.Option("--csv", help="Print CSV.")] = False,
) -> None:
    """Run read-only SQL over the registry (views: run_scores, game_table).

    The table shows the first 1,000 rows; --csv and --json give them all."""
    from orchestrator.sqlquery import run_readonly_sql

    # A table of every metrics row would take minutes to lay out (~0.6 ms a row) and hold
    # them all in memory: the table stops at SQL_TABLE_ROWS and says so.
    table_only = not (json_ or csv_)
    result = run_readonly_sql(_registry(), statement,
                              max_rows=SQL_TABLE_ROWS + 1 if table_only else None)
    if json_:
        names = _unique_names(result.columns)
        print_json([dict(zip(names, row, strict=True)) for row in result.rows])
    elif csv_:
        import csv
        import sys

        writer = csv.writer(sys.stdout, lineterminator="\n")  # not the csv module's \r\n
        writer.writerow(result.columns)
        writer.writerows(result.rows)
    else:
        # Column names and values are the statement's data, never markup ('[/]' is a value).
        table = Table(box=None, header_style="bold")
        for column in result.columns:
            table.add_column(Text(str(column)))
        for row in result.rows[:SQL_TABLE_ROWS]:
            table.add_row(*("" if v is None else Text(str(v)) for v in row))
        console.print(table)
        if len(result.rows) > SQL_TABLE_ROWS:
            err_console.print(f"(first {SQL_TABLE_ROWS:,} rows; --csv or --json prints them "
                              "all)", highlight=False)
