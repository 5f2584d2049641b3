"""A report as text: rich tables for a terminal, Markdown, CSV, LaTeX or one self-contained HTML.

Every format renders the same sections, built once by `sections()`: header, gaps (always shown
when there are any), the per-game table with winners and wins, wins by axis, aggregates,
probability of improvement, sample efficiency and the comparison. CSV is the per-game table in
long form (one row per game and type), the format a spreadsheet or pandas reads.
"""

from __future__ import annotations

import base64
import csv
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agents.catalog import AXES, GAMES
from agents.rundir import write_bytes
from orchestrator.analysis.aggregates import METRICS
from orchestrator.analysis.compare import ALPHA
from orchestrator.analysis.report import Report
from orchestrator.analysis.table import Cell

FORMATS = ("table", "md", "csv", "latex", "html")
EXTENSIONS = {"table": "txt", "md": "md", "csv": "csv", "latex": "tex", "html": "html"}


@dataclass(frozen=True)
class Value:
    """One rendered cell: its text and whether it is emphasised (a winner, a gap).

    `raw` is the cell for a program (CSV): its numbers at full precision by column suffix,
    "" for the value itself (`{"": mean, "_se": std_error}`); None where the text is the value.
    """

    text: str
    bold: bool = False
    warn: bool = False
    raw: dict[str, Any] | None = None


