"""Small synthetic studies written straight into a registry, for the analysis and report tests.

Runs are queued by the real queue service (paper preset, 4 evaluations 256 steps apart), then given
evaluations as own runs have them: one row per episode (n_episodes 1).
"""

from __future__ import annotations

from sqlalchemy import select, update

from orchestrator.queueing import QueueRequest, queue_runs
from orchestrator.registry.db import Registry
from orchestrator.registry.models import Evaluation, Experiment, Run, RunState

EVAL_EVERY = 256  # a multiple of the paper preset's 16 envs
N_EVALS = 4
OVERRIDES = {"total_timesteps": str(EVAL_EVERY * N_EVALS), "eval_every_steps": str(EVAL_EVERY)}

#: (game, attn, seed) -> per evaluation, the episode scores of that evaluation.
Episodes = dict[tuple[str, str, int], list[list[float]]]


def make_study(registry: Registry, experiment: str, games: list[str], attns: list[str],
               seeds: list[int], episodes: Episodes, *, n_evals: int = N_EVALS) -> None:
    """Queue games x attns x seeds; give the runs in `episodes` their evaluations.

    `n_evals` other than N_EVALS trains the study longer or shorter (another evaluation grid).
    """
    overrides = {**OVERRIDES, "total_timesteps": str(EVAL_EVERY * n_evals)}
    queue_runs(registry, QueueRequest(experiment, games, attns, seeds, overrides=overrides))
    with registry.write() as session:
        ids = {(g, a, s): rid for rid, g, a, s in session.execute(
            select(Run.id, Run.game, Run.attn, Run.seed).join(Experiment)
            .where(Experiment.name == experiment))}
        rows = []
        for key, evaluations in episodes.items():
            for i, scores in enumerate(evaluations):
                rows.extend({"run_id": ids[key], "timestep": (i + 1) * EVAL_EVERY, "episode": k,
                             "score": score, "length": 100, "n_episodes": 1}
                            for k, score in enumerate(scores))
        if rows:
            session.execute(Evaluation.__table__.insert(), rows)
        done = [ids[k] for k, e in episodes.items() if len(e) >= n_evals]
        if done:
            session.execute(update(Run).where(Run.id.in_(done))
                            .values(state=RunState.SUCCEEDED.value))


def constant_run(value: float, n_evals: int = N_EVALS, episodes: int = 2) -> list[list[float]]:
    """A run whose every episode scores `value` (its mean over the period is `value`)."""
    return [[value] * episodes for _ in range(n_evals)]


def add_evaluations(registry: Registry, experiment: str, key: tuple[str, str, int],
                    evaluations: dict[int, list[float]]) -> None:
    """Give the run `key` more evaluations, at any timesteps: timestep -> episode scores."""
    game, attn, seed = key
    with registry.write() as session:
        run_id = session.scalars(
            select(Run.id).join(Experiment)
            .where(Experiment.name == experiment, Run.game == game, Run.attn == attn,
                   Run.seed == seed)).one()
        session.execute(Evaluation.__table__.insert(), [
            {"run_id": run_id, "timestep": timestep, "episode": k, "score": score,
             "length": 100, "n_episodes": 1}
            for timestep, scores in evaluations.items() for k, score in enumerate(scores)])


def remove_evaluations(registry: Registry, experiment: str, key: tuple[str, str, int],
                       timestep: int) -> None:
    """Delete the run `key`'s evaluation at `timestep`."""
    from sqlalchemy import delete

    game, attn, seed = key
    with registry.write() as session:
        run_id = session.scalars(
            select(Run.id).join(Experiment)
            .where(Experiment.name == experiment, Run.game == game, Run.attn == attn,
                   Run.seed == seed)).one()
        session.execute(delete(Evaluation).where(Evaluation.run_id == run_id,
                                                 Evaluation.timestep == timestep))
