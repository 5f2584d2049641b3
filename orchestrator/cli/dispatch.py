"""Dispatch commands: dispatch, sync, requeue, cancel, logs."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer
from rich.markup import escape

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
from orchestrator.errors import SatrlError, UsageError

BackendOpt = Annotated[
    str | None, typer.Option("--backend", "-b", help="local, slurm or pbs (default: satrl.toml "
                             "[dispatch] backend, else local).")
]
# The resources a dispatch asks for; requeue takes the same, over the last dispatch's.
CpusOpt = Annotated[int | None, typer.Option("--cpus", help="Cores per run.")]
GpusOpt = Annotated[int | None, typer.Option("--gpus", help="GPUs per run.")]
MemGbOpt = Annotated[float | None, typer.Option("--mem-gb", help="Memory per run, GB.")]
WalltimeMinOpt = Annotated[float | None, typer.Option("--walltime-min",
                                                      help="Time limit per job, minutes.")]
QueueOpt = Annotated[str | None, typer.Option("--queue", help="PBS queue / Slurm partition.")]
AccountOpt = Annotated[str | None, typer.Option("--account", help="Account charged.")]
RunsArg = Annotated[
    list[str] | None, typer.Argument(metavar="[RUN]...", help="Run ids or GAME/ATTN/SEED.",
                                     show_default=False)
]


def _registry() -> Any:
    from orchestrator.registry.db import open_registry

    return open_registry()


def _settings() -> Any:
    from orchestrator.settings import settings

    return settings()


def _resources(cpus: int | None, gpus: int | None, mem_gb: float | None,
               walltime_min: float | None, queue: str | None, account: str | None
               ) -> dict[str, Any]:
    """The command line's resources by satrl.toml's names; None where not given."""
    return {"cpus": cpus, "gpus": gpus, "mem_gb": mem_gb, "walltime_min": walltime_min,
            "queue": queue, "account": account}


def _filter(runs: list[str] | None, experiment: str | None, games: str | None, attn: str | None,
            seed_list: str | None, state: str | None = None) -> Any:
    """The shared filters, narrowed to explicit RUN references when given."""
    from dataclasses import replace

    run_filter = make_filter(experiment, games, attn, seed_list, state)
    if not runs:
        return run_filter
    from orchestrator.registry.queries import resolve_run

    registry = _registry()
    with registry.session() as session:
        ids = tuple(resolve_run(session, ref, current_experiment(experiment)).id for ref in runs)
    return replace(run_filter, run_ids=ids)


@app.command("dispatch")
def dispatch_command(
    backend: BackendOpt = None,
    limit: Annotated[int | None, typer.Option("--limit", help="Dispatch at most N runs.")] = None,
    experiment: ExperimentOpt = None,
    games: GamesOpt = None,
    attn: AttnOpt = None,
    seed_list: SeedListOpt = None,
    cpus: CpusOpt = None,
    gpus: GpusOpt = None,
    mem_gb: MemGbOpt = None,
    walltime_min: WalltimeMinOpt = None,
    queue: QueueOpt = None,
    account: AccountOpt = None,
    wait: Annotated[bool, typer.Option("--wait", help="Block until the dispatched runs end, "
                                       "reconciling as they go.")] = False,
    dry_run: DryRunOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Submit queued runs as scheduler jobs (arrays where the backend has them)."""
    from orchestrator.dispatching import DispatchRequest, dispatch
    from orchestrator.registry.queries import MAX_ID

    if limit is not None and limit > MAX_ID:  # a LIMIT the database cannot hold
        raise UsageError(f"--limit must be at most {MAX_ID}, not {limit}")
    request = DispatchRequest(
        make_filter(experiment, games, attn, seed_list), backend=backend, limit=limit,
        resources=_resources(cpus, gpus, mem_gb, walltime_min, queue, account))
    registry = _registry()
    result = dispatch(registry, _settings(), request, dry_run=dry_run)
    if json_ and not wait:
        data = result.to_json()
        if dry_run:
            for planned, entry in zip(result.batches, data["batches"], strict=True):
                entry["script"] = planned.script
        print_json(data)
        return
    if dry_run:
        import sys

        # Plain writes: a terminal-width wrap would change the script and the command line.
        for planned in result.batches:
            sys.stdout.write(f"# batch {planned.batch.token}: {len(planned.runs)} run(s) on "
                             f"{result.backend}; script {planned.batch.script_path}\n"
                             f"{_shell_line(planned.command)}\n{planned.script}\n")
        if not result.batches:
            console.print("no queued runs match; nothing would be dispatched")
        return
    if result.recovered:
        console.print(f"recovered {result.recovered} run(s) of an interrupted dispatch")
    if not result.batches:
        console.print("no queued runs match; nothing dispatched")
    for planned in result.batches:
        first, last = planned.job_ids[0], planned.job_ids[-1]
        ids = first if first == last else f"{first} .. {last}"
        console.print(f"dispatched [bold]{len(planned.runs)}[/bold] run(s) to {result.backend} "
                      f"as {escape(ids)}", highlight=False)
    if wait and result.run_ids:
        _wait(registry, result.run_ids, json_)


