"""`satrl import-results`: the study's published pickle into the registry, without running it.

A pickle can run any code while it loads, so the file is read with an unpickler that resolves
only the globals this format needs (numpy array, dtype and scalar reconstruction, under numpy 1's
`numpy.core.*` and numpy 2's `numpy._core.*` names, and `_codecs.encode` restricted to latin1 for
protocol-2 bytes); every other global is
refused before anything is called, naming it. The loaded object is then checked against the
format (README of the reference data) before one transaction writes it:

- an experiment marked imported, preset `paper`, whose notes say where the results come from and
  that seeds were assigned in column order (the published order of the seed columns is unknown);
- 56 x 5 x 5 runs in state succeeded, each with the paper spec for its game, type and seed, and an
  event (None -> succeeded, "imported from <file>");
- one evaluations row per (run, timestep): episode NULL, n_episodes 5, score the 5-episode mean.

Every cell's timesteps must be exactly the paper spec's evaluation grid (200,000, 400,000, ...,
10,000,000): the runs are recorded with that spec and scored on that grid, so a file on another
grid (shifted, longer, shorter, reordered) is refused before anything is written.

Importing the same file into the same experiment again adds nothing; another file into an
experiment that already holds an import is refused (the file's sha256 is kept in the notes).
"""

from __future__ import annotations

import hashlib
import io
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from agents.catalog import ATTENTION_TYPES, GAMES, PAPER_SEEDS, game_from_env_id
from agents.spec import PAPER
from orchestrator.analysis.scores import evaluation_grid
from orchestrator.errors import ConflictError, NotFoundError, UsageError
from orchestrator.registry.db import Registry
from orchestrator.registry.models import Evaluation, Event, Experiment, Run, RunState

#: Episodes behind each published evaluation score (a 5-episode mean).
PUBLISHED_EPISODES = 5
#: The timesteps of the published evaluations: the paper spec's grid (200,000 .. 10,000,000).
PAPER_GRID = evaluation_grid(PAPER.to_dict())


def _span(timesteps: np.ndarray) -> str:
    """A timestep array in a few words: its first two values, its last and its length."""
    n = len(timesteps)
    if n == 0:
        return "no timesteps"
    shown = ", ".join(f"{int(t):,}" for t in timesteps[:2])
    if n > 2:
        shown += f", ..., {int(timesteps[-1]):,}"
    return f"{shown} ({n} evaluation{'s' if n != 1 else ''})"


class UnsafePickleError(UsageError):
    """The pickle names a global this format never needs: it was not loaded."""


def _numpy_core() -> tuple[Any, Any]:
    # numpy 2 moved these modules to numpy._core; numpy 1 has only numpy.core.
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy 1
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    return multiarray, numeric


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """`_codecs.encode` as protocol-2 pickles use it for bytes; only that one encoding."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise UnsafePickleError("the pickle calls _codecs.encode with something other than "
                                "(str, 'latin1')")
    return text.encode("latin1")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    multiarray, numeric = _numpy_core()
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_bytes,
    }
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = multiarray._reconstruct
        allowed[(module, "scalar")] = multiarray.scalar
    for module in ("numpy.core.numeric", "numpy._core.numeric"):
        # Protocol 5 pickles rebuild arrays from a buffer with this one.
        allowed[(module, "_frombuffer")] = numeric._frombuffer
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only numpy array, dtype and scalar reconstruction; refuses every other global."""

    _allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refused to load: the pickle asks for the global {module}.{name}, which this "
                "format (numpy arrays in dicts) never needs; it may run code when loaded"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("refused to load: the pickle uses persistent ids")


def restricted_loads(data: bytes) -> Any:
    """Unpickle `data` admitting only numpy arrays, dtypes, scalars and built-in containers."""
    try:
        return RestrictedUnpickler(io.BytesIO(data)).load()
    except UnsafePickleError:
        raise
    except Exception as error:  # noqa: BLE001 - any failure of a hostile or broken file
        raise UsageError(f"not a readable results pickle: {type(error).__name__}: {error}"
                         ) from None


# --- the format ------------------------------------------------------------------------------
@dataclass(frozen=True)
class PublishedCell:
    """One (game, type): timesteps (n,) and the evaluation x seed-column matrix (n, 5)."""

    game: str
    attn: str
    timesteps: np.ndarray
    mean_per_eval: np.ndarray


def parse_results(obj: Any) -> list[PublishedCell]:
    """Check the loaded object against the published format; one message per problem found."""
    if not isinstance(obj, dict) or not obj:
        raise UsageError("results pickle: expected a dict {'<Game>NoFrameskip-v4': {type: {...}}}")
    cells: list[PublishedCell] = []
    for env, by_attn in obj.items():
        try:
            game = game_from_env_id(str(env))
        except ValueError:
            raise UsageError(f"results pickle: key {env!r} is not a <Game>NoFrameskip-v4 id"
                             ) from None
        if game not in GAMES:
            raise UsageError(f"results pickle: {env!r} is not one of the study's 56 games")
        if not isinstance(by_attn, dict):
            raise UsageError(f"results pickle: {env} maps to {type(by_attn).__name__}, not dict")
        for attn, inner in by_attn.items():
            if attn not in ATTENTION_TYPES:
                raise UsageError(f"results pickle: {env}: unknown attention type {attn!r}")
            cells.append(_cell(game, attn, inner))
    return cells


