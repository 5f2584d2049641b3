"""`satrl attention`: a run's checkpoint and observations from the store -> maps -> figures.

Sources of a policy:
- the store: `<store>/<experiment>/<Game>/<TYPE>/<seed>/` with run.json (the architecture),
  checkpoints/<Game>_<TYPE>_<seed>_model_checkpoint_<steps>_steps.zip (the newest, or the one at
  `--step`) and observations/ (the run's dumps, the default observations);
- `--checkpoint PATH`: any SB3 zip of this extractor; the type is `--attn` or the run.json beside
  it (a run directory's checkpoints/ folder works as is);
- `--fresh`: a freshly initialised policy of each type, seeded by SEED (the untrained baseline).

Outputs per figure, in `--out`: `<stem>.png` (the grid), `<stem>.json` and `<stem>.csv` (the
chosen action per observation and type) and `<stem>.npz` (the normalised maps shown, as arrays,
keyed `<TYPE>/<stage>`, with the observation paths).
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agents.catalog import ATTENTION_TYPES
from agents.rundir import atomic_writer, write_bytes
from orchestrator import paths
from orchestrator.errors import NotFoundError, UsageError

SCHEMA = 1
INPUT_COLORMAP = "gray"
_STEPS_RE = re.compile(r"_model_checkpoint_(\d+)_steps\.zip$")


@dataclass(frozen=True)
class PolicySource:
    """Where one policy comes from: a checkpoint file (and its step), or a fresh init."""

    attn: str
    checkpoint: Path | None
    step: int | None = None
    #: For --fresh: the torch seed and the action count.
    init_seed: int | None = None
    n_actions: int | None = None

    @property
    def label(self) -> str:
        if self.checkpoint is None:
            return f"{self.attn} fresh init (seed {self.init_seed})"
        step = f" step {self.step}" if self.step is not None else ""
        return f"{self.attn}{step}"


@dataclass
class MapResult:
    """What was written: the files and, per observation and type, the chosen action."""

    png: Path
    json_path: Path
    csv_path: Path
    npz_path: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"png": str(self.png), "json": str(self.json_path), "csv": str(self.csv_path),
                "npz": str(self.npz_path), "rows": self.rows, "skipped": self.skipped}


# --- finding things ---------------------------------------------------------------------------


def store_checkpoints(run_store: Path, game: str, attn: str, seed: int) -> dict[int, Path]:
    """step -> checkpoint of a store run (paper names, in checkpoints/ or beside run.json)."""
    prefix = f"{game}_{attn}_{seed}_model_checkpoint_"
    found: dict[int, Path] = {}
    for folder in (run_store / "checkpoints", run_store):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            match = _STEPS_RE.search(path.name)
            if path.name.startswith(prefix) and match and path.is_file():
                found.setdefault(int(match.group(1)), path)
    return found


def pick_checkpoint(available: dict[int, Path], step: int | None, where: str) -> tuple[int, Path]:
    """The checkpoint at `step`, or the newest; NotFoundError naming the steps there are."""
    if not available:
        raise NotFoundError(f"no checkpoint in {where}: fetch the run first "
                            f"(satrl fetch GAME ATTN SEED) or pass --checkpoint PATH")
    if step is None:
        newest = max(available)
        return newest, available[newest]
    if step not in available:
        steps = ", ".join(str(s) for s in sorted(available))
        raise NotFoundError(f"no checkpoint at step {step} in {where}; steps there: {steps}")
    return step, available[step]


def checkpoint_step(path: Path) -> int | None:
    """The step count in a checkpoint's name (plain or paper name), else None."""
    match = _STEPS_RE.search(path.name)
    return int(match.group(1)) if match else None


def run_json_near(checkpoint: Path) -> Path | None:
    """run.json beside a checkpoint, or one folder up (a run directory's checkpoints/)."""
    for folder in (checkpoint.parent, checkpoint.parent.parent):
        if (folder / "run.json").is_file():
            return folder / "run.json"
    return None


def read_run_spec(path: Path) -> Any:
    """The RunSpec in a run.json; UsageError when it is not one."""
    from agents.spec import RunSpec, SpecError

    try:
        data = json.loads(path.read_text())
        return RunSpec.from_dict(data)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, SpecError) as error:
        raise UsageError(f"{path}: not a valid run.json ({str(error)[:200]})") from None


