"""`satrl report`'s formats, files, figures and `--compare`, on small synthetic studies."""

from __future__ import annotations

import base64
import csv
import math
import re
from pathlib import Path

import pytest

from orchestrator.cli import run
from tests.analysis_support import constant_run, make_study

PNG = b"\x89PNG\r\n\x1a\n"
GAMES, ATTNS, SEEDS = ["Pong", "Breakout"], ["NA", "CWCA"], [0, 1]


def _study(registry, name: str, offset: float) -> None:  # type: ignore[no-untyped-def]
    episodes = {(g, a, s): constant_run(base + offset + s)
                for g, base_g in (("Pong", -20.0), ("Breakout", 2.0))
                for a, base in (("NA", base_g), ("CWCA", base_g + 5.0)) for s in SEEDS}
    make_study(registry, name, GAMES, ATTNS, SEEDS, episodes)


@pytest.fixture
def two_studies(registry, workspace):  # type: ignore[no-untyped-def]
    # "new" is "old" + 1 everywhere; each cell's seeds score x and x + 1: s.e. 0.5 / sqrt(2).
    _study(registry, "old", 0.0)
    _study(registry, "new", 1.0)
    return registry


def test_markdown_latex_and_csv(two_studies, capsys) -> None:  # type: ignore[no-untyped-def]
    assert run(["report", "-e", "new", "-f", "md", "--reps", "20"]) == 0
    md = capsys.readouterr().out
    assert "| Pong | horizontal | -18.50 ± 0.35 | **-13.50 ± 0.35** |" in md
    assert "| **wins** | 2 games | **0** | **2** |" in md
    assert "## Aggregates (human-normalised)" in md and "## Gaps" not in md
    assert run(["report", "-e", "new", "-f", "latex", "--reps", "20"]) == 0
    tex = capsys.readouterr().out
    assert r"\begin{tabular}" in tex and r"\textbf{-13.50 $\pm$ 0.35}" in tex
    assert tex.count(r"\begin{tabular}") == tex.count(r"\end{tabular}")