@dataclass
class Section:
    title: str
    headers: list[str]
    rows: list[list[Value]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _num(x: float) -> str:
    return f"{x:.2f}" if abs(x) < 1000 else f"{x:.1f}"


def _mean_se(mean: float, std_error: float | None) -> str:
    # One seed has no spread: its standard error is undefined, not zero.
    return f"{_num(mean)} ± {'n/a' if std_error is None else _num(std_error)}"


def _cell(cell: Cell, winner: bool) -> Value:
    raw = {"": cell.mean, "_se": cell.std_error, "_seeds": cell.n_seeds}
    if cell.mean is None:
        return Value(f"missing (0/{cell.expected_seeds} seeds)", warn=True, raw=raw)
    text = _mean_se(cell.mean, cell.std_error)
    if not cell.complete:
        return Value(f"{text} ({cell.n_seeds}/{cell.expected_seeds} seeds)", bold=winner,
                     warn=True, raw=raw)
    return Value(text, bold=winner, raw=raw)


def _grid_text(grid: Sequence[int]) -> str:
    if len(grid) == 0:
        return ""
    if len(grid) == 1:
        return f" (at {grid[0]:,} steps)"
    return f" (at {grid[0]:,}, {grid[1]:,}, ..., {grid[-1]:,} steps)"


def _ci(point: float, low: float, high: float) -> Value:
    return Value(f"{point:.3f} [{low:.3f}, {high:.3f}]",
                 raw={"": float(point), "_low": float(low), "_high": float(high)})


def sections(report: Report) -> list[Section]:
    study, table, gaps, agg = report.study, report.table, report.gaps, report.aggregates
    out: list[Section] = []

    header = Section(f"satrl report: experiment {study.experiment}", [])
    header.notes.append(
        f"{len(study.runs)} runs: {len(study.games)} games x {len(study.attns)} types x "
        f"{len(study.seeds)} seeds ({', '.join(map(str, study.seeds))}); "
        f"{study.expected_evaluations} evaluations per complete run{_grid_text(study.grid)}.")
    if study.imported:
        header.notes.append(f"Imported results. {study.notes}")
    header.notes.append(
        "Cell: mean over seeds of each complete run's mean over its evaluation grid ± population "
        "std (ddof=0) / sqrt(seeds), n/a below 2 seeds; bold: the game's winner (highest mean "
        "among its cells that have every seed of the game).")
    out.append(header)

    if gaps.any:
        section = Section("Gaps (left out of cells, wins and aggregates)", ["what", "which"])
        if gaps.no_evaluations:
            section.rows.append([Value(f"runs without evaluations ({len(gaps.no_evaluations)})",
                                       warn=True),
                                 Value(", ".join(f"{k} [{s}]" for k, s in gaps.no_evaluations))])
        if gaps.short_runs:
            section.rows.append([Value(f"runs short of evaluations ({len(gaps.short_runs)})",
                                       warn=True),
                                 Value(", ".join(f"{k} [{s}, {n}/{m}]"
                                                 for k, s, n, m in gaps.short_runs))])
        if gaps.short_cells:
            section.rows.append([Value(f"cells with fewer seeds ({len(gaps.short_cells)})",
                                       warn=True),
                                 Value(", ".join(f"{g}/{a} {n}/{m}"
                                                 for g, a, n, m in gaps.short_cells))])
        if gaps.off_grid:
            section.rows.append([Value(f"runs with evaluations off their grid, ignored "
                                       f"({len(gaps.off_grid)})", warn=True),
                                 Value(", ".join(f"{k} [{', '.join(f'{t:,}' for t in ts)}]"
                                                 for k, ts in gaps.off_grid))])
        if gaps.incomplete_games:
            section.rows.append([Value(f"games not counted ({len(gaps.incomplete_games)})",
                                       warn=True), Value(", ".join(gaps.incomplete_games))])
        if gaps.aggregates_left_out:
            section.rows.append([Value(f"complete games left out of the aggregates, another "
                                       f"number of seeds ({len(gaps.aggregates_left_out)})",
                                       warn=True), Value(", ".join(gaps.aggregates_left_out))])
        # A run that finished but whose results never came home is a fetch away, not a gap.
        unfetched = sum(state == "succeeded" for _, state in gaps.no_evaluations)
        if unfetched and not study.imported:
            section.notes.append(f"{unfetched} succeeded run(s) have no evaluations in the "
                                 "registry yet: `satrl fetch --all --finished-only` brings "
                                 "them in.")
        out.append(section)
    if gaps.games_not_in_study:
        header.notes.append(f"{len(gaps.games_not_in_study)} of the {len(GAMES)} games are not "
                            f"in this study: {', '.join(gaps.games_not_in_study)}.")

    per_game = Section("Per-game scores", ["game", "axis", *table.attns])
    for game in table.games:
        winners = table.winners.get(game, [])
        per_game.rows.append([Value(game), Value(GAMES[game])] + [
            _cell(table.cell(game, a), a in winners) for a in table.attns])
    wins = table.wins()
    per_game.rows.append([Value("wins", bold=True), Value(f"{len(table.complete_games)} games")]
                         + [Value(str(wins[a]), bold=True) for a in table.attns])
    out.append(per_game)

    by_axis = Section("Wins by axis of dynamics", ["axis", "games", *table.attns])
    for axis in AXES:
        n_games, axis_wins = table.wins_by_axis()[axis]
        best = max(axis_wins.values(), default=0)
        by_axis.rows.append([Value(axis), Value(str(n_games))] + [
            Value(str(axis_wins[a]), bold=best > 0 and axis_wins[a] == best)
            for a in table.attns])
    by_axis.notes.append("Ties count as a win for each tied type.")
    out.append(by_axis)

    if agg is None:
        out.append(Section("Aggregates", [], notes=[
            "No game has every seed of every type: no aggregates (see the gaps)."]))
    else:
        basis = (f"Human-normalised scores over {len(agg.games)} games (VideoPinball random: "
                 f"{report.options.videopinball_random}); 95% stratified-bootstrap CIs, "
                 f"{agg.reps} repetitions, seed {agg.seed}.")
        aggregates = Section("Aggregates (human-normalised)", ["type", *METRICS], notes=[basis])
        for attn in agg.attns:
            aggregates.rows.append([Value(attn)] + [
                _ci(agg.point[attn][k], agg.ci[attn][0][k], agg.ci[attn][1][k])
                for k in range(len(METRICS))])
        out.append(aggregates)
        if agg.poi:
            poi = Section("Probability of improvement over the rest", ["type", "P(X > rest)"],
                          notes=["The rest: the other types' runs pooled."])
            for attn, value in agg.poi.items():
                poi.rows.append([Value(attn), _ci(value, *agg.poi_ci[attn])])
            out.append(poi)
        efficiency = Section("Sample efficiency (IQM)", ["evaluation", "steps", *agg.attns])
        for k, (point, step) in enumerate(zip(agg.eval_points, agg.eval_timesteps,
                                              strict=True)):
            efficiency.rows.append([Value(str(point)), Value(f"{step:,}", raw={"": int(step)})]
                                   + [_ci(agg.efficiency[a][k], agg.efficiency_ci[a][0][k],
                                          agg.efficiency_ci[a][1][k]) for a in agg.attns])
        out.append(efficiency)

    comparison = report.comparison
    if comparison is not None:
        section = Section(f"Compared with {comparison.other}",
                          ["game", "type", "this", comparison.other, "difference",
                           "p (Welch)", f"differs (p < {ALPHA:g})"])
        section.notes.append(
            f"p: Welch's two-sample t-test of the two cells' per-seed scores (sample variances, "
            f"ddof=1; Welch-Satterthwaite degrees of freedom), n/a below 2 seeds on a side. "
            f"differs: p < {ALPHA:g}; {comparison.n_differ} of {comparison.n_tested} tested "
            f"cells. Two studies of the same distribution differ in about "
            f"{ALPHA:.0%} of their cells by chance alone.")
        if comparison.grids_differ is not None:
            this_grid, other_grid = comparison.grids_differ
            # First: it changes what every row means.
            section.notes.insert(0, f"Warning: the studies' evaluation grids differ (this: "
                                    f"{this_grid}; {comparison.other}: {other_grid}), so their "
                                    "scores measure different things: a difference here says "
                                    "nothing about the attention types.")
        left_out = [(comparison.only_other, f"are only in {comparison.other}"),
                    (comparison.only_this, f"are not in {comparison.other}"),
                    (comparison.incomplete, "are not complete in both studies")]
        for cells, why in left_out:
            if cells:
                section.notes.append(f"{len(cells)} cells {why} and are not compared.")
        for r in comparison.rows:
            section.rows.append([
                Value(r.game), Value(r.attn),
                Value(_mean_se(r.mean, r.std_error), raw={"": r.mean, "_se": r.std_error}),
                Value(_mean_se(r.other_mean, r.other_std_error),
                      raw={"": r.other_mean, "_se": r.other_std_error}),
                Value(f"{r.difference:+.2f}", raw={"": r.difference}),
                Value("n/a" if r.p_value is None else f"{r.p_value:.3g}",
                      raw={"": r.p_value}),
                Value("yes" if r.differs else "", bold=r.differs,
                      raw={"": "yes" if r.differs else "no"})])
        out.append(section)
    return out


# --- formats ---------------------------------------------------------------------------------
def to_markdown(report: Report, figure_dir: str | None = None) -> str:
    lines: list[str] = []
    for i, section in enumerate(sections(report)):
        lines.append(f"{'#' if i == 0 else '##'} {section.title}\n")
        lines.extend(f"{note}\n" for note in section.notes)
        if section.headers:
            lines.append("| " + " | ".join(section.headers) + " |")
            lines.append("|" + "|".join("---" for _ in section.headers) + "|")
            for row in section.rows:
                lines.append("| " + " | ".join(_md_value(v) for v in row) + " |")
            lines.append("")
    if figure_dir is not None and report.figures:
        lines.append("## Figures\n")
        lines.extend(f"![{name}]({figure_dir}/{name})\n" for name in report.figures)
    return "\n".join(lines)


def _md_value(value: Value) -> str:
    text = value.text.replace("|", "\\|")
    if value.bold:
        text = f"**{text}**"
    return f"⚠ {text}" if value.warn and not value.bold else text


def to_csv(report: Report) -> str:
    """The per-game table in long form: one row per (game, type). With --compare, each row
    also carries the other study's cell and Welch's test (empty where the cell is not
    compared), so `report -f csv --compare X > file.csv` loses nothing of the comparison."""
    def number(value: float | None) -> str:
        return "" if value is None else repr(value)

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    comparison = report.comparison
    compare_columns = ["compare_experiment", "compare_mean", "compare_std_error", "difference",
                       "p_value", "differs"] if comparison is not None else []
    writer.writerow(["experiment", "game", "axis", "attn", "n_seeds", "expected_seeds", "mean",
                     "std_error", "winner", "complete", *compare_columns])
    compared = {(row.game, row.attn): row for row in comparison.rows} if comparison else {}
    table = report.table
    for game in table.games:
        for attn in table.attns:
            cell = table.cell(game, attn)
            extra: list[Any] = []
            if comparison is not None:
                row = compared.get((game, attn))
                extra = [comparison.other] + (["", "", "", "", ""] if row is None else [
                    number(row.other_mean), number(row.other_std_error),
                    number(row.difference), number(row.p_value), int(row.differs)])
            writer.writerow([report.study.experiment, game, GAMES[game], attn, cell.n_seeds,
                             cell.expected_seeds, number(cell.mean), number(cell.std_error),
                             int(attn in table.winners.get(game, [])), int(cell.complete),
                             *extra])
    return buffer.getvalue()


def section_csv(section: Section) -> str:
    """The section for pandas or a spreadsheet: a column's cells with `raw` numbers become one
    column per part (`NA`, `NA_se`, `NA_seeds`; `IQM`, `IQM_low`, `IQM_high`) at full precision,
    empty where a part is unknown (a single seed's standard error)."""
    parts: list[list[str]] = []
    for column in range(len(section.headers)):
        seen: dict[str, None] = {}
        for row in section.rows:
            if column < len(row) and row[column].raw is not None:
                seen.update(dict.fromkeys(row[column].raw))
        parts.append(list(seen) or [""])
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([header + suffix for header, suffixes in zip(section.headers, parts,
                                                                 strict=True)
                     for suffix in suffixes])
    for row in section.rows:
        cells: list[Any] = []
        for value, suffixes in zip(row, parts, strict=False):
            if value.raw is None:
                cells += [value.text] + [""] * (len(suffixes) - 1)
            else:
                cells += ["" if value.raw.get(s) is None else value.raw[s] for s in suffixes]
        writer.writerow(cells)
    return buffer.getvalue()


_LATEX_ESCAPES = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
                  "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "\\": r"\textbackslash{}", "±": r"$\pm$"}


def _tex(text: str) -> str:
    return "".join(_LATEX_ESCAPES.get(ch, ch) for ch in text)


def to_latex(report: Report) -> str:
    parts: list[str] = [f"% {_tex(s)}" for s in sections(report)[0].notes]
    for section in sections(report)[1:]:
        if not section.headers:
            parts.append(f"% {_tex(section.title)}: " + " ".join(map(_tex, section.notes)))
            continue
        parts.append(f"% {_tex(section.title)}")
        parts.extend(f"% {_tex(note)}" for note in section.notes)
        columns = "l" * 1 + "r" * (len(section.headers) - 1)
        parts.append(r"\begin{tabular}{" + columns + "}")
        parts.append(r"\toprule")
        parts.append(" & ".join(_tex(h) for h in section.headers) + r" \\")
        parts.append(r"\midrule")
        for row in section.rows:
            parts.append(" & ".join(rf"\textbf{{{_tex(v.text)}}}" if v.bold else _tex(v.text)
                                    for v in row) + r" \\")
        parts.append(r"\bottomrule")
        parts.append(r"\end{tabular}")
        parts.append("")
    return "\n".join(parts) + "\n"


_HTML_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
td.win { font-weight: bold; background: #e6f4ea; }
td.warn { color: #a33; }
p.note { color: #555; font-size: 0.9em; margin: 0.2em 0; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; }
figure img { max-width: 100%; }
figcaption { font-size: 0.8em; color: #555; }
"""


def to_html(report: Report) -> str:
    """One self-contained file: tables, and every figure inlined as a base64 PNG."""
    body: list[str] = []
    for i, section in enumerate(sections(report)):
        tag = "h1" if i == 0 else "h2"
        body.append(f"<{tag}>{html.escape(section.title)}</{tag}>")
        body.extend(f'<p class="note">{html.escape(note)}</p>' for note in section.notes)
        if section.headers:
            body.append("<table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>"
                                                       for h in section.headers)
                        + "</tr></thead><tbody>")
            for row in section.rows:
                cells = []
                for v in row:
                    cls = "win" if v.bold else ("warn" if v.warn else "")
                    attr = f' class="{cls}"' if cls else ""
                    cells.append(f"<td{attr}>{html.escape(v.text)}</td>")
                body.append("<tr>" + "".join(cells) + "</tr>")
            body.append("</tbody></table>")
    if report.figures:
        body.append("<h2>Figures</h2>")
        for name, png in report.figures.items():
            data = base64.b64encode(png).decode("ascii")
            body.append(f'<figure><img alt="{html.escape(name)}" '
                        f'src="data:image/png;base64,{data}"><figcaption>{html.escape(name)}'
                        "</figcaption></figure>")
    title = html.escape(f"satrl report: {report.study.experiment}")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}"
            f"</title><style>{_HTML_STYLE}</style></head><body>\n" + "\n".join(body)
            + "\n</body></html>\n")


def rich_renderables(report: Report) -> list[object]:
    """The sections as rich tables for a terminal (`--format table`)."""
    from rich.table import Table
    from rich.text import Text

    out: list[object] = []
    for i, section in enumerate(sections(report)):
        out.append(Text(section.title, style="bold underline" if i == 0 else "bold"))
        out.extend(Text(note, style="dim") for note in section.notes)
        if section.headers:
            table = Table(*section.headers, box=None, header_style="bold", pad_edge=False)
            for row in section.rows:
                table.add_row(*[Text(v.text, style="bold green" if v.bold else
                                     ("yellow" if v.warn else "")) for v in row])
            out.append(table)
        out.append(Text(""))
    return out


def render_text(report: Report, fmt: str, figure_dir: str | None = None) -> str:
    """The report in `fmt` (md, csv, latex, html) as one string."""
    if fmt == "md":
        return to_markdown(report, figure_dir)
    if fmt == "csv":
        return to_csv(report)
    if fmt == "latex":
        return to_latex(report)
    if fmt == "html":
        return to_html(report)
    raise ValueError(f"no text rendering for {fmt!r}")


def _plain_table_text(report: Report) -> str:
    from rich.console import Console

    console = Console(record=True, width=200, file=io.StringIO(), color_system=None)
    for item in rich_renderables(report):
        console.print(item)
    return console.export_text()


_CSV_SECTIONS = {"Wins by axis of dynamics": "wins_by_axis.csv",
                 "Aggregates (human-normalised)": "aggregates.csv",
                 "Probability of improvement over the rest": "probability_of_improvement.csv",
                 "Sample efficiency (IQM)": "sample_efficiency.csv"}


def write_report(report: Report, fmt: str, out_dir: Path) -> list[Path]:
    """The report file, its figures (PNG) and, for csv, one CSV per table, into `out_dir`.

    Each file is written to a temporary name and renamed, so a reader never sees half a file.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    name = f"report.{EXTENSIONS[fmt]}"
    if fmt == "table":
        text = _plain_table_text(report)
    elif fmt == "csv":
        text = to_csv(report)
        name = "table.csv"
    else:
        text = render_text(report, fmt, figure_dir="figures")
    written.append(_write(out_dir / name, text.encode()))
    if fmt == "csv":
        for section in sections(report):
            file_name = _CSV_SECTIONS.get(section.title)
            if section.title.startswith("Compared with "):
                file_name = "compare.csv"
            if file_name and section.headers:
                written.append(_write(out_dir / file_name, section_csv(section).encode()))
    for figure, png in report.figures.items():
        written.append(_write(out_dir / "figures" / figure, png))
    return written


def _write(path: Path, data: bytes) -> Path:
    write_bytes(path, data)
    return path