def _shell_line(command: list[str]) -> str:
    import shlex

    return " ".join(shlex.quote(part) for part in command)


def _wait(registry: Any, run_ids: list[int], json_: bool) -> None:
    """Reconcile until every run has ended, with a progress bar; exit 1 unless all succeeded."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from orchestrator.dispatching import DEFAULT_WAIT_INTERVAL_S
    from orchestrator.reconcile import reconcile
    from orchestrator.registry.queries import RunFilter, status_summary
    from orchestrator.schedulers.base import config_number

    settings = _settings()
    # Checked by dispatch before it submitted anything (dispatching.check_config).
    interval = config_number(settings.section("dispatch"), "wait_interval_s",
                             DEFAULT_WAIT_INTERVAL_S, "satrl.toml [dispatch]", kind=float,
                             minimum=0.1)
    run_filter = RunFilter(run_ids=tuple(run_ids))
    terminal = ("succeeded", "failed", "cancelled", "lost")
    with Progress(TextColumn("[bold]runs"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=err_console, transient=json_) as progress:
        task = progress.add_task("", total=len(run_ids))
        while True:
            outcome = reconcile(registry, settings, run_filter)
            for error in outcome.errors:
                progress.console.print(f"[yellow]warning:[/yellow] {escape(str(error))}",
                                       highlight=False)
            with registry.session() as session:
                summary = status_summary(session, run_filter, with_runs=False)
            done = sum(summary.counts.get(s, 0) for s in terminal)
            progress.update(task, completed=done, description="  ".join(
                f"{k} {v}" for k, v in summary.counts.items() if v))
            if done == summary.total:
                break
            time.sleep(interval)
    if json_:
        print_json(summary.to_json())
    else:
        console.print("  ".join(f"{k} {v}" for k, v in summary.counts.items() if v))
    if summary.counts.get("succeeded", 0) != summary.total:
        raise SatrlError(f"{summary.total - summary.counts.get('succeeded', 0)} of "
                         f"{summary.total} run(s) did not succeed; see `satrl runs --state "
                         "failed,lost,cancelled` and `satrl logs RUN`")


@app.command()
def sync(
    experiment: AnyExperimentOpt = None,
    games: GamesOpt = None,
    attn: AttnOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Ask the schedulers even if they were "
                                        "asked less than poll_interval_s ago.")] = False,
    json_: JsonOpt = False,
) -> None:
    """Reconcile the registry with the schedulers and the run directories."""
    from orchestrator.reconcile import reconcile

    run_filter = make_filter(experiment, games, attn, None, None, default_experiment=False)
    result = reconcile(_registry(), _settings(), run_filter, force=force)
    if json_:
        print_json(result.to_json())
    else:
        render_reconcile(result)
    if result.poll_failed:  # the round is not the reconciliation asked for: say so
        raise SatrlError(f"could not ask {', '.join(result.poll_failed)} (see the warning); "
                         "only the run directories were read")


def render_reconcile(result: Any, *, quiet: bool = False) -> None:
    """Transitions as lines; scheduler trouble as warnings on stderr."""
    # Scheduler errors carry "[command: ...]" and "[stderr: ...]": escaped, not read as markup.
    for error in result.errors:
        err_console.print(f"[yellow]warning:[/yellow] {escape(str(error))}", highlight=False)
    for job_id, why in result.unreadable.items():
        err_console.print(f"[yellow]warning:[/yellow] could not read the scheduler's record of "
                          f"job {escape(str(job_id))}: {escape(str(why))}", highlight=False)
    if quiet:
        return
    for t in result.transitions:
        console.print(f"{t.key}: {t.from_state} -> {t.to_state}  ({t.why})", highlight=False,
                      markup=False)
    if result.recovered:
        console.print(f"recovered {result.recovered} run(s) of an interrupted dispatch "
                      "(their job ids are recorded now)")
    if result.requeued:
        console.print(f"requeued and dispatched again: {len(result.requeued)} run(s)")
    if not result.transitions and not result.requeued and not result.recovered:
        asked = ", ".join(f"{b} {_poll_outcome(b, a, result.poll_failed)}"
                          for b, a in result.polled.items())
        console.print(f"no changes{f' ({asked})' if asked else ''}")


def _poll_outcome(backend: str, asked: bool, failed: list[str]) -> str:
    if backend in failed:
        return "could not be asked"
    return "asked" if asked else "not asked (rate limit)"


@app.command("requeue")
def requeue_command(
    runs: RunsArg = None,
    failed: Annotated[bool, typer.Option("--failed", help="Failed runs.")] = False,
    lost: Annotated[bool, typer.Option("--lost", help="Lost runs.")] = False,
    cancelled: Annotated[bool, typer.Option("--cancelled", help="Cancelled runs.")] = False,
    walltime: Annotated[bool, typer.Option("--walltime", help="Failed runs whose last attempt "
                                           "hit its time limit.")] = False,
    backend: BackendOpt = None,
    experiment: ExperimentOpt = None,
    games: GamesOpt = None,
    attn: AttnOpt = None,
    seed_list: SeedListOpt = None,
    cpus: CpusOpt = None,
    gpus: GpusOpt = None,
    mem_gb: MemGbOpt = None,
    walltime_min: WalltimeMinOpt = None,
    queue: QueueOpt = None,
    account: AccountOpt = None,
    dry_run: DryRunOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Queue ended runs again and resubmit them; each resumes from its newest checkpoint.

    Without --failed/--lost/--cancelled/--walltime: every failed, lost or cancelled run matching
    the filters. Each run goes out with the resources of its last dispatch (command line over
    satrl.toml); --cpus, --walltime-min and the like change those given."""
    from orchestrator.runctl import requeue

    states = tuple(name for name, on in (("failed", failed), ("lost", lost),
                                         ("cancelled", cancelled)) if on)
    settings = _settings()
    # A backend name that does not exist, and [image], are refused here; requeue itself
    # checks each backend's resources and walltime as dispatch would, before it moves a run.
    check_dispatch_config(settings, backend if backend is not None else settings.backend,
                          name_only=True)
    result = requeue(_registry(), settings,
                     _filter(runs, experiment, games, attn, seed_list), states=states,
                     walltime_only=walltime, backend=backend, dry_run=dry_run,
                     resources=_resources(cpus, gpus, mem_gb, walltime_min, queue, account))
    if json_:
        print_json(result.to_json())
        return
    for key, why in result.skipped.items():
        err_console.print(f"[yellow]skipped[/yellow] {escape(key)}: {escape(why)}",
                          highlight=False, soft_wrap=True)
    verb = "would requeue" if dry_run else "requeued"
    console.print(f"{verb} {len(result.requeued)} run(s)"
                  + (f"; dispatched {len(result.dispatched)}" if result.dispatched else ""))
    if dry_run:  # what the resubmission will ask for, before it does
        for backend_name, resources, keys in result.groups:
            console.print(f"  {len(keys)} on {backend_name} with {_describe(resources)}: "
                          f"{', '.join(keys)}", highlight=False, markup=False, soft_wrap=True)


