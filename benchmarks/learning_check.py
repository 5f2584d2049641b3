"""The fast path's learning check: Breakout NA, 3 seeds x 1M agent steps, reference evaluation.

`--engine sb3` runs the same check on the reference path, for comparison.

Each seed is a real worker run (`python -m agents.train RUN_DIR`) with the paper's spec on the
fast path (engine fast, env_backend ale_vector), evaluated by the reference protocol (AGENT.md:
5 full games, stochastic actions, unclipped scores) at `--eval-every` steps. The check passes when
the mean over the seeds of their evaluation at `--steps` lies in the published seed range of
Breakout NA at 1M steps, [11.0, 18.4] (published mean 13.7, random play 1.7), and no seed scores
below 7.

Run directories are kept under `--out`: a check stopped by `--deadline-s` (the workers save and
exit 75) or killed resumes from the newest checkpoint when started again with the same `--out`.

    python benchmarks/learning_check.py --out /tmp/learning [--device cpu] [--parallel 3]
        [--seeds 0 1 10] [--steps 1000000] [--eval-every 500000] [--engine fast|sb3]
        [--cuda-graphs] [--deadline-s 0] [--more-episodes 30] [--summary-only]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from agents import rundir
from agents.spec import PAPER, RunSpec

PUBLISHED_RANGE = (11.0, 18.4)  # Breakout NA at 1M steps, min and max of the published seeds
SEED_FLOOR = 7.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="run directories go here")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 10])
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--eval-every", type=int, default=500_000)
    parser.add_argument("--checkpoint-every", type=int, default=100_000)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--parallel", type=int, default=3, help="workers at a time")
    parser.add_argument("--torch-threads", type=int, default=0, help="per worker (0: default)")
    parser.add_argument("--ale-threads", type=int, default=0, help="per worker (0: one per env)")
    parser.add_argument("--engine", default="fast", choices=("fast", "sb3"),
                        help="fast: the fast path; sb3: the reference path (for comparison)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="the fast engine's CUDA graphs (spec field cuda_graphs)")
    parser.add_argument("--more-episodes", type=int, default=0,
                        help="also evaluate each final checkpoint over this many full games "
                        "(the 5-game evaluations are noisy; informational, not the check)")
    parser.add_argument("--summary-only", action="store_true",
                        help="run no worker: summarise the run directories under --out")
    parser.add_argument("--deadline-s", type=float, default=0.0,
                        help="stop the workers (checkpoint, exit 75) this many seconds from now")
    return parser.parse_args(argv)


def seed_spec(args: argparse.Namespace, seed: int) -> RunSpec:
    return PAPER.replace(
        game="Breakout", attn="NA", seed=seed, total_timesteps=args.steps,
        eval_every_steps=args.eval_every, checkpoint_every_steps=args.checkpoint_every,
        obs_dump_every_steps=0, engine=args.engine,
        env_backend="ale_vector" if args.engine == "fast" else "subproc", device=args.device,
        torch_threads=args.torch_threads, cuda_graphs=args.cuda_graphs,
    )


def run_seeds(args: argparse.Namespace) -> dict[int, int]:
    """Start (or resume) one worker per seed, at most --parallel at once; their exit codes."""
    env = dict(os.environ)
    if args.ale_threads:
        env["SATRL_ALE_THREADS"] = str(args.ale_threads)
    if args.deadline_s > 0:
        env["SATRL_DEADLINE"] = str(int(time.time() + args.deadline_s))
    pending = list(args.seeds)
    running: dict[int, subprocess.Popen[bytes]] = {}
    codes: dict[int, int] = {}
    while pending or running:
        while pending and len(running) < args.parallel:
            seed = pending.pop(0)
            run_dir = args.out / f"seed{seed}"
            if not (run_dir / rundir.RUN_JSON).exists():
                rundir.write_run_json(run_dir, seed_spec(args, seed))
            with (args.out / f"seed{seed}.log").open("ab") as log:
                running[seed] = subprocess.Popen(
                    [sys.executable, "-m", "agents.train", str(run_dir)],
                    stdout=log, stderr=subprocess.STDOUT, env=env)
        time.sleep(2)
        for seed, proc in list(running.items()):
            if proc.poll() is not None:
                codes[seed] = proc.returncode
                del running[seed]
    return codes


def summarise(args: argparse.Namespace, codes: dict[int, int]) -> bool:
    finals: dict[int, float] = {}
    for seed in args.seeds:
        run_dir = args.out / f"seed{seed}"
        exit_path = run_dir / rundir.EXIT_JSON
        exit_info = rundir.read_json(exit_path) if exit_path.exists() else {}
        code = codes.get(seed, "not run")
        print(f"seed {seed}: worker exit {code} ({exit_info.get('reason')}) at "
              f"{exit_info.get('timesteps')} steps")
        npz = run_dir / rundir.EVALUATIONS_NPZ
        if not npz.exists():
            print("  no evaluations")
            continue
        with np.load(npz) as data:
            for step, scores in zip(data["timesteps"], data["results"], strict=True):
                print(f"  evaluation at {int(step)}: {scores.tolist()} mean {scores.mean():.1f}")
                if int(step) == args.steps:
                    finals[seed] = float(scores.mean())
    if len(finals) < len(args.seeds):
        print(f"{len(finals)} of {len(args.seeds)} seeds evaluated at {args.steps} steps: "
              "not checked")
        return False
    mean = float(np.mean(list(finals.values())))
    low, high = PUBLISHED_RANGE
    passed = low <= mean <= high and min(finals.values()) >= SEED_FLOOR
    print(f"Breakout NA at {args.steps} steps, {len(finals)} seeds: mean {mean:.2f} (published "
          f"range [{low}, {high}]), lowest seed {min(finals.values()):.1f} (floor {SEED_FLOOR}): "
          f"{'PASS' if passed else 'FAIL'}")
    return passed


def evaluate_more(args: argparse.Namespace) -> None:
    """Each seed's final checkpoint over --more-episodes full games, by the reference protocol."""
    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.evaluation import evaluate_policy

    from agents.envs import EVAL_SEED_OFFSET, make_eval_env

    torch.set_num_threads(max(args.torch_threads, 1))
    means = []
    for seed in args.seeds:
        run_dir = args.out / f"seed{seed}"
        path = rundir.checkpoint_path(run_dir, args.steps)
        if not path.exists():
            print(f"seed {seed}: no checkpoint at {args.steps} steps")
            continue
        spec = seed_spec(args, seed)
        # Seeds apart from the worker's own evaluations (those use seed + offset + step).
        env = make_eval_env(spec, None, seed=spec.seed + 2 * EVAL_SEED_OFFSET + args.steps)
        model = PPO.load(path, device="cpu")
        scores, _ = evaluate_policy(model, env, n_eval_episodes=args.more_episodes,
                                    deterministic=spec.eval_deterministic,
                                    return_episode_rewards=True)
        env.close()
        means.append(float(np.mean(scores)))
        print(f"seed {seed}: {args.more_episodes} games at {args.steps} steps: mean "
              f"{means[-1]:.2f} (standard error {np.std(scores) / np.sqrt(len(scores)):.2f})")
    if means:
        print(f"mean over {len(means)} seeds of {args.more_episodes}-game means: "
              f"{np.mean(means):.2f}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    codes: dict[int, int] = {}
    if not args.summary_only:
        start = time.perf_counter()
        codes = run_seeds(args)
        print(f"workers done in {time.perf_counter() - start:.0f} s")
    passed = summarise(args, codes)
    if args.more_episodes:
        evaluate_more(args)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