def _cell(game: str, attn: str, inner: Any) -> PublishedCell:
    where = f"results pickle: {game}/{attn}"
    if not isinstance(inner, dict):
        raise UsageError(f"{where}: expected a dict of arrays")
    timesteps = inner.get("timesteps")
    scores = inner.get("mean_per_eval")
    if not isinstance(timesteps, np.ndarray) or not isinstance(scores, np.ndarray):
        raise UsageError(f"{where}: needs numpy arrays 'timesteps' and 'mean_per_eval'")
    if timesteps.ndim != 1 or not np.issubdtype(timesteps.dtype, np.integer):
        raise UsageError(f"{where}: timesteps must be a 1-d integer array")
    if scores.shape != (timesteps.shape[0], len(PAPER_SEEDS)):
        raise UsageError(f"{where}: mean_per_eval has shape {scores.shape}, expected "
                         f"({timesteps.shape[0]}, {len(PAPER_SEEDS)}) = evaluations x seeds")
    if not np.issubdtype(scores.dtype, np.number) or not np.isfinite(scores).all():
        raise UsageError(f"{where}: mean_per_eval must hold finite numbers")
    if not np.array_equal(timesteps, PAPER_GRID):
        raise UsageError(f"{where}: timesteps must be the paper's evaluation grid "
                         f"{_span(PAPER_GRID)}; the file has {_span(timesteps)}")
    return PublishedCell(game, attn, timesteps.astype(np.int64), scores.astype(np.float64))


def load_published(path: Path) -> tuple[list[PublishedCell], str]:
    """The checked cells of a published results pickle and the file's sha256."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise NotFoundError(f"no such file: {path}") from None
    except OSError as error:
        raise UsageError(f"cannot read {path}: {error.strerror}") from None
    return parse_results(restricted_loads(data)), hashlib.sha256(data).hexdigest()


# --- into the registry -----------------------------------------------------------------------
@dataclass(frozen=True)
class ImportResult:
    experiment: str
    source: str
    sha256: str
    runs_added: int
    evaluations_added: int
    runs_in_file: int

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


SHA_IN_NOTES = re.compile(r"sha256 ([0-9a-f]{64})")


def import_notes(source: str, sha256: str) -> str:
    seeds = ", ".join(str(s) for s in PAPER_SEEDS)
    return (f"Published results imported from {source} (sha256 {sha256}). Seeds were assigned "
            f"in column order ({seeds}); the published order of the seed columns is unknown. "
            f"Each evaluation is a {PUBLISHED_EPISODES}-episode mean (episode NULL).")


def import_results(registry: Registry, path: Path, experiment: str) -> ImportResult:
    """Write the pickle's runs and evaluations under `experiment` in one transaction."""
    cells, sha256 = load_published(path)
    source = path.name
    with registry.write() as session:
        exp = _experiment(session, registry, experiment, source, sha256)
        specs = {(c.game, c.attn, seed): PAPER.replace(game=c.game, attn=c.attn, seed=seed,
                                                       experiment=experiment)
                 for c in cells for seed in PAPER_SEEDS}
        run_rows = [{"experiment_id": exp.id, "game": g, "attn": a, "seed": s,
                     "spec": spec.to_dict(), "spec_hash": spec.spec_hash(),
                     "state": RunState.SUCCEEDED.value, "attempts": 0}
                    for (g, a, s), spec in specs.items()]
        added = _insert_new_runs(session, registry, run_rows)
        evaluations = []
        for cell in cells:
            timesteps = cell.timesteps.tolist()
            for column, seed in enumerate(PAPER_SEEDS):
                run_id = added.get((cell.game, cell.attn, seed))
                if run_id is None:
                    continue  # already imported: its evaluations are there
                evaluations.extend(
                    {"run_id": run_id, "timestep": t, "episode": None, "score": score,
                     "length": None, "n_episodes": PUBLISHED_EPISODES}
                    for t, score in zip(timesteps, cell.mean_per_eval[:, column].tolist(),
                                        strict=True))
        if evaluations:
            session.execute(Evaluation.__table__.insert(), evaluations)
        if added:
            session.execute(Event.__table__.insert(),
                            [{"run_id": rid, "from_state": None,
                              "to_state": RunState.SUCCEEDED.value,
                              "why": f"imported from {source}"} for rid in added.values()])
    return ImportResult(experiment, source, sha256, len(added), len(evaluations), len(run_rows))


def _experiment(session: Session, registry: Registry, name: str, source: str,
                sha256: str) -> Experiment:
    registry.insert_ignoring_conflicts(
        session, Experiment,
        [{"name": name, "preset": "paper", "overrides": {}, "imported": True,
          "notes": import_notes(source, sha256)}],
        ["name"], Experiment.id)
    experiment = session.scalars(select(Experiment).where(Experiment.name == name)).one()
    if not experiment.imported:
        raise ConflictError(f"experiment {name!r} holds the study's own runs; import the "
                            "published results into another --experiment")
    found = SHA_IN_NOTES.search(experiment.notes or "")
    if found and found.group(1) != sha256:
        raise ConflictError(f"experiment {name!r} holds results imported from a file with "
                            f"sha256 {found.group(1)[:12]}, not {sha256[:12]}: import this one "
                            "into another --experiment")
    return experiment


def _insert_new_runs(session: Session, registry: Registry, rows: list[dict[str, Any]]
                     ) -> dict[tuple[str, str, int], int]:
    """Insert runs not yet recorded; (game, attn, seed) -> id of each run that was added."""
    if registry.is_sqlite:
        from sqlalchemy.dialects.sqlite import insert
    else:
        from sqlalchemy.dialects.postgresql import insert
    statement = (insert(Run)
                 .on_conflict_do_nothing(index_elements=["experiment_id", "game", "attn", "seed"])
                 .returning(Run.id, Run.game, Run.attn, Run.seed))
    return {(g, a, int(s)): rid for rid, g, a, s in session.execute(statement, rows)}
