"""`satrl queue`: record the cross product games x types x seeds once.

Idempotent and safe under concurrency: runs are inserted with ON CONFLICT DO NOTHING on their
(experiment, game, attn, seed) key, so two processes queueing the same grid together add each run
once and the counts they report sum to the grid. A key that exists with another scientific spec
is refused, naming both hashes, and the transaction rolls back: nothing is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select, tuple_
from sqlalchemy.orm import Session

from agents.spec import RunSpec
from orchestrator import catalog
from orchestrator.errors import ConflictError
from orchestrator.registry.db import Registry
from orchestrator.registry.models import Event, Experiment, Run, RunState


@dataclass(frozen=True)
class QueueRequest:
    experiment: str
    games: list[str]
    attns: list[str]
    seeds: list[int]
    preset: str = "paper"
    overrides: dict[str, str] | None = None


@dataclass(frozen=True)
class QueueResult:
    experiment: str
    requested: int
    added: int
    existing: int
    dry_run: bool
    #: Execution fields (not hashed) the already-recorded runs hold with other values than
    #: this request's, with the recorded values: those runs keep them (`--set engine=fast`
    #: on a queued study does not switch its existing runs).
    kept: dict[str, list[Any]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


#: Spec fields that name a run rather than say how it is trained.
_IDENTITY = frozenset({"game", "attn", "seed", "experiment", "run_id"})


def resolve_spec(preset: str, overrides: dict[str, str] | None) -> RunSpec:
    """The preset with `--set` overrides applied and validated (identity fields excluded)."""
    clash = _IDENTITY & set(overrides or {})
    if clash:
        from orchestrator.errors import UsageError

        raise UsageError(f"--set cannot change {', '.join(sorted(clash))}: use --games, --attn, "
                         "--seeds or --experiment")
    return catalog.preset(preset).with_overrides(overrides or {})


def run_specs(request: QueueRequest) -> list[RunSpec]:
    base = resolve_spec(request.preset, request.overrides).replace(experiment=request.experiment)
    return [base.replace(game=g, attn=a, seed=s)
            for g in request.games for a in request.attns for s in request.seeds]


def queue_runs(registry: Registry, request: QueueRequest, *, dry_run: bool = False) -> QueueResult:
    """Record the request's runs once; report how many were new."""
    specs = run_specs(request)
    # Store the parsed values, so `--set total_timesteps=2e6` and `=2000000` are one experiment.
    base = resolve_spec(request.preset, request.overrides)
    overrides = {key: getattr(base, key) for key in request.overrides or {}}
    if dry_run:  # the same checks as a real queue, read-only
        with registry.session() as session:
            recorded = session.scalars(select(Experiment)
                                       .where(Experiment.name == request.experiment)).first()
            if recorded is not None:
                _check_experiment(recorded, request.preset, overrides)
            existing = _existing(session, request.experiment, specs)
            _check_same_specs(existing, specs)
            kept = _kept_settings(session, request.experiment, specs, set(existing))
        return QueueResult(request.experiment, len(specs), len(specs) - len(existing),
                           len(existing), True, kept)
    with registry.write() as session:
        experiment = _experiment(session, registry, request.experiment, request.preset, overrides)
        rows = [
            {"experiment_id": experiment.id, "game": s.game, "attn": s.attn, "seed": s.seed,
             "spec": s.to_dict(), "spec_hash": s.spec_hash(), "state": RunState.QUEUED.value,
             "attempts": 0}
            for s in specs
        ]
        added_ids = registry.insert_ignoring_conflicts(
            session, Run, rows, ["experiment_id", "game", "attn", "seed"], Run.id)
        existing = _existing(session, request.experiment, specs)
        _check_same_specs(existing, specs)
        added_keys = {(g, a, sd) for g, a, sd in session.execute(
            select(Run.game, Run.attn, Run.seed).where(Run.id.in_(added_ids)))} \
            if added_ids else set()
        kept = _kept_settings(session, request.experiment, specs, set(existing) - added_keys)
        if added_ids:
            session.execute(
                Event.__table__.insert(),
                [{"run_id": rid, "from_state": None, "to_state": RunState.QUEUED.value,
                  "why": "queued"} for rid in added_ids],
            )
    return QueueResult(request.experiment, len(specs), len(added_ids),
                       len(specs) - len(added_ids), False, kept)


