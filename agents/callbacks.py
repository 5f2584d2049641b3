"""SB3 callbacks of the worker: evaluation, checkpoints, observation dumps, metrics, status, stop.

Every schedule is in agent steps summed over envs (SB3's `num_timesteps`), not in callback calls:
an event "every N steps" fires in the first `on_step` where `num_timesteps // N` grows, and is
recorded with that `num_timesteps` (equal to the multiple of N whenever n_envs divides N, as in
every preset). Because the counters come from `num_timesteps`, a resumed run keeps the schedule
of the run it continues; SB3's own EvalCallback/CheckpointCallback count calls since `learn()`
and would shift it.

Within one `on_step` the order is: evaluation, observation dump, checkpoint, stop. So a
checkpoint at step s implies that the evaluation due at s was written before it, and a run
resumed from s has nothing to redo at s.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.vec_env import VecEnv

from agents import rundir
from agents.stop import StopRequest

# --- status.json ------------------------------------------------------------------------------

PHASES = ("starting", "training", "evaluating", "checkpointing", "exiting")


class StatusHeartbeat:
    """Writes status.json every `every_s` from a daemon thread, and at once on a phase change.

    A thread rather than a callback: the PPO update and an evaluation run for seconds (minutes
    for a long game) without calling `on_step`, and the orchestrator reads a stale heartbeat as
    a lost job.
    """

    def __init__(self, run_dir: Path, every_s: float, total_timesteps: int, attempt: int,
                 started_at: float) -> None:
        self.path = run_dir / rundir.STATUS_JSON
        self.every_s = every_s
        self.total_timesteps = total_timesteps
        self.attempt = attempt
        self.started_at = started_at
        self.phase = "starting"
        self.timesteps = 0
        self._rate_origin: tuple[float, int] | None = None
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="status-heartbeat", daemon=True)

    def start(self) -> None:
        self.write()
        self._thread.start()

    def start_rate(self, timesteps: int) -> None:
        """Measure steps_per_s from here (the start of learning in this attempt)."""
        self.timesteps = timesteps
        self._rate_origin = (time.time(), timesteps)

    def set_phase(self, phase: str) -> None:
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}: use one of {', '.join(PHASES)}")
        self.phase = phase
        self.write()

    def steps_per_s(self) -> float:
        if self._rate_origin is None:
            return 0.0
        t0, steps0 = self._rate_origin
        elapsed = time.time() - t0
        return (self.timesteps - steps0) / elapsed if elapsed > 0 else 0.0

    def write(self) -> None:
        with self._lock:  # the thread and the main thread both write
            rundir.write_json(self.path, {
                "phase": self.phase,
                "timesteps": int(self.timesteps),
                "total_timesteps": self.total_timesteps,
                "steps_per_s": round(self.steps_per_s(), 3),
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "attempt": self.attempt,
                "started_at": self.started_at,
                "updated_at": time.time(),
            })

    def _beat(self) -> None:
        while not self._stopped.wait(self.every_s):
            # A full or flaky filesystem must not kill training: the next beat retries.
            with contextlib.suppress(OSError):
                self.write()

    def stop(self) -> None:
        """Stop the thread; the caller writes the last status itself."""
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join()


class StatusCallback(BaseCallback):
    """Feeds the heartbeat the step counter and the training phase."""

    def __init__(self, heartbeat: StatusHeartbeat) -> None:
        super().__init__()
        self.heartbeat = heartbeat

    def _on_training_start(self) -> None:
        self.heartbeat.start_rate(self.model.num_timesteps)
        self.heartbeat.set_phase("training")

    def _on_step(self) -> bool:
        self.heartbeat.timesteps = self.model.num_timesteps
        return True


# --- stopping: signals, deadline, the end of the budget ---------------------------------------

class StopCallback(BaseCallback):
    """Stops learn() on a StopRequest, or exactly at the budget when a rollout would overshoot.

    SB3 only stops between rollouts, so a run resumed from a checkpoint taken mid-rollout would
    end past total_timesteps. Here the last, partial rollout is cut at total_timesteps instead (and
    not trained on); a run whose rollouts divide the budget ends exactly as in plain SB3.
    """

    def __init__(self, stop: StopRequest, total_timesteps: int) -> None:
        super().__init__()
        self.stop = stop
        self.total_timesteps = total_timesteps
        self._rollout_end = 0

    def _on_rollout_start(self) -> None:
        self._rollout_end = self.model.num_timesteps + self.model.n_steps * self.model.n_envs

    def _on_step(self) -> bool:
        if self.stop.poll() is not None:
            return False
        return not (self.model.num_timesteps >= self.total_timesteps
                    and self._rollout_end > self.total_timesteps)


# --- schedules in agent steps -------------------------------------------------------------------

class EveryStepsCallback(BaseCallback):
    """Base of the events "every N agent steps": `_crossed()` is true once per multiple of N."""

    def __init__(self, every_steps: int) -> None:
        super().__init__()
        self.every_steps = every_steps
        self._last_multiple = 0

    def _on_training_start(self) -> None:
        # A resumed run: the multiples up to the checkpoint's step were handled before it.
        self._last_multiple = self._multiple()

    def _multiple(self) -> int:
        return self.model.num_timesteps // self.every_steps if self.every_steps > 0 else 0

    def _crossed(self) -> bool:
        multiple = self._multiple()
        if multiple > self._last_multiple:
            self._last_multiple = multiple
            return True
        return False


class EvaluationHistory:
    """evaluations.npz, SB3 EvalCallback's layout: timesteps (n,), results, ep_lengths (n, k)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.timesteps: list[int] = []
        self.results: list[list[float]] = []
        self.ep_lengths: list[list[int]] = []
        if path.exists():
            with np.load(path) as data:
                self.timesteps = [int(t) for t in data["timesteps"]]
                self.results = data["results"].tolist()
                self.ep_lengths = data["ep_lengths"].astype(int).tolist()

    def append(self, timestep: int, results: list[float], ep_lengths: list[int]) -> None:
        self.timesteps.append(timestep)
        self.results.append([float(r) for r in results])
        self.ep_lengths.append([int(n) for n in ep_lengths])
        self.save()

    def drop_after(self, timestep: int) -> int:
        """Forget evaluations newer than `timestep` (a resume redoes them); returns how many."""
        keep = [i for i, t in enumerate(self.timesteps) if t <= timestep]
        dropped = len(self.timesteps) - len(keep)
        if dropped:
            self.timesteps = [self.timesteps[i] for i in keep]
            self.results = [self.results[i] for i in keep]
            self.ep_lengths = [self.ep_lengths[i] for i in keep]
            self.save()
        return dropped

    def save(self) -> None:
        if not self.timesteps:
            self.path.unlink(missing_ok=True)
            return
        buffer = io.BytesIO()
        np.savez(buffer, timesteps=np.asarray(self.timesteps, dtype=np.int64),
                 results=np.asarray(self.results, dtype=np.float64),
                 ep_lengths=np.asarray(self.ep_lengths, dtype=np.int64))
        rundir.write_bytes(self.path, buffer.getvalue())


