"""`satrl attention`: the paper's interpretability figures for a fetched run (or any checkpoint)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from orchestrator.cli.app import (
    ExperimentOpt,
    JsonOpt,
    app,
    check_output_folder,
    console,
    current_experiment,
    os_error_line,
    print_json,
)
from orchestrator.errors import SatrlError, UsageError


@app.command()
def attention(
    game: Annotated[str | None, typer.Argument(help="Game, e.g. Pong.", show_default=False)] = None,
    attn: Annotated[str | None, typer.Argument(
        help="Attention type (NA, SWA, CWRA, CWCA, CWRCA); with --compare also all or a "
             "comma list.", show_default=False)] = None,
    seed: Annotated[int | None, typer.Argument(help="Seed of the run (with --fresh: the "
                                               "initialisation seed).", show_default=False)] = None,
    experiment: ExperimentOpt = None,
    step: Annotated[int | None, typer.Option("--step", help="The checkpoint at this many agent "
                                             "steps (default: the newest).")] = None,
    observations: Annotated[list[str] | None, typer.Option(
        "--observations", "-O", help="Observation dumps: a folder, a .npy file or a quoted glob; "
        "repeatable (default: the run's observations/ in the store).")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Output folder (default: "
                                             "<workspace>/attention).")] = None,
    compare: Annotated[bool, typer.Option("--compare", help="All fetched types of GAME/SEED side "
                                          "by side on the same observations.")] = False,
    checkpoint: Annotated[Path | None, typer.Option(
        "--checkpoint", help="An SB3 checkpoint from elsewhere instead of a store run.")] = None,
    attn_opt: Annotated[str | None, typer.Option(
        "--attn", help="Type of the --checkpoint (default: from the run.json beside it).")] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Freshly initialised policies (seeded by "
                                        "SEED) instead of checkpoints: the untrained "
                                        "baseline.")] = False,
    limit: Annotated[int | None, typer.Option("--limit", help="At most this many observations "
                                              "(rows).", min=1)] = None,
    cmap: Annotated[str, typer.Option("--cmap", help="Colour map of the feature maps "
                                      "(matplotlib name; the input is always gray).")] = "inferno",
    scale: Annotated[int, typer.Option("--scale", help="Pixels per map pixel (1..8).")] = 2,
    json_: JsonOpt = False,
) -> None:
    """Attention maps: input, F1, Y, Y + F1 and ReLU(c2) of a run's policy, one row per observation.

    Checkpoints are read without unpickling anything but tensors; a checkpoint of another
    architecture is refused.
    """
    from orchestrator import catalog
    from orchestrator.attention_maps import AttentionRequest, attention_maps
    from orchestrator.settings import settings

    if checkpoint is not None:
        if attn is not None or seed is not None:
            raise UsageError("--checkpoint replaces ATTN SEED: give the type with --attn "
                             "(GAME is optional, for action names)")
        attns = [catalog.parse_attn_one(attn_opt)] if attn_opt else []
    else:
        if attn_opt is not None:
            raise UsageError("--attn goes with --checkpoint; for a store run give ATTN after GAME")
        if game is None or attn is None or seed is None:
            raise UsageError("give GAME ATTN SEED (e.g. satrl attention Pong CWCA 42) or "
                             "--checkpoint PATH --attn TYPE")
        attns = catalog.parse_attn(attn) if compare else [catalog.parse_attn_one(attn)]
    config = settings()
    out_folder = out if out is not None else config.workspace / "attention"
    check_output_folder(out_folder)  # before the policies are loaded and run
    request = AttentionRequest(
        game=catalog.parse_game(game) if game else None,
        attns=attns,
        seed=seed,
        experiment=current_experiment(experiment),
        store=config.store,
        out=out_folder,
        step=step,
        observations=observations,
        checkpoint=checkpoint,
        compare=compare,
        fresh=fresh,
        colormap=cmap,
        scale=scale,
        limit=limit,
    )
    try:
        result = attention_maps(request)
    except OSError as error:
        if error.filename is None or not _inside(Path(error.filename), out_folder):
            raise
        raise SatrlError(f"cannot write into {out_folder}: {os_error_line(error)}") from None
    if json_:
        print_json(result.to_dict())
        return
    table = Table("observation", "type", "step", "action", "p", "value")
    for row in result.rows:
        name = f" {row['action_name']}" if row["action_name"] else ""
        # File names are the user's: data, never markup.
        table.add_row(Text(Path(row["observation"]).name), row["attn"], str(row["step"] or "-"),
                      Text(f"{row['action']}{name}"), f"{row['probability']:.2f}",
                      f"{row['value']:.3f}")
    console.print(table)
    if result.skipped:
        console.print(f"not fetched (or not at that step), left out: {', '.join(result.skipped)}",
                      markup=False)
    console.print(f"wrote {result.png}\n      {result.json_path}\n      {result.csv_path}\n"
                  f"      {result.npz_path}", highlight=False, markup=False)


def _inside(path: Path, folder: Path) -> bool:
    """Whether `path` is `folder` or lies below it (an error about an output file)."""
    path, folder = path.expanduser().absolute(), folder.expanduser().absolute()
    return path == folder or folder in path.parents