def _kept_settings(session: Session, experiment: str, specs: list[RunSpec],
                   recorded: set[tuple]) -> dict[str, list[Any]]:
    """field -> the other values the `recorded` runs of `specs` hold for it (same science,
    so only execution fields can differ)."""
    if not recorded:
        return {}
    wanted = {(s.game, s.attn, s.seed): s.to_dict() for s in specs}
    kept: dict[str, list[Any]] = {}
    rows = session.execute(
        select(Run.game, Run.attn, Run.seed, Run.spec)
        .join(Experiment, Run.experiment_id == Experiment.id)
        .where(Experiment.name == experiment, Run.game.in_(sorted({k[0] for k in recorded})))
        .order_by(Run.id))
    for game, attn, seed, stored in rows:
        requested = wanted.get((game, attn, seed))
        if requested is None or (game, attn, seed) not in recorded:
            continue
        for key, value in requested.items():
            if key in _IDENTITY:
                continue
            old = (stored or {}).get(key)
            if old != value and old not in kept.setdefault(key, []):
                kept[key].append(old)
    return {key: values for key, values in kept.items() if values}


def _experiment(session: Session, registry: Registry, name: str, preset: str,
                overrides: dict[str, str]) -> Experiment:
    registry.insert_ignoring_conflicts(
        session, Experiment,
        [{"name": name, "preset": preset, "overrides": overrides, "notes": "", "imported": False}],
        ["name"], Experiment.id,
    )
    experiment = session.scalars(select(Experiment).where(Experiment.name == name)).one()
    _check_experiment(experiment, preset, overrides)
    return experiment


def _check_experiment(experiment: Experiment, preset: str, overrides: dict[str, Any]) -> None:
    """Refuse adding runs to an imported experiment, or with other scientific settings.

    Settings compare as the specs they resolve to, not as the words that gave them: `--set
    engine=sb3` repeating the preset's own value, or an execution field (checkpoint interval,
    engine, threads) that does not change results, is the same experiment.
    """
    name = experiment.name
    if experiment.imported:
        raise ConflictError(f"experiment {name!r} holds imported results; queue into another "
                            "--experiment")
    if experiment.preset == preset and experiment.overrides == overrides:
        return
    recorded = _base_hash(experiment.preset, experiment.overrides)
    requested = _base_hash(preset, overrides)
    if recorded != requested:
        raise ConflictError(
            f"experiment {name!r} was queued with preset {experiment.preset} and overrides "
            f"{_fmt(experiment.overrides)} (spec {recorded[:12]}), not {preset} and "
            f"{_fmt(overrides)} (spec {requested[:12]}): use another --experiment for other "
            "scientific settings"
        )


def _base_hash(preset: str, overrides: dict[str, Any]) -> str:
    """The spec hash of a preset with overrides, for one fixed game, type and seed."""
    spec = catalog.preset(preset).with_overrides(overrides or {})
    return spec.replace(game="Pong", attn="NA", seed=0).spec_hash()


def _existing(session: Session, experiment: str, specs: list[RunSpec]) -> dict[tuple, str]:
    """(game, attn, seed) -> spec_hash of the requested keys that are already recorded."""
    if not specs:
        return {}
    keys = {(s.game, s.attn, s.seed) for s in specs}
    games = sorted({k[0] for k in keys})
    statement = (
        select(Run.game, Run.attn, Run.seed, Run.spec_hash)
        .join(Experiment, Run.experiment_id == Experiment.id)
        .where(Experiment.name == experiment, Run.game.in_(games))
    )
    if len(keys) < 200:
        statement = statement.where(tuple_(Run.game, Run.attn, Run.seed).in_(sorted(keys)))
    return {(g, a, s): h for g, a, s, h in session.execute(statement) if (g, a, s) in keys}


def _check_same_specs(existing: dict[tuple, str], specs: list[RunSpec]) -> None:
    for spec in specs:
        stored = existing.get((spec.game, spec.attn, spec.seed))
        if stored is not None and stored != spec.spec_hash():
            raise ConflictError(
                f"run {spec.game}/{spec.attn}/{spec.seed} of experiment {spec.experiment!r} "
                f"exists with spec {stored[:12]}, not {spec.spec_hash()[:12]}: queue the new "
                "settings under another --experiment"
            )


def _fmt(overrides: dict[str, Any]) -> str:
    return "{" + ", ".join(f"{k}={v}" for k, v in sorted(overrides.items())) + "}" \
        if overrides else "{}"
