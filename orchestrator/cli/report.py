"""Results commands: `satrl report` and `satrl import-results`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from orchestrator.cli.app import (
    ExperimentOpt,
    JsonOpt,
    app,
    check_output_folder,
    console,
    current_experiment,
    err_console,
    os_error_line,
    print_json,
)
from orchestrator.errors import SatrlError, UsageError


@app.command()
def report(
    experiment: ExperimentOpt = None,
    format_: Annotated[str, typer.Option("--format", "-f", help="table, md, csv, latex or "
                                         "html (html: one self-contained file with the "
                                         "figures).")] = "table",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write the report and its "
                                             "figures (PNG) into this folder.")] = None,
    compare: Annotated[str | None, typer.Option("--compare", help="Another experiment (e.g. "
                                                "the imported paper) to compare each cell "
                                                "with.")] = None,
    videopinball_random: Annotated[str, typer.Option(
        "--videopinball-random", help="VideoPinball's random score: paper (0.0, as the study "
        "normalised) or standard (16256.9).")] = "paper",
    reps: Annotated[int, typer.Option("--reps", help="Bootstrap repetitions of the "
                                      "confidence intervals.")] = 2000,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the bootstrap (same seed, same "
                                      "intervals).")] = 0,
) -> None:
    """The paper's tables and figures for one experiment, computed from the registry.

    Per-game table with winners and wins per type, wins by axis of dynamics, human-normalised
    aggregates with bootstrap CIs, probability of improvement, performance profiles, sample
    efficiency and learning curves. Missing runs and evaluations are listed, never averaged in.
    """
    from orchestrator.analysis.render import FORMATS, render_text, rich_renderables, write_report
    from orchestrator.analysis.report import ReportOptions, build_report
    from orchestrator.catalog import nearest
    from orchestrator.registry.db import open_registry

    if format_ not in FORMATS:
        raise UsageError(f"unknown --format {format_!r}{nearest(format_, FORMATS)}; formats: "
                         f"{', '.join(FORMATS)}")
    if out is not None:
        check_output_folder(out)  # before the bootstrap, not after it
    options = ReportOptions(
        experiment=current_experiment(experiment), compare=compare,
        videopinball_random=videopinball_random, reps=reps, seed=seed,
        # Figures only where they can go: a folder, or inlined in HTML.
        figures=out is not None or format_ == "html")
    result = build_report(open_registry(), options)
    if out is not None:
        try:
            written = write_report(result, format_, out)
        except OSError as error:
            # What the check could not foresee (/proc, a full disk): one line, not a traceback.
            raise SatrlError(f"cannot write the report into {out}: "
                             f"{os_error_line(error)}") from None
        figures = sum(1 for p in written if p.suffix == ".png")
        console.print(f"wrote {out / written[0].name} and {figures} figures under "
                      f"{out / 'figures'}", highlight=False, soft_wrap=True, markup=False)
        if result.gaps.any:
            err_console.print("[yellow]the study has gaps: see the report's Gaps section[/]")
        return
    if format_ == "table":
        from rich.console import Console

        # A pipe or a file gets the whole table, not one wrapped to 80 columns.
        target = console if console.is_terminal else Console(width=200)
        for item in rich_renderables(result):
            target.print(item)
        return
    sys.stdout.write(render_text(result, format_))


@app.command("import-results")
def import_results_command(
    file: Annotated[Path, typer.Argument(metavar="FILE.pkl", help="The study's published "
                                         "results (post_processed_results_56.pkl).")],
    experiment: Annotated[str, typer.Option("--experiment", "-e", help="Experiment to hold "
                                            "the imported runs (e.g. paper).")],
    json_: JsonOpt = False,
) -> None:
    """Import published results as succeeded runs of an imported experiment.

    The pickle is loaded with an unpickler that admits only numpy arrays, dtypes and scalars (a
    pickle naming anything else is refused before it runs). Seeds are assigned in column order
    (0, 1, 10, 42, 1234). Importing the same file again adds nothing.
    """
    from orchestrator.analysis.published import import_results
    from orchestrator.paths import check_experiment_name
    from orchestrator.registry.db import open_registry

    result = import_results(open_registry(), file, check_experiment_name(experiment))
    if json_:
        print_json(result.to_json())
        return
    if result.runs_added == 0:
        console.print(f"nothing to add: the {result.runs_in_file} runs of {result.source} are "
                      f"already in experiment [bold]{experiment}[/bold]")
        return
    console.print(f"imported [bold]{result.runs_added}[/bold] runs and "
                  f"{result.evaluations_added:,} evaluations from {result.source} into "
                  f"experiment [bold]{experiment}[/bold] (seeds assigned in column order; the "
                  "published order is unknown)", highlight=False)