def _natural_key(path: Path) -> list[Any]:
    # obs_512_1 before obs_1024_0: numbers compare as numbers.
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def expand_observations(items: list[str], game: str | None) -> list[Path]:
    """`--observations` values (folders, files, quoted glob patterns) -> .npy files, in order.

    A file named for another game (`Assault_obs_1.npy`, as the study's published dumps are) is
    refused: that game's frames would go through `game`'s policy and make a figure of noise.
    Without a game (a --checkpoint with no run.json) nothing is checked.
    """
    found: list[Path] = []
    for item in items:
        path = Path(item).expanduser()
        if any(char in item for char in "*?["):
            matches = sorted((Path(m) for m in glob.glob(os.path.expanduser(item))),
                             key=_natural_key)
            if not matches:
                raise NotFoundError(f"--observations: nothing matches {item!r}")
            found.extend(m for m in matches if m.is_file())
        elif path.is_dir():
            files = sorted((p for p in path.glob("*.npy") if p.is_file()), key=_natural_key)
            if not files:
                raise NotFoundError(f"--observations: no .npy file in {path}")
            found.extend(files)
        elif path.is_file():
            found.append(path)
        else:
            raise NotFoundError(f"--observations: {path} does not exist")
    unique = list(dict.fromkeys(found))
    if not unique:
        raise UsageError("--observations: no observation files given")
    if game is not None:
        _refuse_other_games(unique, game)
    return unique


def _refuse_other_games(files: list[Path], game: str) -> None:
    from agents.catalog import GAMES

    first_of: dict[str, Path] = {}  # another game's name -> its first file
    for path in files:
        prefix = path.name.split("_")[0]
        if prefix in GAMES and prefix != game:
            first_of.setdefault(prefix, path)
    if first_of:
        others = sorted(first_of)
        raise UsageError(f"--observations: files named for {', '.join(others)}, not {game}, "
                         f"e.g. {first_of[others[0]]}; "
                         f"pass only {game}'s (e.g. '{files[0].parent}/{game}_*.npy')")


