"""`satrl import-results`: the published pickle into the registry, and hostile pickles refused.

The pinned numbers are computed here with numpy straight from the pickle's arrays (AGENT.md's
protocol), not through the project's code; the report reads them back from the registry after the
imported copy of the pickle has been deleted.
"""

from __future__ import annotations

import csv
import io
import os
import pickle
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import func, select

from agents.catalog import PAPER_SEEDS
from agents.spec import PAPER
from orchestrator.analysis.published import UnsafePickleError, restricted_loads
from orchestrator.cli import run
from orchestrator.registry.db import Registry
from orchestrator.registry.models import Evaluation, Event, Experiment, Run

PUBLISHED = Path(__file__).resolve().parents[2] / "shared" / "reference" / \
    "post_processed_results_56.pkl"
if not PUBLISHED.exists():  # a checkout beside shared/ (CI) or the main work tree
    PUBLISHED = Path("/work/shared/reference/post_processed_results_56.pkl")
ATTNS = ("NA", "SWA", "CWRA", "CWCA", "CWRCA")


def published_arrays() -> dict[str, Any]:
    # The reference file is trusted here: the test's own numbers come from plain pickle + numpy.
    with PUBLISHED.open("rb") as handle:
        return pickle.load(handle)  # noqa: S301


@pytest.fixture
def imported(workspace: Path, tmp_path: Path, database_url: str) -> Registry:
    """The published results imported from a copy of the pickle, the copy then deleted."""
    copy = tmp_path / "results.pkl"
    shutil.copyfile(PUBLISHED, copy)
    assert run(["import-results", str(copy), "--experiment", "paper"]) == 0
    copy.unlink()
    return Registry(database_url)


def test_import_writes_runs_evaluations_and_events(imported: Registry) -> None:
    data = published_arrays()
    with imported.session() as session:
        experiment = session.scalars(select(Experiment)).one()
        assert experiment.imported and experiment.preset == "paper"
        assert "column order" in experiment.notes and "unknown" in experiment.notes
        assert session.scalar(select(func.count()).select_from(Run)) == 56 * 5 * 5
        assert set(session.scalars(select(Run.state).distinct())) == {"succeeded"}
        assert session.scalar(select(func.count()).select_from(Evaluation)) == 70_000
        assert session.scalar(select(func.count()).select_from(Evaluation)
                              .where(Evaluation.episode.isnot(None))) == 0
        assert set(session.scalars(select(Evaluation.n_episodes).distinct())) == {5}
        events = session.execute(select(Event.from_state, Event.to_state, Event.why)).all()
        assert len(events) == 1400
        assert set(events) == {(None, "succeeded", "imported from results.pkl")}
        # Seed column 3 of Pong/CWCA is seed 42; its spec is the paper's.
        run_ = session.scalars(select(Run).where(Run.game == "Pong", Run.attn == "CWCA",
                                                 Run.seed == PAPER_SEEDS[3])).one()
        spec = PAPER.replace(game="Pong", attn="CWCA", seed=42, experiment="paper")
        assert run_.spec_hash == spec.spec_hash() and run_.spec == spec.to_dict()
        scores = session.execute(select(Evaluation.timestep, Evaluation.score)
                                 .where(Evaluation.run_id == run_.id)
                                 .order_by(Evaluation.timestep)).all()
    pong = data["PongNoFrameskip-v4"]["CWCA"]
    assert [t for t, _ in scores] == pong["timesteps"].tolist()
    assert [s for _, s in scores] == pong["mean_per_eval"][:, 3].tolist()


