"""run_scores on each run's evaluation grid; game_table over complete runs only

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27 09:00:00

0003's run_scores averaged every evaluation a run held, and game_table averaged every run with
an evaluation as a full seed: a run with an extra evaluation past its budget was scored on it, and
a run short of evaluations counted in its cell like a finished one (48.656 +- 2.384 over "5 seeds"
where four runs were complete).

Here a run is scored on exactly its spec's evaluation grid (runs.spec: eval_every_steps,
total_timesteps, n_envs; JSON integers): the k-th evaluation, k = 1 .. total_timesteps //
eval_every_steps, is at the first agent step at or past k x eval_every_steps, and steps advance by
n_envs. So a timestep t is on the grid when eval_every_steps <= t <= total_timesteps, t is a
multiple of n_envs and t mod eval_every_steps < n_envs (with eval_every_steps a multiple of
n_envs, as in every preset: exactly the multiples of eval_every_steps). The grid has
total_timesteps // eval_every_steps points (total_timesteps // n_envs when eval_every_steps <
n_envs: one evaluation per step). orchestrator.analysis.scores.evaluation_grid is the same rule.

run_scores keeps its columns, now over the evaluations on the grid (mean_score, last_score,
n_evaluations, last_timestep; mean_score NULL for a run whose evaluations are all off the grid),
and adds expected_evaluations (the grid's points), n_off_grid (evaluations ignored) and complete
(1 when every point of the grid has an evaluation, else 0).

game_table keeps its columns, now over complete runs only (n_seeds counts them; mean_score NULL
when none is; std_error, population std / sqrt(n), NULL below two seeds, where it is undefined),
and adds expected_seeds (the seeds queued for the game over all its types), n_left_out (the cell's
runs not averaged: incomplete or without evaluations) and complete (1 when n_seeds =
expected_seeds). It has a row for each cell with at least one evaluated run, as before.
"""

import importlib
from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# A positive JSON integer field of runs.spec, NULL otherwise; per dialect.
_SQLITE_FIELD = ("CASE WHEN json_type(spec, '$.{key}') = 'integer' "
                 "AND json_extract(spec, '$.{key}') > 0 THEN json_extract(spec, '$.{key}') END")
# PostgreSQL does not promise to evaluate AND left to right: the cast waits for the CASE.
_POSTGRES_FIELD = ("CASE WHEN (spec ->> '{key}') ~ '^[0-9]{{1,18}}$' "
                   "THEN NULLIF((spec ->> '{key}')::bigint, 0) END")
# n_envs absent: one env (evaluation_grid's default); present but not a positive integer: NULL.
_SQLITE_ENVS = "CASE WHEN json_type(spec, '$.n_envs') IS NULL THEN 1 ELSE {field} END"
_POSTGRES_ENVS = "CASE WHEN (spec -> 'n_envs') IS NULL THEN 1 ELSE {field} END"

RUN_SCORES = """
CREATE VIEW run_scores AS
WITH spec_grid AS (
    SELECT id AS run_id, {every} AS every_steps, {total} AS total_steps, {n_envs} AS n_envs
    FROM runs
),
grid AS (
    SELECT run_id, every_steps, total_steps, n_envs,
           CASE WHEN every_steps IS NULL OR total_steps IS NULL OR n_envs IS NULL THEN 0
                WHEN every_steps >= n_envs THEN total_steps / every_steps
                ELSE total_steps / n_envs END AS expected_evaluations
    FROM spec_grid
),
per_eval AS (
    SELECT run_id, timestep, AVG(score) AS eval_mean
    FROM evaluations GROUP BY run_id, timestep
),
marked AS (
    SELECT p.run_id, p.timestep, p.eval_mean,
           CASE WHEN p.timestep >= g.every_steps AND p.timestep <= g.total_steps
                     AND p.timestep % g.n_envs = 0 AND p.timestep % g.every_steps < g.n_envs
                THEN 1 ELSE 0 END AS on_grid
    FROM per_eval p
    JOIN grid g ON g.run_id = p.run_id
),
ranked AS (
    SELECT run_id, timestep, eval_mean, on_grid,
           ROW_NUMBER() OVER (PARTITION BY run_id, on_grid ORDER BY timestep DESC) AS recency
    FROM marked
),
per_run AS (
    SELECT run_id,
           AVG(CASE WHEN on_grid = 1 THEN eval_mean END) AS mean_score,
           MAX(CASE WHEN on_grid = 1 AND recency = 1 THEN eval_mean END) AS last_score,
           SUM(on_grid) AS n_evaluations,
           MAX(CASE WHEN on_grid = 1 THEN timestep END) AS last_timestep,
           SUM(1 - on_grid) AS n_off_grid
    FROM ranked GROUP BY run_id
)
SELECT r.id AS run_id, x.name AS experiment, r.game AS game, r.attn AS attn, r.seed AS seed,
       s.mean_score AS mean_score, s.last_score AS last_score,
       s.n_evaluations AS n_evaluations, s.last_timestep AS last_timestep,
       g.expected_evaluations AS expected_evaluations, s.n_off_grid AS n_off_grid,
       CASE WHEN g.expected_evaluations > 0 AND s.n_evaluations = g.expected_evaluations
            THEN 1 ELSE 0 END AS complete
FROM per_run s
JOIN runs r ON r.id = s.run_id
JOIN experiments x ON x.id = r.experiment_id
JOIN grid g ON g.run_id = s.run_id
"""