def _describe(resources: Any) -> str:
    from orchestrator.resources import hms

    parts = [f"cpus {resources.cpus}", f"gpus {resources.gpus}"]
    if resources.mem_gb is not None:
        parts.append(f"mem {resources.mem_gb:g} GB")
    parts.append(f"walltime {hms(resources.walltime_s)}" if resources.walltime_s
                 else "no walltime")
    parts += [f"{name} {value}" for name, value in (("queue", resources.queue),
                                                    ("account", resources.account)) if value]
    return ", ".join(parts)


def check_dispatch_config(settings: Any, backend: str, *, name_only: bool = False) -> None:
    """What `dispatch` checks before it claims anything: the backend's name and, unless
    `name_only`, its resources and numbers in satrl.toml; the [image] settings."""
    from orchestrator.catalog import nearest
    from orchestrator.dispatching import check_config
    from orchestrator.images import image_settings
    from orchestrator.resources import resolve_resources
    from orchestrator.schedulers import BACKENDS, get_scheduler

    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r}{nearest(backend, list(BACKENDS))}; "
                         f"backends: {', '.join(BACKENDS)}")
    image_settings(settings)
    if name_only:
        return
    scheduler = get_scheduler(backend, settings)
    resolve_resources(settings, backend)
    check_config(settings, scheduler)


