"""Atari environments of one run: the training VecEnv and the separate evaluation env.

Both are `<Game>NoFrameskip-v4` with SB3's AtariWrapper configured from the spec, the Monitor
*inside* the AtariWrapper (so monitor CSVs and evaluations see raw full-game scores, not clipped
rewards or life-loss "episodes"), then frame stacking and a channel-first transpose:

    gym.make -> Monitor -> AtariWrapper -> [VecEnv] -> VecFrameStack(4) -> VecTransposeImage

Every process that makes an env registers ale-py's ids first (`gym.register_envs(ale_py)`):
SubprocVecEnv workers start through forkserver and do not inherit the parent's registrations.
"""

from __future__ import annotations

import functools
import multiprocessing
import signal
from collections.abc import Callable
from pathlib import Path

import ale_py
import gymnasium as gym
from stable_baselines3.common.atari_wrappers import AtariWrapper
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import (
    DummyVecEnv,
    SubprocVecEnv,
    VecEnv,
    VecFrameStack,
    VecTransposeImage,
)

from agents.spec import RunSpec

#: Offset of the evaluation env's seed from the run's seed, so that it never replays the
#: episodes of a training env (those use seed + 0 ... seed + n_envs - 1).
EVAL_SEED_OFFSET = 10_000


def make_atari_env(
    spec: RunSpec,
    monitor_file: Path | None,
    append_monitor: bool = False,
    ignore_job_signals: bool = False,
) -> gym.Env:
    """One wrapped Atari env (no frame stack: that is done on the VecEnv).

    :param monitor_file: Monitor CSV path without its `.monitor.csv` suffix; None logs nowhere.
    :param append_monitor: continue the CSV if it exists (a resumed run) instead of overwriting.
    :param ignore_job_signals: set in SubprocVecEnv workers, so that a scheduler's SIGTERM or
        SIGUSR1, which reaches every process of the job, leaves them alive for the worker's own
        final checkpoint; they exit when the worker closes their pipes (or dies).
    """
    if ignore_job_signals:
        for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(signum, signal.SIG_IGN)
    gym.register_envs(ale_py)
    env = gym.make(spec.env_id, repeat_action_probability=spec.repeat_action_probability)
    # SB3's Monitor writes its header only when it overwrites: append to existing files only.
    csv_exists = monitor_file is not None and Path(f"{monitor_file}.monitor.csv").is_file()
    env = Monitor(env, filename=None if monitor_file is None else str(monitor_file),
                  override_existing=not (append_monitor and csv_exists))
    return AtariWrapper(
        env,
        noop_max=spec.noop_max,
        frame_skip=spec.frame_skip,
        screen_size=spec.screen_size,
        terminal_on_life_loss=spec.terminal_on_life_loss,
        clip_reward=spec.clip_reward,
    )


def _stack(venv: VecEnv, spec: RunSpec) -> VecEnv:
    return VecTransposeImage(VecFrameStack(venv, n_stack=spec.frame_stack))


def make_train_env(
    spec: RunSpec, monitor_dir: Path | None, seed: int, append_monitor: bool = False
) -> VecEnv:
    """spec.n_envs training envs (SubprocVecEnv or DummyVecEnv per spec.env_backend).

    Monitor CSVs are `monitor_dir/train_<i>.monitor.csv`; env i is seeded with seed + i.
    """
    subproc = spec.env_backend == "subproc"
    thunks: list[Callable[[], gym.Env]] = [
        functools.partial(
            make_atari_env,
            spec,
            None if monitor_dir is None else monitor_dir / f"train_{i}",
            append_monitor,
            subproc,
        )
        for i in range(spec.n_envs)
    ]
    if subproc:
        # forkserver where the platform has it (SB3's default): no fork of a process that holds
        # torch threads. The workers re-import this module, which registers ale-py's ids.
        method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else None
        venv: VecEnv = SubprocVecEnv(thunks, start_method=method)
    else:
        venv = DummyVecEnv(thunks)
    venv.seed(seed)
    return _stack(venv, spec)


def make_eval_env(
    spec: RunSpec, monitor_dir: Path | None, seed: int | None = None, append_monitor: bool = False
) -> VecEnv:
    """The single evaluation env, wrapped exactly like a training env (`monitor_dir/eval`)."""
    venv = DummyVecEnv([
        functools.partial(
            make_atari_env, spec, None if monitor_dir is None else monitor_dir / "eval",
            append_monitor,
        )
    ])
    venv.seed(spec.seed + EVAL_SEED_OFFSET if seed is None else seed)
    return _stack(venv, spec)