class _EvaluationAborted(Exception):
    """Raised inside evaluate_policy when a stop is requested (a long game must not delay it)."""


class EvaluationCallback(EveryStepsCallback):
    """Full-game evaluations on the separate eval env, every `every_steps`, into evaluations.npz.

    Scores and lengths come from the Monitor inside AtariWrapper (SB3's evaluate_policy reads its
    `episode` infos), so they are raw game scores over whole games, not life-loss episodes.

    An evaluation interrupted by a stop is not recorded; the worker then checkpoints at that very
    step, and the resumed run does the missing evaluation first, at the same step with the same
    weights (`_on_training_start`).
    """

    def __init__(self, eval_env: VecEnv, history: EvaluationHistory, every_steps: int,
                 n_eval_episodes: int, deterministic: bool, stop: StopRequest,
                 heartbeat: StatusHeartbeat) -> None:
        super().__init__(every_steps)
        self.eval_env = eval_env
        self.history = history
        self.n_eval_episodes = n_eval_episodes
        self.deterministic = deterministic
        self.stop = stop
        self.heartbeat = heartbeat

    def _on_training_start(self) -> None:
        super()._on_training_start()
        done = {t // self.every_steps for t in self.history.timesteps}
        if self._last_multiple > 0 and self._last_multiple not in done:
            self._evaluate()

    def _on_step(self) -> bool:
        if self._crossed():
            self._evaluate()
        return True

    def _evaluate(self) -> None:
        def abort_on_stop(_locals: dict[str, Any], _globals: dict[str, Any]) -> None:
            if self.stop.poll() is not None:
                raise _EvaluationAborted

        self.heartbeat.set_phase("evaluating")
        try:
            results, lengths = evaluate_policy(
                self.model, self.eval_env, n_eval_episodes=self.n_eval_episodes,
                deterministic=self.deterministic, return_episode_rewards=True,
                callback=abort_on_stop,
            )
        except _EvaluationAborted:
            return
        finally:
            self.heartbeat.set_phase("training")
        assert isinstance(results, list) and isinstance(lengths, list)
        self.history.append(self.model.num_timesteps, results, lengths)
        self.logger.record("eval/mean_reward", float(np.mean(results)))
        self.logger.record("eval/mean_ep_length", float(np.mean(lengths)))


class CheckpointCallback(EveryStepsCallback):
    """Calls the worker's `save(steps)` every `every_steps` below the budget.

    The checkpoint at total_timesteps is the worker's own, saved after learn() returns: one
    taken here, in on_step, would come before the last update, and a worker killed during that
    update would leave a "final" checkpoint without it, which the next attempt takes as done.
    """

    def __init__(self, every_steps: int, total_timesteps: int,
                 save: Callable[[int], None]) -> None:
        super().__init__(every_steps)
        self.total_timesteps = total_timesteps
        self.save = save

    def _on_step(self) -> bool:
        if self._crossed() and self.model.num_timesteps < self.total_timesteps:
            self.save(self.model.num_timesteps)
        return True


class ObservationDumpCallback(EveryStepsCallback):
    """Every `every_steps`, `count` stacked training observations as (1, 4, 84, 84) uint8 .npy.

    Taken from the training envs' new observations at the crossing step (one per env), then,
    when `count` exceeds n_envs, from the steps just before it (kept in a small ring), newest
    first: the whole dump is written in one step, so neither a stop nor the end of training
    can cut it. Only an attempt that crosses within its first few steps continues over the next
    ones. Named obs_<crossing step>_<k>, k from 0.
    """

    def __init__(self, run_dir: Path, every_steps: int, count: int) -> None:
        super().__init__(every_steps)
        self.run_dir = run_dir
        self.count = count
        self._dumping: int | None = None
        self._next_k = 0
        self._recent: deque[np.ndarray] = deque()

    def _on_step(self) -> bool:
        if self.count <= 0 or self.every_steps <= 0:
            return True
        crossed = self._crossed()
        # Earlier steps a dump may need (none in the paper: 10 observations of 16 envs), kept
        # only in the last few steps before the next crossing.
        n_envs = self.model.n_envs
        steps_kept = -(-self.count // n_envs) - 1
        next_crossing = (self._last_multiple + 1) * self.every_steps
        keep = steps_kept > 0 and self.model.num_timesteps >= next_crossing - steps_kept * n_envs
        if not (crossed or self._dumping is not None or keep):
            return True  # the fast engine's new_obs lives on the device: read it only when used
        # SB3's rollout loop passes its locals to callbacks; new_obs is the documented batch of
        # observations after the step, already frame-stacked and channel-first.
        new_obs = np.asarray(self.locals["new_obs"])
        if crossed:
            self._dumping, self._next_k = self.model.num_timesteps, 0
            for batch in (new_obs, *reversed(self._recent)):
                self._save_batch(batch)
        elif self._dumping is not None:
            self._save_batch(new_obs)
        if self._dumping is not None and self._next_k >= self.count:
            self._dumping = None
        if keep:
            self._recent.append(new_obs.copy())
            while len(self._recent) > steps_kept:
                self._recent.popleft()
        return True

    def _save_batch(self, batch: np.ndarray) -> None:
        for i in range(batch.shape[0]):
            if self._next_k >= self.count:
                return
            self._save(batch[i : i + 1])

    def _save(self, obs: np.ndarray) -> None:
        assert self._dumping is not None
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(obs, dtype=np.uint8))
        rundir.write_bytes(rundir.observation_path(self.run_dir, self._dumping, self._next_k),
                           buffer.getvalue())
        self._next_k += 1


# --- metrics.csv --------------------------------------------------------------------------------

#: metrics.csv's columns; the training values are SB3's `train/...` logger keys of that name.
METRIC_COLUMNS = ("timesteps", "steps_per_s", "learning_rate", "clip_range", "loss",
                  "policy_loss", "value_loss", "entropy_loss", "approx_kl", "clip_fraction",
                  "explained_variance")
_LOGGER_KEYS = {"learning_rate": "train/learning_rate", "clip_range": "train/clip_range",
                "loss": "train/loss", "policy_loss": "train/policy_gradient_loss",
                "value_loss": "train/value_loss", "entropy_loss": "train/entropy_loss",
                "approx_kl": "train/approx_kl", "clip_fraction": "train/clip_fraction",
                "explained_variance": "train/explained_variance"}


class MetricsTable:
    """metrics.csv, one row per PPO update, appended as it comes.

    Appending keeps an update's I/O constant: rewriting the whole file (and fsyncing it) on each
    row grows to ~700 KB per update late in a paper run, about 1.8 GB written per run. Each row
    is one write() of a whole line to an O_APPEND descriptor, so a reader sees whole rows and at
    worst an unterminated last line (a write in progress, or a killed worker); readers skip such
    a line, and the next attempt rewrites the file without it. The header comes with an atomic
    write when the file is created; `sync` makes the rows durable (before each checkpoint).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict[str, str]] = []
        self._rewrite = False  # the file on disk is not exactly header + self.rows
        if path.exists():
            text = path.read_text()
            complete = rundir.complete_lines(text)
            self._rewrite = complete != text or not complete.startswith(
                ",".join(METRIC_COLUMNS) + "\n")
            self.rows = [row for row in csv.DictReader(io.StringIO(complete))
                         if row.get("timesteps")]

    def append(self, row: dict[str, float]) -> None:
        values = {k: repr(row[k]) if isinstance(row[k], float) else str(row[k])
                  for k in METRIC_COLUMNS}
        self.rows.append(values)
        if self._rewrite or not self.path.exists():
            self.save()
            return
        line = io.StringIO()
        csv.DictWriter(line, fieldnames=METRIC_COLUMNS, lineterminator="\n").writerow(values)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, line.getvalue().encode())
        finally:
            os.close(fd)

    def drop_after(self, timestep: int) -> int:
        """Forget rows newer than `timestep` (their updates are redone); returns how many."""
        keep = [row for row in self.rows if int(row["timesteps"]) <= timestep]
        dropped = len(self.rows) - len(keep)
        if dropped or self._rewrite:
            self.rows = keep
            self.save()
        return dropped

    def save(self) -> None:
        """Rewrite the whole file atomically (header and every row)."""
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=METRIC_COLUMNS, lineterminator="\n",
                                extrasaction="ignore")
        writer.writeheader()
        writer.writerows(self.rows)
        rundir.write_bytes(self.path, text.getvalue().encode())
        self._rewrite = False

    def sync(self) -> None:
        """fsync the appended rows (a checkpoint must not outlive the rows before it)."""
        if not self.path.exists():
            return
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class MetricsCallback(BaseCallback):
    """Appends one metrics.csv row per PPO update.

    SB3 records the update's values (`train/...`) in the logger during `train()`, after the
    rollout's callbacks; they are read at the next rollout's start, or at the end of training
    for the last update. The row's timestep is num_timesteps at the end of the rollout that the
    update learned from, which is also the point the lr and clip schedules were evaluated at.
    """

    def __init__(self, table: MetricsTable) -> None:
        super().__init__()
        self.table = table
        self._pending: int | None = None
        self._last: tuple[float, int] = (0.0, 0)

    def _on_training_start(self) -> None:
        self._last = (time.time(), self.model.num_timesteps)

    def _on_rollout_end(self) -> None:
        self._pending = self.model.num_timesteps  # an update follows this rollout

    def _on_rollout_start(self) -> None:
        self._write_pending()

    def _on_training_end(self) -> None:
        self._write_pending()

    def _on_step(self) -> bool:
        return True

    def _write_pending(self) -> None:
        if self._pending is None:
            return
        values = self.logger.name_to_value
        if "train/loss" not in values:  # the update did not run (training stopped first)
            self._pending = None
            return
        now = time.time()
        t_prev, steps_prev = self._last
        row: dict[str, float] = {
            "timesteps": self._pending,
            "steps_per_s": (self._pending - steps_prev) / max(now - t_prev, 1e-9),
        }
        for column, key in _LOGGER_KEYS.items():
            value = float(values.get(key, math.nan))
            row[column] = value
        self.table.append(row)
        self._last = (now, self._pending)
        self._pending = None