@app.command("cancel")
def cancel_command(
    runs: RunsArg = None,
    experiment: ExperimentOpt = None,
    games: GamesOpt = None,
    attn: AttnOpt = None,
    seed_list: SeedListOpt = None,
    state: StateOpt = None,
    all_: Annotated[bool, typer.Option("--all", help="Every open run of the experiment.")
                    ] = False,
    dry_run: DryRunOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Cancel queued, submitted and running runs (scheduler jobs included)."""
    from orchestrator.runctl import cancel

    if not (runs or games or attn or seed_list or state or all_):
        raise UsageError("cancel needs RUN, a filter (--games, --attn, --seed-list, --state) "
                         "or --all")
    result = cancel(_registry(), _settings(),
                    _filter(runs, experiment, games, attn, seed_list, state), dry_run=dry_run)
    if json_:
        print_json(result.to_json())
        return
    for key, why in result.skipped.items():
        err_console.print(f"[yellow]skipped[/yellow] {escape(key)}: {escape(why)}",
                          highlight=False, soft_wrap=True)
    verb = "would cancel" if dry_run else "cancelled"
    jobs = sum(len(v) for v in result.jobs.values())
    console.print(f"{verb} {len(result.cancelled)} run(s)"
                  + (f" ({jobs} scheduler job(s))" if jobs else ""))
    if dry_run:
        for _, key in result.cancelled:
            console.print(f"  {key}", highlight=False, markup=False)
    if result.settled:  # their workers had finished: exit.json, not the cancel, says how
        console.print(f"{'would settle' if dry_run else 'settled'} {len(result.settled)} "
                      "finished run(s) from their exit.json instead")
        for _, key, state in result.settled:
            console.print(f"  {key} -> {state}", highlight=False, markup=False)


@app.command("logs")
def logs_command(
    run_ref: Annotated[str, typer.Argument(metavar="RUN", help="Run id or GAME/ATTN/SEED.")],
    attempt: Annotated[int | None, typer.Option("--attempt", help="Attempt number "
                                                "(default: the newest).")] = None,
    tail: Annotated[int | None, typer.Option("--tail", help="Only the last N lines.")] = None,
    stream: Annotated[str, typer.Option("--stream", help="out, err or both.")] = "both",
    experiment: ExperimentOpt = None,
) -> None:
    """The job's stdout and stderr of one attempt (RUN_DIR/logs/attempt-<n>.out|.err)."""
    import sys

    from orchestrator.runctl import read_logs

    if stream not in ("out", "err", "both"):
        raise UsageError(f"--stream must be out, err or both, not {stream!r}")
    streams = ("out", "err") if stream == "both" else (stream,)
    files = read_logs(_registry(), run_ref, current_experiment(experiment), attempt=attempt,
                      tail=tail, streams=streams)
    for log in files:
        if len(files) > 1:
            err_console.print(f"[bold]==> {escape(str(log.path))} <==[/bold]", highlight=False)
        sys.stdout.write(log.text)
        sys.stdout.flush()
