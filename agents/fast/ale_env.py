"""Training envs of the fast path: ale-py's AtariVectorEnv under SB3 AtariWrapper's protocol.

What SB3's stack does per training env (AGENT.md; agents/envs.py):

    NoopReset(1..30 raw no-ops) -> MaxAndSkip(4, max of the last two frames) -> EpisodicLife
    -> FireReset -> WarpFrame(84x84 gray, INTER_AREA) -> ClipReward, Monitor inside, frame stack 4

AtariVectorEnv does the emulation, the frame skip with max-pool, grayscale and the resize in C++
threads. Everything else happens here, on the host, per env, with numpy:

- life loss (0 < lives < previous lives) ends the learner's episode; the game goes on. ale-py's
  own `episodic_life=True` is not used: it restarts the whole game at every lost life.
- SB3 runs agent steps *inside* its resets that the learner never sees: after a lost life
  EpisodicLifeEnv steps NOOP, then FireResetEnv steps FIRE and action 2; after a game over the
  env is reset (no-ops) and FireResetEnv steps FIRE and 2. Here each env keeps a queue of such
  forced actions; while it is non-empty the env's steps are *hidden* (no learner transition) and
  when it empties, the frame starts a fresh frame stack (zeros + frame), as VecFrameStack does.
  Games without FIRE get only the NOOP (life loss) or the reset (game over).
- rewards are clipped to their sign for the learner only; scores and lengths per full game are
  raw (Monitor's), and count the hidden steps' rewards as Monitor does.
- a time-limit truncation (108,000 frames) is reported so that the engine bootstraps the reward
  with the value of the terminal observation, as SB3's collect_rollouts does.

The vector env steps all envs together, so an env in a hidden step falls behind the others by
one learner transition: the engine fills each env's rollout column at its own pace and lets envs
whose column is full step on (with the policy's actions, not learned from) until every column is
full. That and the other differences are listed in DIFFERENCES.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from stable_baselines3.common.monitor import ResultsWriter
from stable_baselines3.common.vec_env.base_vec_env import VecEnv

from agents.spec import RunSpec

#: What the fast path does differently from the reference path, and why it cannot be removed.
DIFFERENCES = (
    "frames: ale-py max-pools two grayscale frames (ALE palette luminance) where SB3 max-pools "
    "two RGB frames and converts the result with cv2; on Breakout the 84x84 frames are "
    "identical (bound 0, tested in tests/test_fast_env.py); where two different colours meet "
    "in the max-pool of another game a pixel can differ by a few grey levels",
    "no-op starts: ale-py draws 0..noop_max-1 no-ops per reset from its own generator; SB3 draws "
    "1..noop_max from the env's np_random (the same range shifted by one frame)",
    "hidden steps: an env in SB3's reset-time NOOP/FIRE/2 steps misses one synchronous vector "
    "step of learner transitions; its column fills later and the envs that finished their "
    "column step on until every column is full: those few steps (about 3 per lost life, per "
    "rollout at most the largest lag) are not learned from",
    "time limit: ale-py counts 108,000 frames from the end of the reset's no-ops; the reference "
    "TimeLimit counts them from the reset (at most noop_max frames later)",
    "edge cases: a life lost or a game over *during* a hidden FIRE/2 step restarts the queue (the "
    "game-over case as SB3 does); SB3's FireResetEnv resets again on a lost life there too",
)

#: Action indices of the minimal action set that SB3's wrappers press (FIRE is 1 where present).
NOOP, FIRE, ACTION_TWO = 0, 1, 2
#: Queue marker for the vector env's automatic reset step (NextStep mode ignores its action).
AUTORESET = -1


def ale_game(env_id: str) -> str:
    """The ROM name of a gymnasium id (`BreakoutNoFrameskip-v4` -> `breakout`)."""
    import ale_py

    gym.register_envs(ale_py)
    return str(gym.spec(env_id).kwargs["game"])


def max_frames_per_episode(env_id: str) -> int:
    import ale_py

    gym.register_envs(ale_py)
    return int(gym.spec(env_id).kwargs.get("max_num_frames_per_episode", 108_000))


class SpacesOnlyVecEnv(VecEnv):
    """The spaces and env count of the training envs, for SB3's PPO object; it never steps.

    PPO needs an env to build its policy and to save `n_envs` and the spaces in its zip; the
    fast engine feeds the policy itself, so stepping this is a bug and raises.
    """

    def __init__(self, n_envs: int, observation_space: spaces.Box, n_actions: int) -> None:
        super().__init__(n_envs, observation_space, spaces.Discrete(n_actions))

    def reset(self) -> np.ndarray:  # called once by SB3's _setup_learn
        return np.zeros((self.num_envs, *self.observation_space.shape), dtype=np.uint8)

    def step_async(self, actions: np.ndarray) -> None:
        raise RuntimeError("the fast engine steps AtariVectorSource, not this stand-in")

    def step_wait(self) -> Any:
        raise RuntimeError("the fast engine steps AtariVectorSource, not this stand-in")

    def close(self) -> None:
        pass

    def get_attr(self, attr_name: str, indices: Any = None) -> list[Any]:
        return [None for _ in self._get_indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: Any = None) -> None:
        pass

    def env_method(self, method_name: str, *args: Any, indices: Any = None,
                   **kwargs: Any) -> list[Any]:
        return [None for _ in self._get_indices(indices)]

    def env_is_wrapped(self, wrapper_class: type, indices: Any = None) -> list[bool]:
        return [False for _ in self._get_indices(indices)]

    def seed(self, seed: int | None = None) -> list[int | None]:
        return [None for _ in range(self.num_envs)]


@dataclass
class StepOutcome:
    """What one synchronous step of all envs means to the learner (arrays of n_envs)."""

    frames: np.ndarray          # (n, 84, 84) uint8, the newest frame of each env
    visible: np.ndarray         # bool: this step was a learner transition (policy action used)
    reward: np.ndarray          # float32: the learner's (clipped) reward of that transition
    done: np.ndarray            # bool: the learner's episode ended with it (life loss, game end)
    bootstrap: np.ndarray       # bool: ended by the time limit: add gamma * V(terminal obs)
    fresh: np.ndarray           # bool: frames starts a new frame stack (a hidden phase ended)
    episodes: list[tuple[int, float, int]] = field(default_factory=list)  # (env, score, frames)


class AtariVectorSource:
    """n_envs Atari games under SB3 AtariWrapper's protocol, stepped together in C++ threads.

    Usage: `frames = reset(seed)` (fresh stacks), then per step
    `send, visible = actions_to_send(policy_actions)` and `outcome = step(send)`, or
    `send(send)`, other work while the games run, and `outcome = receive()`.
    """

    def __init__(self, spec: RunSpec, num_threads: int = 0,
                 monitor_dir: Path | None = None, append_monitor: bool = False,
                 max_frames: int | None = None) -> None:
        from ale_py.vector_env import AtariVectorEnv

        # C++ emulation threads (0: one per env); an execution knob for several runs per node.
        num_threads = num_threads or int(os.environ.get("SATRL_ALE_THREADS", "0") or 0)
        self.spec = spec
        self.n_envs = spec.n_envs
        self.env = AtariVectorEnv(
            ale_game(spec.env_id), spec.n_envs, num_threads=num_threads,
            max_num_frames_per_episode=max_frames or max_frames_per_episode(spec.env_id),
            repeat_action_probability=spec.repeat_action_probability,
            img_height=spec.screen_size, img_width=spec.screen_size, grayscale=True,
            stack_num=1, frameskip=spec.frame_skip, maxpool=True, noop_max=spec.noop_max,
            episodic_life=False, reward_clipping=False, use_fire_reset=False,
            autoreset_mode="NextStep",
        )
        import ale_py

        action_set = list(self.env.ale.get_action_set())
        self.n_actions = len(action_set)
        # SB3 adds FireResetEnv when the game's minimal action set has FIRE (and >= 3 actions).
        self.has_fire = ale_py.Action.FIRE in action_set and len(action_set) >= 3
        if self.has_fire and action_set[FIRE] != ale_py.Action.FIRE:
            raise RuntimeError(f"{spec.game}: FIRE is not action 1 of the minimal action set")
        self.life_queue = [NOOP, FIRE, ACTION_TWO] if self.has_fire else [NOOP]
        self.reset_queue = [AUTORESET, FIRE, ACTION_TWO] if self.has_fire else [AUTORESET]
        self.queues: list[list[int]] = [[] for _ in range(self.n_envs)]
        self.lives = np.zeros(self.n_envs, dtype=np.int64)
        self.scores = np.zeros(self.n_envs, dtype=np.float64)
        self._visible = np.ones(self.n_envs, dtype=bool)
        self._writers: list[ResultsWriter] | None = None
        self._t_start = time.time()
        if monitor_dir is not None:
            monitor_dir.mkdir(parents=True, exist_ok=True)
            self._writers = []
            for i in range(self.n_envs):
                path = monitor_dir / f"train_{i}.monitor.csv"
                self._writers.append(ResultsWriter(
                    str(path), header={"t_start": self._t_start, "env_id": spec.env_id},
                    override_existing=not (append_monitor and path.is_file())))

    @property
    def observation_space(self) -> spaces.Box:
        shape = (self.spec.frame_stack, self.spec.screen_size, self.spec.screen_size)
        return spaces.Box(low=0, high=255, shape=shape, dtype=np.uint8)

    def stand_in(self) -> SpacesOnlyVecEnv:
        """The env object to give SB3's PPO (spaces and n_envs only)."""
        return SpacesOnlyVecEnv(self.n_envs, self.observation_space, self.n_actions)

    def reset(self, seed: int) -> np.ndarray:
        """Reset every game (env i seeded with seed + i, as SB3's VecEnv.seed does).

        Returns the frames (n, 84, 84); with FIRE the first two steps of each env are the hidden
        FIRE and 2, so these frames are only placeholders until `fresh` says otherwise.
        """
        obs, info = self.env.reset(seed=int(seed))
        self.lives = np.asarray(info["lives"], dtype=np.int64).copy()
        self.scores[:] = 0.0
        self.queues = [[FIRE, ACTION_TWO] if self.has_fire else [] for _ in range(self.n_envs)]
        return np.asarray(obs)[:, -1]

    def ready(self) -> np.ndarray:
        """Envs whose next step is a learner transition (no forced action queued)."""
        return np.fromiter((not q for q in self.queues), dtype=bool, count=self.n_envs)

    def actions_to_send(self, policy_actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(actions to send, visible): the policy's actions, forced ones where a hidden phase
        runs (its queue is popped); visible marks the envs whose step is a learner transition."""
        send = np.asarray(policy_actions, dtype=np.int64).copy()
        visible = np.ones(self.n_envs, dtype=bool)
        for i, queue in enumerate(self.queues):
            if queue:
                action = queue.pop(0)
                send[i] = NOOP if action == AUTORESET else action
                visible[i] = False
        self._visible = visible
        return send, visible

    def step(self, send: np.ndarray) -> StepOutcome:
        """Step every env with `send` (from actions_to_send) and interpret the result."""
        self.send(send)
        return self.receive()

    def send(self, send: np.ndarray) -> None:
        """Start stepping every env with `send` (from actions_to_send) and return at once.

        The emulation runs in ale-py's C++ threads until `receive`; the host is free meanwhile
        (ale-py's async interface: AtariVectorEnv.send/recv, here over the whole batch).
        """
        self.env.send(np.ascontiguousarray(send, dtype=np.int64))

    def receive(self) -> StepOutcome:
        """Wait for the step started by `send` and interpret its result."""
        obs, reward, terminated, truncated, info = self.env.recv()
        visible = self._visible
        reward = np.asarray(reward, dtype=np.float64)
        terminated = np.asarray(terminated, dtype=bool)
        truncated = np.asarray(truncated, dtype=bool)
        lives = np.asarray(info["lives"], dtype=np.int64)
        self.scores += reward  # Monitor counts every frame's raw reward, hidden steps included
        game_end = terminated | truncated
        life_loss = np.zeros(self.n_envs, dtype=bool)
        if self.spec.terminal_on_life_loss:
            life_loss = visible & (lives > 0) & (lives < self.lives)
        done = visible & (game_end | life_loss)
        bootstrap = visible & truncated & ~terminated & ~life_loss
        learner_reward = np.sign(reward) if self.spec.clip_reward else reward
        episodes: list[tuple[int, float, int]] = []
        if game_end.any() or done.any():
            frames_played = np.asarray(info["episode_frame_number"], dtype=np.int64)
            for i in np.flatnonzero(game_end | done):
                if game_end[i]:
                    episodes.append((int(i), float(self.scores[i]), int(frames_played[i])))
                    self.scores[i] = 0.0
                    self.queues[i] = list(self.reset_queue)
                else:
                    self.queues[i] = list(self.life_queue)
        self.lives = lives.copy()
        # A hidden step that emptied its queue (and did not end the game again) starts a stack.
        fresh = ~visible & np.fromiter((not q for q in self.queues), dtype=bool,
                                       count=self.n_envs)
        if episodes:
            self._log_episodes(episodes)
        return StepOutcome(frames=np.asarray(obs)[:, -1], visible=visible,
                           reward=learner_reward.astype(np.float32), done=done,
                           bootstrap=bootstrap, fresh=fresh, episodes=episodes)

    def _log_episodes(self, episodes: list[tuple[int, float, int]]) -> None:
        if self._writers is None:
            return
        now = time.time()
        for i, score, frames in episodes:
            self._writers[i].write_row({"r": round(score, 6), "l": frames,
                                        "t": round(now - self._t_start, 6)})

    def close(self) -> None:
        self.env.close()
        for writer in self._writers or []:
            writer.close()


def monitor_header(path: Path) -> dict[str, Any]:
    """The JSON header of a monitor CSV (for tests and tools)."""
    with path.open() as handle:
        return dict(json.loads(handle.readline().lstrip("#")))
