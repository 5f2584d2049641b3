"""metrics.csv as the worker writes it: a row appended per update, whole lines only for readers."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest

from agents.callbacks import METRIC_COLUMNS, MetricsTable
from orchestrator.store.ingest import read_metrics_csv


def _row(timesteps: int) -> dict[str, float]:
    row: dict[str, float] = {name: 0.5 + timesteps / 1e6 for name in METRIC_COLUMNS}
    row["timesteps"] = timesteps
    return row


def _expected_text(steps: list[int]) -> str:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=METRIC_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for step in steps:
        writer.writerow({k: repr(v) if isinstance(v, float) else str(v)
                         for k, v in _row(step).items()})
    return text.getvalue()


def test_rows_are_appended_to_the_same_file(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    table = MetricsTable(path)
    table.append(_row(256))
    inode = path.stat().st_ino
    for step in (512, 768):
        table.append(_row(step))
    table.sync()
    # The same inode: appended in place, not rewritten to a new file and renamed over it.
    assert path.stat().st_ino == inode
    assert path.read_text() == _expected_text([256, 512, 768])
    assert [t for t, name, _ in read_metrics_csv(path) if name == "loss"] == [256, 512, 768]
    assert [row["timesteps"] for row in MetricsTable(path).rows] == ["256", "512", "768"]


def test_an_unterminated_last_line_is_skipped_then_dropped(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    table = MetricsTable(path)
    for step in (256, 512):
        table.append(_row(step))
    with path.open("a") as handle:  # a worker killed while it wrote the row of 768
        handle.write("768,0.51,0.00")
    assert [t for t, name, _ in read_metrics_csv(path) if name == "loss"] == [256, 512]

    resumed = MetricsTable(path)
    assert [row["timesteps"] for row in resumed.rows] == ["256", "512"]
    assert resumed.drop_after(512) == 0
    assert path.read_text() == _expected_text([256, 512])  # rewritten without the cut line
    resumed.append(_row(768))
    assert path.read_text() == _expected_text([256, 512, 768])


def test_a_cut_line_is_never_glued_to_the_next_row(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    path.write_text(_expected_text([256]) + "512,0.5")
    table = MetricsTable(path)  # no drop_after: append itself must rewrite first
    table.append(_row(512))
    assert path.read_text() == _expected_text([256, 512])


@pytest.mark.parametrize("content", ["", "timesteps,loss\n256,0.1\n"])
def test_an_empty_or_foreign_file_is_rewritten_with_the_header(tmp_path: Path,
                                                                content: str) -> None:
    path = tmp_path / "metrics.csv"
    path.write_text(content)
    table = MetricsTable(path)
    table.append(_row(256))
    assert path.read_text().startswith(",".join(METRIC_COLUMNS) + "\n")
    assert [t for t, name, _ in read_metrics_csv(path) if name == "loss"][-1] == 256