def test_report_of_the_import_follows_the_protocol(imported: Registry,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    data = published_arrays()
    assert run(["report", "-e", "paper", "--format", "csv", "--reps", "10"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 280
    cells = {(r["game"], r["attn"]): r for r in rows}
    expected_wins = dict.fromkeys(ATTNS, 0)
    for env, by_attn in data.items():
        game = env.removesuffix("NoFrameskip-v4")
        means = {}
        for attn in ATTNS:
            per_seed = by_attn[attn]["mean_per_eval"].mean(axis=0)  # over the 50 evaluations
            mean = per_seed.mean()
            std_error = per_seed.std(ddof=0) / np.sqrt(5)
            means[attn] = mean
            row = cells[(game, attn)]
            assert float(row["mean"]) == pytest.approx(mean, rel=1e-9, abs=1e-9), (game, attn)
            assert float(row["std_error"]) == pytest.approx(std_error, rel=1e-9, abs=1e-9)
            assert row["n_seeds"] == "5" and row["complete"] == "1"
        best = max(means, key=means.__getitem__)
        expected_wins[best] += 1
        assert cells[(game, best)]["winner"] == "1"
    wins = {a: sum(r["winner"] == "1" for r in rows if r["attn"] == a) for a in ATTNS}
    assert wins == expected_wins
    assert sum(wins.values()) == 56


def test_pinned_cells_of_the_published_table(imported: Registry,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """A few cells and the wins as numbers, as the published table prints them."""
    assert run(["report", "-e", "paper", "--format", "csv", "--reps", "10"]) == 0
    cells = {(r["game"], r["attn"]): r for r in csv.DictReader(io.StringIO(
        capsys.readouterr().out))}
    assert float(cells[("Pong", "CWCA")]["mean"]) == pytest.approx(12.644, abs=1e-9)
    assert float(cells[("Pong", "CWCA")]["std_error"]) == pytest.approx(0.42530065, abs=1e-8)
    assert float(cells[("Breakout", "NA")]["mean"]) == pytest.approx(49.1744, abs=1e-9)
    wins = {a: sum(r["winner"] == "1" for k, r in cells.items() if k[1] == a) for a in ATTNS}
    assert wins == {"NA": 23, "SWA": 5, "CWRA": 8, "CWCA": 14, "CWRCA": 6}


def test_an_imported_experiment_has_nothing_to_fetch(
        imported: Registry, capsys: pytest.CaptureFixture[str]) -> None:
    """Not 1,400 lines of 'run directory does not exist': there is none, by design."""
    capsys.readouterr()
    assert run(["fetch", "--all", "-e", "paper"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == ("no runs match (runs never dispatched, and imported "
                                    "experiments' runs, have nothing to fetch)")
    assert captured.err == ""
    assert run(["fetch", "Pong", "CWCA", "42", "-e", "paper"]) == 2
    assert capsys.readouterr().err.strip() == (
        "satrl: Pong/CWCA/42 of experiment 'paper' was imported: its results are in the "
        "registry already, and it has no run directory to fetch")


def test_second_import_adds_nothing_and_another_file_is_refused(
        workspace: Path, tmp_path: Path, database_url: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["import-results", str(PUBLISHED), "-e", "paper"]) == 0
    assert run(["import-results", str(PUBLISHED), "-e", "paper", "--json"]) == 0
    assert '"runs_added": 0' in capsys.readouterr().out
    # A different file (one game only) into the same experiment: refused, nothing written.
    data = published_arrays()
    other = tmp_path / "other.pkl"
    other.write_bytes(pickle.dumps({"PongNoFrameskip-v4": data["PongNoFrameskip-v4"]}))
    assert run(["import-results", str(other), "-e", "paper"]) == 3
    assert "another --experiment" in capsys.readouterr().err
    # Own runs' experiments do not take imports.
    assert run(["queue", "--games", "Pong", "--attn", "NA", "--seeds", "1"]) == 0
    assert run(["import-results", str(other), "-e", "main"]) == 3
    registry = Registry(database_url)
    with registry.session() as session:
        assert session.scalar(select(func.count()).select_from(Run)) == 1401
        assert session.scalar(select(func.count()).select_from(Evaluation)) == 70_000


def test_partial_file_imports_and_reports_its_gaps(
        workspace: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = published_arrays()
    partial = {env: data[env] for env in ("PongNoFrameskip-v4", "BreakoutNoFrameskip-v4")}
    partial["BreakoutNoFrameskip-v4"] = {a: v for a, v in partial["BreakoutNoFrameskip-v4"]
                                         .items() if a != "SWA"}
    path = tmp_path / "partial.pkl"
    path.write_bytes(pickle.dumps(partial, protocol=5))  # numpy 2 names, protocol 5 buffers
    assert run(["import-results", str(path), "-e", "part"]) == 0
    capsys.readouterr()
    assert run(["report", "-e", "part", "--format", "md", "--reps", "10"]) == 0
    out = capsys.readouterr().out
    assert "54 of the 56 games are not in this study" in out
    assert "Breakout/SWA 0/5" in out and "missing (0/5 seeds)" in out


# --- hostile and broken pickles --------------------------------------------------------------
class _Shell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


class _Exec:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


class _Popen:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (subprocess.Popen, (["touch", str(self.marker)],))


def _hidden_in_results(payload: Any) -> bytes:
    """The attack nested where the format has an array, so a loader must not reach it."""
    cell = {"timesteps": np.arange(1, 3), "mean_per_eval": payload}
    return pickle.dumps({"PongNoFrameskip-v4": {"NA": cell}})


@pytest.mark.parametrize(("attack", "refused"), [
    (_Shell, "system"), (_Exec, "builtins.exec"), (_Popen, "subprocess.Popen")])
def test_code_running_pickle_is_refused_and_runs_nothing(
        attack: type, refused: str, workspace: Path, tmp_path: Path, database_url: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(_hidden_in_results(attack(marker)))
    assert run(["import-results", str(path), "-e", "evil"]) == 2
    err = capsys.readouterr().err
    assert "refused to load" in err and refused in err
    assert not marker.exists()
    with Registry(database_url).session() as session:
        assert session.scalar(select(func.count()).select_from(Experiment)) == 0


def test_numpy_module_globals_outside_the_list_are_refused(tmp_path: Path) -> None:
    """Allowing `numpy.*` wholesale would admit helpers that run code; only exact names pass."""
    marker = tmp_path / "pwned"
    payload = (b"\x80\x04cnumpy.testing._private.utils\nrunstring\n"
               + pickle.dumps(f"open({str(marker)!r}, 'w').close()", protocol=4)[2:-1]
               + b"}\x86R.")
    with pytest.raises(UnsafePickleError, match="numpy.testing._private.utils.runstring"):
        restricted_loads(payload)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_arrays_scalars_and_containers_load_under_every_protocol(protocol: int) -> None:
    obj = {"a": np.arange(6, dtype=np.int64).reshape(2, 3), "f": np.float64(2.5),
           "l": [1, 2.0, "x", None, True], "t": (1, 2)}
    back = restricted_loads(pickle.dumps(obj, protocol=protocol))
    assert back["a"].tolist() == [[0, 1, 2], [3, 4, 5]] and back["f"] == 2.5
    assert back["l"] == [1, 2.0, "x", None, True] and back["t"] == (1, 2)


def test_the_published_numpy1_pickle_loads(tmp_path: Path) -> None:
    """The reference file names numpy 1's numpy.core.multiarray; numpy 2 loads it all the same."""
    raw = PUBLISHED.read_bytes()
    assert b"numpy.core.multiarray" in raw
    data = restricted_loads(raw)
    assert data["PongNoFrameskip-v4"]["NA"]["mean_per_eval"].shape == (50, 5)


@pytest.mark.parametrize(("content", "message"), [
    (pickle.dumps([1, 2]), "expected a dict"),
    (pickle.dumps({"Pong": {}}), "not a <Game>NoFrameskip-v4 id"),
    (pickle.dumps({"PongNoFrameskip-v4": {"XYZ": {}}}), "unknown attention type"),
    (pickle.dumps({"PongNoFrameskip-v4": {"NA": {"timesteps": np.arange(3),
                                                 "mean_per_eval": np.zeros((3, 4))}}}),
     "expected (3, 5)"),
    (b"not a pickle", "not a readable results pickle"),
])
def test_malformed_files_are_refused_with_one_line(
        content: bytes, message: str, workspace: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.pkl"
    path.write_bytes(content)
    assert run(["import-results", str(path), "-e", "bad"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("timesteps", [
    np.arange(0, 50) * 200_000,  # 0 .. 9,800,000: shifted one evaluation early
    np.arange(1, 61) * 200_000,  # 200,000 .. 12,000,000: past the budget
    np.arange(50, 0, -1) * 200_000,  # the right values, descending
    np.arange(1, 51) * 7,  # 7 .. 350: another grid
    np.delete(np.arange(1, 52) * 200_000, 0),  # 400,000 .. 10,200,000
], ids=["from-0", "to-12M", "descending", "7-to-350", "from-400k"])
def test_a_cell_off_the_papers_evaluation_grid_is_refused_and_nothing_imported(
        timesteps: np.ndarray, workspace: Path, tmp_path: Path, database_url: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The runs are recorded with the paper spec and scored on its grid: any other is refused."""
    data = published_arrays()
    pong = {"timesteps": timesteps,
            "mean_per_eval": np.zeros((len(timesteps), 5)) - 20.0}
    path = tmp_path / "shifted.pkl"
    path.write_bytes(pickle.dumps({"BreakoutNoFrameskip-v4": data["BreakoutNoFrameskip-v4"],
                                   "PongNoFrameskip-v4": {"NA": pong}}))
    assert run(["import-results", str(path), "-e", "shifted"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "Pong/NA: timesteps must be the paper's evaluation grid" in err
    assert "200,000, 400,000, ..., 10,000,000 (50 evaluations)" in err
    with Registry(database_url).session() as session:
        assert session.scalar(select(func.count()).select_from(Experiment)) == 0
        assert session.scalar(select(func.count()).select_from(Run)) == 0


def test_missing_file(workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["import-results", "nope.pkl", "-e", "x"]) == 2
    assert "no such file" in capsys.readouterr().err