def test_html_is_one_self_contained_file(two_studies, tmp_path: Path, capsys  # type: ignore[no-untyped-def]
                                         ) -> None:
    out = tmp_path / "rep"
    assert run(["report", "-e", "new", "-f", "html", "--out", str(out), "--reps", "20"]) == 0
    page = (out / "report.html").read_text()
    sources = re.findall(r'src="([^"]+)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "<link" not in page and "<script" not in page
    images = [base64.b64decode(s.split(",", 1)[1]) for s in sources]
    assert all(img.startswith(PNG) for img in images)
    # aggregates, PoI, profiles, efficiency, the overview and one curve per game.
    assert len(images) == 4 + 1 + len(GAMES)
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert written == ["figures/aggregates.png", "figures/curves/Breakout.png",
                       "figures/curves/Pong.png", "figures/learning_curves.png",
                       "figures/performance_profiles.png",
                       "figures/probability_of_improvement.png", "figures/sample_efficiency.png"]
    assert not list(out.rglob("*.tmp"))


def test_csv_out_writes_one_file_per_table(two_studies, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "rep"
    assert run(["report", "-e", "new", "-f", "csv", "--out", str(out), "--reps", "20",
                "--compare", "old"]) == 0
    names = sorted(p.name for p in out.glob("*.csv"))
    assert names == ["aggregates.csv", "compare.csv", "probability_of_improvement.csv",
                     "sample_efficiency.csv", "table.csv", "wins_by_axis.csv"]
    axis_rows = list(csv.DictReader((out / "wins_by_axis.csv").open()))
    assert {r["axis"]: (r["NA"], r["CWCA"]) for r in axis_rows}["vertical"] == ("0", "1")
    # Numbers a program reads: one column per part, full precision, no display text.
    aggregates = list(csv.DictReader((out / "aggregates.csv").open()))
    assert [r["type"] for r in aggregates] == ["NA", "CWCA"]
    for row in aggregates:
        low, point, high = (float(row[f"IQM{s}"]) for s in ("_low", "", "_high"))
        assert low <= point <= high
    efficiency = list(csv.DictReader((out / "sample_efficiency.csv").open()))
    steps = [int(r["steps"]) for r in efficiency]  # 1024, not "1,024"
    assert steps == sorted(steps) and steps[0] == 256 and steps[-1] == 1024
    compared = {(r["game"], r["type"]): r for r in csv.DictReader((out / "compare.csv").open())}
    pong_na = compared[("Pong", "NA")]
    assert float(pong_na["this"]) == -18.5 and float(pong_na["old"]) == -19.5
    assert float(pong_na["this_se"]) == pytest.approx(0.5 / math.sqrt(2))  # seeds x, x + 1
    assert float(pong_na["difference"]) == 1.0 and pong_na["differs (p < 0.05)"] == "no"
    assert float(pong_na["p (Welch)"]) == pytest.approx(1 - math.sqrt(2) / 2)


def test_csv_to_stdout_with_compare_carries_the_comparison(two_studies, capsys  # type: ignore[no-untyped-def]
                                                          ) -> None:
    """`report -f csv --compare old > table.csv`: the comparison was dropped without a word."""
    assert run(["report", "-e", "new", "-f", "csv", "--reps", "20", "--compare", "old"]) == 0
    rows = list(csv.DictReader(capsys.readouterr().out.splitlines()))
    assert len(rows) == len(GAMES) * len(ATTNS)
    pong_na = next(r for r in rows if (r["game"], r["attn"]) == ("Pong", "NA"))
    assert pong_na["compare_experiment"] == "old" and float(pong_na["mean"]) == -18.5
    assert float(pong_na["compare_mean"]) == -19.5 and float(pong_na["difference"]) == 1.0
    assert float(pong_na["compare_std_error"]) == pytest.approx(0.5 / math.sqrt(2))
    assert float(pong_na["p_value"]) == pytest.approx(1 - math.sqrt(2) / 2)
    assert pong_na["differs"] == "0"
    # A cell the other study lacks: named, with the other columns empty.
    make_study(two_studies, "pong_only", ["Pong"], ATTNS, SEEDS,
               {("Pong", a, s): constant_run(-20.0 + s) for a in ATTNS for s in SEEDS})
    assert run(["report", "-e", "new", "-f", "csv", "--reps", "20", "--compare",
                "pong_only"]) == 0
    rows = list(csv.DictReader(capsys.readouterr().out.splitlines()))
    breakout = next(r for r in rows if (r["game"], r["attn"]) == ("Breakout", "CWCA"))
    assert breakout["compare_experiment"] == "pong_only" and breakout["mean"] != ""
    assert [breakout[c] for c in ("compare_mean", "difference", "p_value", "differs")] == [""] * 4
    assert run(["report", "-e", "new", "-f", "csv", "--reps", "20"]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert header == "experiment,game,axis,attn,n_seeds,expected_seeds,mean,std_error,winner," \
        "complete"


def test_compare_by_hand(two_studies, capsys) -> None:  # type: ignore[no-untyped-def]
    """Welch's t-test of each cell's two seeds (x, x + 1) against the other study's.

    Every cell a side has s^2 = 0.5 (ddof=1), so t = d / sqrt(0.5 / 2 + 0.5 / 2) = d sqrt(2) with
    2 degrees of freedom, where P(|T| >= t) = 1 - t / sqrt(2 + t^2).
    """
    def p_value(difference: float) -> str:
        t = difference * math.sqrt(2)
        return f"{1 - t / math.sqrt(2 + t * t):.3g}"

    # new = old + 1: p = 0.293, no evidence of a difference with two seeds a side.
    assert run(["report", "-e", "new", "--compare", "old", "-f", "md", "--reps", "20"]) == 0
    md = capsys.readouterr().out
    assert p_value(1.0) == "0.293"
    assert f"| Pong | NA | -18.50 ± 0.35 | -19.50 ± 0.35 | +1.00 | {p_value(1.0)} |  |" in md
    assert "differs: p < 0.05; 0 of 4 tested cells" in md and "Welch" in md
    # far = old + 10: p = 0.005 in every cell.
    _study(two_studies, "far", 10.0)
    assert run(["report", "-e", "far", "--compare", "old", "-f", "md", "--reps", "20"]) == 0
    md = capsys.readouterr().out
    assert (f"| Pong | NA | -9.50 ± 0.35 | -19.50 ± 0.35 | +10.00 | {p_value(10.0)} | **yes** |"
            in md)
    assert "4 of 4 tested cells" in md
    assert run(["report", "-e", "old", "--compare", "old", "-f", "md", "--reps", "20"]) == 0
    md = capsys.readouterr().out
    assert "| Pong | NA | -19.50 ± 0.35 | -19.50 ± 0.35 | +0.00 | 1 |  |" in md
    assert "0 of 4 tested cells" in md


def test_compare_warns_of_another_grid_and_says_why_cells_are_left_out(  # type: ignore[no-untyped-def]
        two_studies, capsys) -> None:
    """Studies trained for different budgets differ everywhere for that reason alone."""
    assert run(["report", "-e", "new", "--compare", "old", "-f", "md", "--reps", "20"]) == 0
    md = capsys.readouterr().out
    assert "Warning" not in md and "not compared" not in md
    longer = {(g, a, s): constant_run(base + s, n_evals=8) for g, base in (("Pong", -20.0),)
              for a in ATTNS for s in SEEDS}
    make_study(two_studies, "longer", ["Pong"], ATTNS, SEEDS, longer, n_evals=8)
    assert run(["report", "-e", "new", "--compare", "longer", "-f", "md", "--reps", "20"]) == 0
    md = capsys.readouterr().out
    assert ("Warning: the studies' evaluation grids differ (this: 4 evaluations up to 1,024 "
            "steps; longer: 8 evaluations up to 2,048 steps)") in md
    assert "2 cells are not in longer and are not compared." in md
    assert run(["report", "-e", "longer", "--compare", "new", "-f", "md", "--reps", "20"]) == 0
    md = capsys.readouterr().out
    assert "this: 8 evaluations up to 2,048 steps; new: 4 evaluations" in md
    assert "2 cells are only in new and are not compared." in md


def test_same_seed_same_report(two_studies, capsys) -> None:  # type: ignore[no-untyped-def]
    outputs = []
    for seed in ("3", "3", "4"):
        assert run(["report", "-e", "new", "-f", "md", "--reps", "50", "--seed", seed]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]
    assert outputs[0] != outputs[2]


@pytest.mark.parametrize(("args", "message"), [
    (["-f", "pdf"], "unknown --format 'pdf'"),
    (["-e", "nope"], "no experiment 'nope'"),
    (["--videopinball-random", "dqn"], "paper or standard"),
    (["--compare", "nope"], "no experiment 'nope'"),
    (["--reps", "0"], "--reps must be at least 1"),
])
def test_bad_options_one_line_exit_2(two_studies, capsys, args, message) -> None:  # type: ignore[no-untyped-def]
    base = ["report"] if "-e" in args else ["report", "-e", "new"]
    assert run(base + args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_empty_experiment_and_queued_only_study(registry, workspace, capsys) -> None:  # type: ignore[no-untyped-def]
    make_study(registry, "fresh", ["Pong"], ["NA", "CWCA"], [0], {})
    assert run(["report", "-e", "fresh", "--reps", "10"]) == 0
    out = capsys.readouterr().out
    assert "runs without evaluations (2)" in out and "No game has every seed" in out
    assert "satrl fetch" not in out  # queued runs: nothing to fetch yet
    # A run that succeeded but was never fetched: the report says how to bring it in.
    from sqlalchemy import text

    with registry.write() as session:
        session.execute(text("UPDATE runs SET state = 'succeeded' WHERE attn = 'NA'"))
    assert run(["report", "-e", "fresh", "--reps", "10"]) == 0
    out = capsys.readouterr().out
    assert "1 succeeded run(s) have no evaluations in the registry yet: `satrl fetch --all " \
        "--finished-only` brings them in." in " ".join(out.split())


def test_one_attention_type_reports_without_probability_of_improvement(  # type: ignore[no-untyped-def]
        registry, workspace, tmp_path: Path, capsys) -> None:
    episodes = {(g, "NA", s): constant_run(base + s)
                for g, base in (("Pong", -20.0), ("Breakout", 2.0)) for s in SEEDS}
    make_study(registry, "solo", GAMES, ["NA"], SEEDS, episodes)
    out = tmp_path / "rep"
    assert run(["report", "-e", "solo", "-f", "md", "--out", str(out), "--reps", "20"]) == 0
    page = (out / "report.md").read_text()
    assert "## Aggregates (human-normalised)" in page
    assert "Probability of improvement" not in page
    assert (out / "figures" / "aggregates.png").is_file()
    assert not (out / "figures" / "probability_of_improvement.png").exists()


def test_unwritable_out_is_one_line_and_refused_before_the_work(  # type: ignore[no-untyped-def]
        two_studies, tmp_path: Path, capsys, monkeypatch) -> None:
    import orchestrator.analysis.report as report_module

    afile = tmp_path / "afile"
    afile.write_text("x")
    built = []
    real_build = report_module.build_report
    monkeypatch.setattr(report_module, "build_report",
                        lambda *a, **k: built.append(1) or real_build(*a, **k))
    for out, message in ((afile / "sub", "afile is not a folder"),
                         (afile, "exists and is not a folder")):
        assert run(["report", "-e", "new", "--out", str(out), "--reps", "20"]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert built == []  # refused before the bootstrap
    assert afile.read_text() == "x"
    # A folder no check foresees as unwritable (/proc takes no new folders): still one line.
    assert run(["report", "-e", "new", "--out", "/proc/satrl-report", "--reps", "20"]) == 1
    err = capsys.readouterr().err.strip()
    assert "cannot write the report into /proc/satrl-report" in err
    assert len(err.splitlines()) == 1
