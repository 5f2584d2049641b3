"""Agent steps per second of the satrl worker against a plain SB3 set-up like the paper's.

Both train the same PPO (the study's extractor and hyper-parameters, rollouts of n_envs x 128)
for the same number of agent steps in one invocation:

- worker: `python -m agents.train RUN_DIR` on a fresh run directory, evaluations and periodic
  checkpoints off (one final checkpoint, status.json, metrics.csv, manifest as usual);
- plain SB3: `make_atari_env` (SubprocVecEnv, AtariWrapper) + VecFrameStack(4) + `PPO.learn`,
  in this process, nothing written.

Printed per set-up: wall seconds end to end (interpreter and env start-up included for the
worker; env creation included for SB3) and the training rate (steps / seconds inside learn(),
from metrics.csv for the worker). Defaults fit a 2-core machine; the paper's size is
`--steps 100000 --envs 16`.

    python benchmarks/worker_throughput.py [--steps 2048] [--envs 8] [--attn NA] [--game Pong]
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ale_py
import gymnasium as gym

from agents.rundir import write_run_json
from agents.spec import PAPER, RunSpec

# SubprocVecEnv's forkserver workers re-import this module: plain SB3 needs ale-py's ids there.
gym.register_envs(ale_py)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2048, help="agent steps per set-up")
    parser.add_argument("--envs", type=int, default=8, help="parallel environments")
    parser.add_argument("--game", default="Pong", help="game short name")
    parser.add_argument("--attn", default="NA", help="attention type")
    parser.add_argument("--backend", default="subproc", choices=("subproc", "dummy"),
                        help="the worker's env backend (plain SB3 always uses SubprocVecEnv)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads for both set-ups (0: torch decides)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def benchmark_spec(args: argparse.Namespace) -> RunSpec:
    """The paper's spec at the benchmark's size, with evaluations and periodic checkpoints off."""
    rollout = args.envs * PAPER.n_steps
    return PAPER.replace(
        game=args.game, attn=args.attn, seed=args.seed, total_timesteps=args.steps,
        n_envs=args.envs, batch_size=min(PAPER.batch_size, rollout),
        eval_every_steps=args.steps + 1, checkpoint_every_steps=args.steps + 1,
        obs_dump_every_steps=0, env_backend=args.backend, device=args.device,
        torch_threads=args.threads,
    )


def run_worker(spec: RunSpec) -> tuple[float, float, int]:
    """(wall seconds, training steps/s, final steps) of one worker run."""
    with tempfile.TemporaryDirectory(prefix="satrl-bench-") as tmp:
        run_dir = Path(tmp) / "run"
        write_run_json(run_dir, spec)
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "agents.train", str(run_dir)],
                                capture_output=True, text=True)
        wall_s = time.perf_counter() - start
        if result.returncode != 0:
            raise SystemExit(f"worker failed ({result.returncode}):\n{result.stderr[-3000:]}")
        with (run_dir / "metrics.csv").open() as handle:
            rows = list(csv.DictReader(handle))
    # Each row: the steps of one rollout + update over their wall time; sum the times.
    previous, learn_s = 0, 0.0
    for row in rows:
        steps = int(row["timesteps"])
        learn_s += (steps - previous) / float(row["steps_per_s"])
        previous = steps
    return wall_s, previous / learn_s, previous


def run_plain_sb3(spec: RunSpec) -> tuple[float, float, int]:
    """(wall seconds, training steps/s, final steps) of plain SB3 with the same settings."""
    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_atari_env
    from stable_baselines3.common.utils import LinearSchedule
    from stable_baselines3.common.vec_env import SubprocVecEnv, VecFrameStack

    from agents.extractor import policy_kwargs

    if spec.torch_threads > 0:
        torch.set_num_threads(spec.torch_threads)
    start = time.perf_counter()
    env = VecFrameStack(make_atari_env(spec.env_id, n_envs=spec.n_envs, seed=spec.seed,
                                       vec_env_cls=SubprocVecEnv), n_stack=4)
    model = PPO(
        "CnnPolicy", env, learning_rate=LinearSchedule(spec.learning_rate, 0.0, 1.0),
        n_steps=spec.n_steps, batch_size=spec.batch_size, n_epochs=spec.n_epochs,
        gamma=spec.gamma, gae_lambda=spec.gae_lambda,
        clip_range=LinearSchedule(spec.clip_range, 0.0, 1.0), ent_coef=spec.ent_coef,
        vf_coef=spec.vf_coef, max_grad_norm=spec.max_grad_norm,
        policy_kwargs=policy_kwargs(spec.attn), seed=spec.seed, device=spec.device, verbose=0,
    )
    learn_start = time.perf_counter()
    model.learn(spec.total_timesteps)
    learn_s = time.perf_counter() - learn_start
    env.close()
    return time.perf_counter() - start, model.num_timesteps / learn_s, model.num_timesteps


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    spec = benchmark_spec(args)
    print(f"{spec.game} {spec.attn}, {spec.total_timesteps} agent steps, {spec.n_envs} envs, "
          f"worker backend {spec.env_backend}, torch threads {spec.torch_threads or 'default'}")
    results = {"satrl worker": run_worker(spec), "plain SB3": run_plain_sb3(spec)}
    print(f"{'set-up':<14} {'steps':>7} {'wall s':>8} {'train steps/s':>14}")
    for name, (wall_s, rate, steps) in results.items():
        print(f"{name:<14} {steps:>7} {wall_s:>8.1f} {rate:>14.1f}")
    worker_rate, plain_rate = results["satrl worker"][1], results["plain SB3"][1]
    print(f"worker / plain SB3 training rate: {worker_rate / plain_rate:.2f}")


if __name__ == "__main__":
    main()