def run_observations(folder: Path) -> list[Path]:
    """The dumps in a run's observations/ folder (empty list when none)."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.glob("*.npy") if p.is_file()), key=_natural_key)


# --- mapping and writing ----------------------------------------------------------------------


@dataclass(frozen=True)
class FigureRequest:
    """One figure: these policies on these observations."""

    title: str
    stem: str
    out: Path
    sources: list[PolicySource]
    observations: list[Path]
    game: str | None = None
    colormap: str = "inferno"
    scale: int = 2
    limit: int | None = None
    #: Types --compare left out (no checkpoint fetched, or none at --step).
    skipped: tuple[str, ...] = ()


def make_figure(request: FigureRequest) -> MapResult:
    """Load every policy (refusing foreign checkpoints), map the observations, write the files."""
    from agents import interpret
    from orchestrator.map_grid import Column, check_colormap, render_grid

    check_colormap(request.colormap)
    if request.scale < 1 or request.scale > 8:
        raise UsageError(f"--scale takes 1..8, not {request.scale}")
    observation_paths = request.observations[: request.limit] if request.limit else \
        request.observations
    try:
        observations = [interpret.load_observation(path) for path in observation_paths]
    except interpret.ObservationError as error:
        raise UsageError(str(error)) from None
    # Every policy is loaded before anything is written: a refused one leaves no partial figure.
    results = []
    for source in request.sources:
        policy = _load_policy(source)
        results.append((source, interpret.compute_maps(policy, source.attn, observations)))

    names = _action_names(request.game, results)
    columns = [Column(interpret.STAGE_TITLES["input"], INPUT_COLORMAP)]
    grouped = len(results) > 1
    for source, maps in results:
        columns.extend(Column(interpret.STAGE_TITLES[stage], request.colormap,
                              source.label if grouped else None)
                       for stage in maps.stages if stage != "input")
    cells, labels, rows = [], [], []
    for i, path in enumerate(observation_paths):
        row = [results[0][1].maps["input"][i]]
        label = [path.name]
        for source, maps in results:
            row.extend(maps.maps[stage][i] for stage in maps.stages if stage != "input")
            action = int(maps.actions[i])
            name = names.get(id(maps), [])
            action_name = name[action] if action < len(name) else ""
            probability = float(maps.probabilities[i, action])
            label.append(f"{source.attn + ': ' if grouped else ''}action {action}"
                         f"{' ' + action_name if action_name else ''} (p={probability:.2f})")
            rows.append({"observation": str(path), "attn": source.attn, "step": source.step,
                         "action": action, "action_name": action_name or None,
                         "probability": probability, "value": float(maps.values[i])})
        cells.append(row)
        labels.append(label)

    out = request.out
    out.mkdir(parents=True, exist_ok=True)
    result = MapResult(png=out / f"{request.stem}.png", json_path=out / f"{request.stem}.json",
                       csv_path=out / f"{request.stem}.csv", npz_path=out / f"{request.stem}.npz",
                       rows=rows, skipped=list(request.skipped))
    arrays: dict[str, np.ndarray] = {"observations": np.array([str(p) for p in observation_paths])}
    for source, maps in results:
        arrays.update({f"{source.attn}/{stage}": maps.maps[stage] for stage in maps.stages})
    _write_npz(result.npz_path, arrays)
    _write_text(result.json_path, json.dumps({
        "schema": SCHEMA, "title": request.title, "game": request.game,
        "colormap": request.colormap, "scale": request.scale,
        "policies": [{"attn": s.attn, "checkpoint": str(s.checkpoint) if s.checkpoint else None,
                      "step": s.step, "init_seed": s.init_seed,
                      "stages": list(interpret.stages_of(s.attn)),
                      "n_actions": int(m.probabilities.shape[1]),
                      "action_names": names.get(id(m))} for s, m in results],
        "columns": [{"title": c.title, "group": c.group} for c in columns],
        "rows": rows,
    }, indent=2) + "\n")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    _write_text(result.csv_path, buffer.getvalue())
    render_grid(result.png, request.title, columns, labels, cells, scale=request.scale)
    return result


def _load_policy(source: PolicySource) -> Any:
    from agents import interpret

    try:
        if source.checkpoint is None:
            assert source.n_actions is not None
            return interpret.fresh_policy(source.attn, source.n_actions, seed=source.init_seed)
        state = interpret.read_policy_state(source.checkpoint)
        return interpret.build_policy(source.attn, state, source=str(source.checkpoint))
    except interpret.CheckpointError as error:
        raise UsageError(str(error)) from None


def _action_names(
    game: str | None, results: list[tuple[PolicySource, Any]]
) -> dict[int, list[str]]:
    from agents.interpret import action_meanings

    if game is None:
        return {}
    names: dict[int, list[str]] = {}
    by_count: dict[int, list[str] | None] = {}
    for _, maps in results:
        count = int(maps.probabilities.shape[1])
        if count not in by_count:
            by_count[count] = action_meanings(game, count)
        if by_count[count]:
            names[id(maps)] = by_count[count]  # type: ignore[assignment]
    return names


def _write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode())


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with atomic_writer(path) as handle:
        np.savez_compressed(handle, **arrays)  # type: ignore[arg-type]


# --- the command's requests -------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionRequest:
    """`satrl attention` as parsed: a store run (or --compare), a --checkpoint, or --fresh."""

    game: str | None
    attns: list[str]
    seed: int | None
    experiment: str
    store: Path
    out: Path
    step: int | None = None
    observations: list[str] | None = None
    checkpoint: Path | None = None
    compare: bool = False
    fresh: bool = False
    colormap: str = "inferno"
    scale: int = 2
    limit: int | None = None


def attention_maps(request: AttentionRequest) -> MapResult:
    """Resolve the request to one figure and make it."""
    if request.checkpoint is not None:
        return make_figure(_checkpoint_figure(request))
    if request.game is None or request.seed is None or not request.attns:
        raise UsageError("give GAME ATTN SEED (a run in the store) or --checkpoint PATH")
    if request.fresh:
        return make_figure(_fresh_figure(request))
    return make_figure(_store_figure(request))


def _checkpoint_figure(request: AttentionRequest) -> FigureRequest:
    checkpoint = request.checkpoint
    assert checkpoint is not None
    if not checkpoint.is_file():
        raise NotFoundError(f"--checkpoint: {checkpoint} does not exist")
    if request.compare or request.fresh:
        raise UsageError("--compare and --fresh work on store runs, not on --checkpoint")
    run_json = run_json_near(checkpoint)
    spec = read_run_spec(run_json) if run_json else None
    attn = request.attns[0] if request.attns else None
    if len(request.attns) > 1:
        raise UsageError("--checkpoint takes one --attn type")
    if attn is None:
        if spec is None:
            raise UsageError(f"no run.json beside {checkpoint}: pass its type with --attn "
                             f"({', '.join(ATTENTION_TYPES)})")
        attn = spec.attn
    elif spec is not None and spec.attn != attn:
        raise UsageError(f"--attn {attn} contradicts {run_json} (attn {spec.attn})")
    game = request.game or (spec.game if spec else None)
    observations = _observations(request, checkpoint.parent.parent / "observations"
                                 if checkpoint.parent.name == "checkpoints"
                                 else checkpoint.parent / "observations", game)
    step = checkpoint_step(checkpoint)
    return FigureRequest(
        title=f"{checkpoint.name}: {attn}", stem=f"{checkpoint.stem}_attention",
        out=request.out, sources=[PolicySource(attn, checkpoint, step)],
        observations=observations, game=game,
        colormap=request.colormap, scale=request.scale, limit=request.limit,
    )


def _fresh_figure(request: AttentionRequest) -> FigureRequest:
    assert request.game is not None and request.seed is not None
    if request.step is not None:
        raise UsageError("--step has no meaning with --fresh (no checkpoint is read)")
    if not request.observations:
        raise UsageError("--fresh needs --observations DIR|FILES")
    attns = list(ATTENTION_TYPES) if request.compare else request.attns
    # The action count is the game's (ALE's minimal action set, as the worker trains with).
    n_actions = _game_action_count(request.game)
    sources = [PolicySource(a, None, init_seed=request.seed, n_actions=n_actions) for a in attns]
    label = "all types" if len(attns) > 1 else attns[0]
    stem = f"{request.game}_{'compare' if len(attns) > 1 else attns[0]}_fresh_{request.seed}"
    return FigureRequest(
        title=f"{request.game} {label}, freshly initialised (seed {request.seed})",
        stem=f"{stem}_attention", out=request.out, sources=sources,
        observations=expand_observations(request.observations, request.game),
        game=request.game,
        colormap=request.colormap, scale=request.scale, limit=request.limit,
    )


def _game_action_count(game: str) -> int:
    import ale_py
    import gymnasium as gym

    from agents.catalog import env_id

    gym.register_envs(ale_py)
    env = gym.make(env_id(game))
    try:
        return int(env.action_space.n)  # type: ignore[attr-defined]
    finally:
        env.close()


def _store_figure(request: AttentionRequest) -> FigureRequest:
    game, seed = request.game, request.seed
    assert game is not None and seed is not None
    if request.compare:
        candidates = list(ATTENTION_TYPES) if len(request.attns) <= 1 else request.attns
    else:
        if len(request.attns) != 1:
            raise UsageError("ATTN names one type; use --compare to put several side by side")
        candidates = request.attns
    sources: list[PolicySource] = []
    skipped: list[str] = []
    observation_folder: Path | None = None
    for attn in candidates:
        run_store = paths.store_dir(request.store, request.experiment, game, attn, seed)
        available = store_checkpoints(run_store, game, attn, seed)
        where = f"{run_store}"
        if request.compare and (not available or (request.step is not None
                                                  and request.step not in available)):
            skipped.append(attn)
            continue
        step, checkpoint = pick_checkpoint(available, request.step, where)
        spec = read_run_spec(run_store / "run.json") if (run_store / "run.json").is_file() \
            else None
        if spec is not None and (spec.attn != attn or spec.game != game or spec.seed != seed):
            raise UsageError(f"{run_store / 'run.json'} describes {spec.game} {spec.attn} "
                             f"{spec.seed}, not {game} {attn} {seed}: the store is inconsistent")
        sources.append(PolicySource(attn, checkpoint, step))
        # Default observations: the named type's run's dumps (`Pong CWCA 42 --compare` shows
        # CWCA's), else the first type's in paper order that has any.
        if run_observations(run_store / "observations") and (
                observation_folder is None or attn == request.attns[0]):
            observation_folder = run_store / "observations"
    if not sources:
        step = f" at step {request.step}" if request.step is not None else ""
        raise NotFoundError(f"no fetched checkpoint{step} of {game} seed {seed} in experiment "
                            f"{request.experiment!r} under {request.store}")
    first_store = paths.store_dir(request.store, request.experiment, game, sources[0].attn, seed)
    observations = _observations(request, observation_folder or first_store / "observations",
                                 game)
    if request.compare:
        steps = {s.step for s in sources}
        step_part = f"_{steps.pop()}_steps" if len(steps) == 1 else ""
        stem = f"{game}_compare_{seed}{step_part}_attention"
        title = f"{game} seed {seed}: " + ", ".join(s.label for s in sources)
    else:
        only = sources[0]
        stem = f"{game}_{only.attn}_{seed}_{only.step}_steps_attention"
        title = f"{game} {only.attn} seed {seed}, step {only.step} ({request.experiment})"
    return FigureRequest(title=title, stem=stem, out=request.out, sources=sources,
                         observations=observations, game=game, colormap=request.colormap,
                         scale=request.scale, limit=request.limit, skipped=tuple(skipped))


def _observations(request: AttentionRequest, default_folder: Path,
                  game: str | None) -> list[Path]:
    if request.observations:
        return expand_observations(request.observations, game)
    found = run_observations(default_folder)
    if not found:
        raise NotFoundError(f"no observation dumps in {default_folder}: fetch them (satrl fetch "
                            f"... --what observations) or pass --observations DIR|FILES")
    return found