GAME_TABLE = """
CREATE VIEW game_table AS
WITH cell_runs AS (
    SELECT x.name AS experiment, r.game AS game, r.attn AS attn, COUNT(*) AS n_runs
    FROM runs r JOIN experiments x ON x.id = r.experiment_id
    GROUP BY x.name, r.game, r.attn
),
game_seeds AS (
    SELECT x.name AS experiment, r.game AS game, COUNT(DISTINCT r.seed) AS expected_seeds
    FROM runs r JOIN experiments x ON x.id = r.experiment_id
    GROUP BY x.name, r.game
),
evaluated AS (
    SELECT DISTINCT experiment, game, attn FROM run_scores
),
done AS (
    SELECT experiment, game, attn, mean_score FROM run_scores WHERE complete = 1
),
cell AS (
    SELECT experiment, game, attn, COUNT(*) AS n_seeds, AVG(mean_score) AS mean_score
    FROM done GROUP BY experiment, game, attn
),
spread AS (
    SELECT c.experiment AS experiment, c.game AS game, c.attn AS attn,
           AVG((d.mean_score - c.mean_score) * (d.mean_score - c.mean_score)) AS variance
    FROM cell c
    JOIN done d ON d.experiment = c.experiment AND d.game = c.game AND d.attn = c.attn
    GROUP BY c.experiment, c.game, c.attn
)
SELECT e.experiment AS experiment, e.game AS game, e.attn AS attn,
       COALESCE(c.n_seeds, 0) AS n_seeds,
       c.mean_score AS mean_score,
       CASE WHEN c.n_seeds >= 2 THEN SQRT(s.variance) / SQRT(c.n_seeds) END AS std_error,
       gs.expected_seeds AS expected_seeds,
       cr.n_runs - COALESCE(c.n_seeds, 0) AS n_left_out,
       CASE WHEN COALESCE(c.n_seeds, 0) = gs.expected_seeds THEN 1 ELSE 0 END AS complete
FROM evaluated e
JOIN cell_runs cr ON cr.experiment = e.experiment AND cr.game = e.game AND cr.attn = e.attn
JOIN game_seeds gs ON gs.experiment = e.experiment AND gs.game = e.game
LEFT JOIN cell c ON c.experiment = e.experiment AND c.game = e.game AND c.attn = e.attn
LEFT JOIN spread s ON s.experiment = e.experiment AND s.game = e.game AND s.attn = e.attn
"""


def run_scores_sql(dialect: str) -> str:
    """RUN_SCORES with the spec fields read the way `dialect` reads JSON."""
    field, envs = ((_SQLITE_FIELD, _SQLITE_ENVS) if dialect == "sqlite"
                   else (_POSTGRES_FIELD, _POSTGRES_ENVS))
    return RUN_SCORES.format(
        every=field.format(key="eval_every_steps"), total=field.format(key="total_timesteps"),
        n_envs=envs.format(field=field.format(key="n_envs")))


def _previous() -> object:
    return importlib.import_module("migrations.versions.0003_run_scores_single_pass")


def _initial() -> object:
    return importlib.import_module("migrations.versions.0001_initial_schema")


def _replace_views(run_scores: str, game_table: str) -> None:
    op.execute("DROP VIEW IF EXISTS game_table")
    op.execute("DROP VIEW IF EXISTS run_scores")
    op.execute(run_scores)
    op.execute(game_table)


def upgrade() -> None:
    _replace_views(run_scores_sql(op.get_bind().dialect.name), GAME_TABLE)


def downgrade() -> None:
    _replace_views(_previous().RUN_SCORES, _initial().GAME_TABLE)  # type: ignore[attr-defined]
