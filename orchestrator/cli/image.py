"""`satrl image build|list|use`: the Apptainer images jobs run in, and their records."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from orchestrator.cli.app import (
    ExperimentOpt,
    JsonOpt,
    app,
    console,
    current_experiment,
    print_json,
)

image_app = typer.Typer(help="Worker images (Apptainer): build, list, choose per experiment.",
                        no_args_is_help=True)
app.add_typer(image_app, name="image")

FlavorOpt = Annotated[str, typer.Option("--flavor", help="cuda (NVIDIA, --nv) or rocm (AMD, "
                                        "--rocm).")]


def _registry() -> Any:
    from orchestrator.registry.db import open_registry

    return open_registry()


def _size(size_bytes: int) -> str:
    value = float(size_bytes)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"


def _commit(commit: str | None, dirty: bool | None) -> str:
    """A commit as `image list` shows it: 12 digits, +dirty where the sources differed."""
    if not commit:
        return "-"
    return commit[:12] + ("+dirty" if dirty else "")


@image_app.command("build")
def build(
    flavor: FlavorOpt,
    fakeroot: Annotated[bool, typer.Option("--fakeroot", help="Build without root "
                                           "(apptainer build --fakeroot).")] = False,
    out: Annotated[Path | None, typer.Option("--out", help="Image file (default: [image] dir "
                                             "of satrl.toml, else images/, named "
                                             "satrl-FLAVOR-DEFHASH-SHA256.sif, a new file for "
                                             "new bytes). Refused where it holds a recorded "
                                             "image of another flavor or one experiments use.")]
    = None,
    source: Annotated[Path | None, typer.Option("--source", help="satrl source checkout holding "
                                                "containers/ (default: this installation's).")]
    = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Do not echo apptainer's "
                                        "output (it is in the build log either way).")] = False,
    json_: JsonOpt = False,
) -> None:
    """Build containers/FLAVOR.def with apptainer and record the image in the registry."""
    from orchestrator.images import build_image, require_apptainer, source_root
    from orchestrator.settings import settings

    flavor = flavor.strip().lower()
    require_apptainer(flavor)
    source_root(source)  # a missing checkout is refused before the registry is opened

    echo = None if (quiet or json_) else (lambda line: console.print(line, style="dim",
                                                                     highlight=False,
                                                                     markup=False))
    registry = _registry()  # opened first: a registry problem should not cost a build
    result = build_image(registry, settings(), flavor, out=out,
                         fakeroot=fakeroot, source=source, on_line=echo)
    if json_:
        print_json(result.to_json())
        return
    verb = "recorded new" if result.created else "updated"
    gpu = (f"CUDA {result.versions.get('cuda')}" if result.flavor == "cuda"
           else f"ROCm {result.versions.get('rocm')}")
    console.print(f"{verb} image [bold]{result.image_id}[/bold] ({result.flavor}, torch "
                  f"{escape(str(result.versions.get('torch_version')))}, {escape(gpu)}) at "
                  f"{escape(result.path)}: "
                  f"{_size(result.size_bytes)}, sha256 {result.sha256[:12]}, commit "
                  f"{_commit(result.git_commit, result.git_dirty)}, built in "
                  f"{result.build_seconds:.0f} s", highlight=False)
    if result.replaced:
        console.print(f"it replaces image(s) {', '.join(map(str, result.replaced))} at that path"
                      + (f"; experiments now on image {result.image_id}: "
                         f"{', '.join(result.relinked)}" if result.relinked else ""),
                      highlight=False, markup=False)


@image_app.command("list")
def list_(
    flavor: Annotated[str | None, typer.Option("--flavor", help="Only cuda or rocm.")] = None,
    json_: JsonOpt = False,
) -> None:
    """The recorded images, newest first, with the experiments that use each."""
    from orchestrator.images import list_images

    registry = _registry()
    with registry.session() as session:
        images = list_images(session, flavor.strip().lower() if flavor else None)
    if json_:
        print_json([image.to_json() for image in images])
        return
    if not images:
        console.print("no images recorded; build one with `satrl image build --flavor cuda`")
        return
    table = Table(show_edge=False, pad_edge=False, box=None, header_style="bold")
    # Narrow terminals shrink the other columns first: id, sha256 and status stay whole.
    for column in ("id", "flavor", "torch", "cuda/rocm", "size", "sha256", "commit", "built",
                   "status", "experiments", "path"):
        table.add_column(column, no_wrap=column in ("id", "sha256", "commit", "status"),
                         overflow="fold" if column == "path" else "ellipsis")
    for image in images:
        # Registry text (versions an image reported, paths) is data, never markup.
        table.add_row(*(Text(value) for value in (
            str(image.id), image.flavor, image.torch_version or "-",
            image.cuda_version or image.rocm_version or "-", _size(image.size_bytes),
            image.sha256[:12], _commit(image.git_commit, image.git_dirty),
            image.built_at[:16].replace("T", " "), image.status,
            ",".join(image.experiments) or "-", image.path)))
    console.print(table)


@image_app.command("use")
def use(
    image: Annotated[str, typer.Argument(metavar="IMAGE", help="Image id, sha256 prefix, or "
                                         "none (back to satrl.toml's [image] / plain python).")],
    experiment: ExperimentOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Make an experiment's jobs run in IMAGE (experiments.image_id)."""
    from orchestrator.images import use_image

    result = use_image(_registry(), current_experiment(experiment), image)
    if json_:
        print_json(result.to_json())
        return
    if result.image_id is None:
        console.print(f"experiment [bold]{result.experiment}[/bold] names no image now "
                      f"(was {result.previous_id or 'none'}); its jobs follow satrl.toml")
        return
    console.print(f"experiment [bold]{result.experiment}[/bold] runs in image "
                  f"[bold]{result.image_id}[/bold] ({result.flavor}, {escape(result.path)}, sha256 "
                  f"{(result.sha256 or '')[:12]})"
                  + (f"; was {result.previous_id}" if result.previous_id not in
                     (None, result.image_id) else ""), highlight=False)
