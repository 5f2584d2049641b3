"""PNG grids of 84x84 maps: one row per observation, one column per map, labels around them.

Drawn with numpy and Pillow rather than matplotlib's figure machinery so that every cell is the
map itself, pixel for pixel: cell (row, col) is the map quantised to 256 levels, looked up in the
column's colour map and enlarged `scale` times by repetition, at `GridLayout.cell_origin`. Text
(title, column headers, row labels with the chosen action) lives only in the margins.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from agents.rundir import atomic_writer
from orchestrator.errors import UsageError

MAP_SIZE = 84
FONT_PX = 11
LINE_PX = 13


@dataclass(frozen=True)
class Column:
    """One column of the grid: its header, an optional group header above it, its colour map."""

    title: str
    colormap: str
    group: str | None = None


@dataclass(frozen=True)
class GridLayout:
    """Pixel geometry of a grid; `cell_origin` says where each map's pixels are."""

    n_rows: int
    n_cols: int
    scale: int = 2
    grouped: bool = False
    pad_px: int = 4
    label_width_px: int = 200

    @property
    def cell_px(self) -> int:
        return MAP_SIZE * self.scale

    @property
    def header_px(self) -> int:
        # Title line, then the column headers (and a group line above them when grouped).
        return (3 if self.grouped else 2) * LINE_PX + self.pad_px

    @property
    def width_px(self) -> int:
        return self.label_width_px + self.n_cols * (self.cell_px + self.pad_px) + self.pad_px

    @property
    def height_px(self) -> int:
        return self.header_px + self.n_rows * (self.cell_px + self.pad_px) + self.pad_px

    def cell_origin(self, row: int, col: int) -> tuple[int, int]:
        """(x, y) of the top-left pixel of cell (row, col)."""
        return (self.label_width_px + self.pad_px + col * (self.cell_px + self.pad_px),
                self.header_px + self.pad_px + row * (self.cell_px + self.pad_px))


def check_colormap(name: str) -> str:
    """`name` when matplotlib knows it, else a UsageError with the nearest names."""
    import matplotlib

    if name in matplotlib.colormaps:
        return name
    from orchestrator.catalog import nearest

    raise UsageError(f"unknown colour map {name!r}{nearest(name, sorted(matplotlib.colormaps))}"
                     f" (e.g. inferno, viridis, jet, gray)")


@cache
def colormap_lut(name: str) -> np.ndarray:
    """(256, 3) uint8: the colour of each quantised level of `name`."""
    import matplotlib

    colormap = matplotlib.colormaps[check_colormap(name)]
    # Rounded, not matplotlib's bytes=True (which truncates): gray is then exactly level = value.
    rgba = np.asarray(colormap(np.arange(256) / 255.0))
    return np.rint(rgba[:, :3] * 255.0).astype(np.uint8)


def quantise(map_: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> 0..255 levels (nearest)."""
    return np.rint(np.clip(map_, 0.0, 1.0) * 255.0).astype(np.uint8)


def render_grid(
    path: Path,
    title: str,
    columns: Sequence[Column],
    row_labels: Sequence[Sequence[str]],
    cells: Sequence[Sequence[np.ndarray]],
    scale: int = 2,
) -> GridLayout:
    """Write the grid to `path` (PNG, atomically) and return its layout.

    :param cells: cells[row][col], each an (84, 84) map in [0, 1].
    :param row_labels: lines of text left of each row (observation name, chosen action).
    """
    grouped = any(column.group for column in columns)
    layout = GridLayout(n_rows=len(cells), n_cols=len(columns), scale=scale, grouped=grouped)
    canvas = np.full((layout.height_px, layout.width_px, 3), 255, dtype=np.uint8)
    for row, row_cells in enumerate(cells):
        if len(row_cells) != len(columns):
            raise ValueError(f"row {row} has {len(row_cells)} cells for {len(columns)} columns")
        for col, map_ in enumerate(row_cells):
            if map_.shape != (MAP_SIZE, MAP_SIZE):
                raise ValueError(f"cell ({row}, {col}) is {map_.shape}, not 84x84")
            rgb = colormap_lut(columns[col].colormap)[quantise(map_)]
            big = rgb.repeat(scale, axis=0).repeat(scale, axis=1)
            x, y = layout.cell_origin(row, col)
            canvas[y:y + layout.cell_px, x:x + layout.cell_px] = big
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    font = _font()
    _text(draw, font, (layout.pad_px, 2), title, layout.width_px - 2 * layout.pad_px)
    header_y = LINE_PX + 2
    for col, column in enumerate(columns):
        x, _ = layout.cell_origin(0, col)
        if column.group and (col == 0 or columns[col - 1].group != column.group):
            _text(draw, font, (x, header_y), column.group, layout.cell_px * 4, bold=True)
        _text(draw, font, (x, header_y + (LINE_PX if grouped else 0)), column.title,
              layout.cell_px)
    for row, lines in enumerate(row_labels):
        _, y = layout.cell_origin(row, 0)
        for i, line in enumerate(lines[: layout.cell_px // LINE_PX]):
            _text(draw, font, (layout.pad_px, y + i * LINE_PX), line,
                  layout.label_width_px - layout.pad_px)
    with atomic_writer(path) as handle:
        image.save(handle, format="PNG")
    return layout


@cache
def _font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=FONT_PX)


def _text(draw: ImageDraw.ImageDraw, font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
          xy: tuple[int, int], text: str, max_width_px: int, bold: bool = False) -> None:
    """Text cut to `max_width_px` so that it never runs into a neighbouring cell."""
    while text and draw.textlength(text, font=font) > max_width_px:
        text = text[:-2] + "…" if len(text) > 2 else ""
    draw.text(xy, text, fill=(0, 0, 0), font=font,
              stroke_width=1 if bold else 0, stroke_fill=(0, 0, 0))
