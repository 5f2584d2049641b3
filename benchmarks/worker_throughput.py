"""Agent steps per second of the worker's reference path and fast path, measured in one run.

Every set-up trains the study's PPO (the two-convolution extractor, the paper's hyper-parameters:
16 envs, rollouts of 16 x 128, 3 epochs of minibatches of 256) on the same game.

The training loops, in this process, each iteration of n_envs x 128 agent steps split into its
rollout and its update seconds (the first, warm-up iteration is left out):

- reference: SB3's `PPO.learn` on the worker's training envs (SubprocVecEnv, AtariWrapper,
  VecFrameStack(4), VecTransposeImage: agents.envs.make_train_env), the paper's stack;
- fast: agents.fast's FastPPO on ale-py's AtariVectorEnv under the same protocol;
- fast+graphs: the same with its per-step and update work replayed as CUDA graphs (CUDA only).

With `--worker`, also the whole worker end to end, `python -m agents.train RUN_DIR` on a fresh
run directory per engine (evaluations and periodic checkpoints off; interpreter and env start-up
in the wall time; the training rate from metrics.csv), and plain SB3 (make_atari_env +
VecFrameStack + PPO.learn) for the worker's own overhead.

Figures are only comparable within one run: the ratios at the end are what to quote.

    python benchmarks/worker_throughput.py [--device auto] [--ref-steps 16384]
        [--fast-steps 32768] [--game Breakout] [--attn NA] [--envs 16] [--threads 0]
        [--worker] [--worker-steps 4096] [--json FILE]
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ale_py
import gymnasium as gym
import numpy as np

from agents.rundir import METRICS_CSV, write_run_json
from agents.spec import PAPER, RunSpec
from agents.train import new_ppo

# SubprocVecEnv's forkserver workers re-import this module: they need ale-py's ids.
gym.register_envs(ale_py)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ref-steps", type=int, default=16_384, help="reference loop steps")
    parser.add_argument("--fast-steps", type=int, default=32_768, help="fast loop steps")
    parser.add_argument("--envs", type=int, default=PAPER.n_envs)
    parser.add_argument("--game", default="Breakout")
    parser.add_argument("--attn", default="NA")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--worker", action="store_true",
                        help="also time the whole worker per engine, and plain SB3")
    parser.add_argument("--worker-steps", type=int, default=4096,
                        help="agent steps per worker run (--worker)")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    return parser.parse_args(argv)


# --- the training loops, rollout and update apart -------------------------------------------
def loop_reference(spec: RunSpec, steps: int) -> list[tuple[float, float]]:
    """(rollout s, update s) per iteration of SB3's own PPO.learn on the paper's stack."""
    from stable_baselines3.common.callbacks import BaseCallback

    from agents.envs import make_train_env

    class Split(BaseCallback):
        def __init__(self) -> None:
            super().__init__()
            self.marks: list[float] = []

        def _on_rollout_start(self) -> None:
            self.marks.append(time.perf_counter())

        def _on_rollout_end(self) -> None:
            self.marks.append(time.perf_counter())

        def _on_training_end(self) -> None:
            self.marks.append(time.perf_counter())

        def _on_step(self) -> bool:
            return True

    env = make_train_env(spec.replace(env_backend="subproc"), None, seed=spec.seed)
    try:
        model = new_ppo(spec, env)
        split = Split()
        model.learn(steps, callback=split)
    finally:
        env.close()
    t = split.marks  # start, end, start, end, ..., training end
    return [(t[i + 1] - t[i], t[i + 2] - t[i + 1]) for i in range(0, len(t) - 2, 2)]


def loop_fast(spec: RunSpec, steps: int, cuda_graphs: bool = False) -> list[tuple[float, float]]:
    """(rollout s, update s) per iteration of FastPPO on AtariVectorEnv; prints how many vector
    steps a rollout took (n_steps + the catch-up steps after hidden reset steps)."""
    from stable_baselines3.common.callbacks import BaseCallback

    from agents.fast.ale_env import AtariVectorSource
    from agents.fast.engine import FastPPO

    class Nothing(BaseCallback):
        def _on_step(self) -> bool:
            return True

    source = AtariVectorSource(spec.replace(engine="fast", env_backend="ale_vector"))
    try:
        model = new_ppo(spec, source.stand_in())
        engine = FastPPO(model, source, cuda_graphs=cuda_graphs)
        engine.learn(steps, callback=Nothing())
    finally:
        source.close()
    taken = engine.rollout_vector_steps
    print(f"  vector steps per rollout of {spec.n_steps}: mean {np.mean(taken):.1f}, "
          f"max {max(taken)} ({100 * (np.mean(taken) / spec.n_steps - 1):.1f}% not learned from)")
    return engine.timings


def loop_figures(name: str, timings: list[tuple[float, float]], spec: RunSpec,
                 wall_s: float) -> dict[str, Any]:
    timed = timings[1:] if len(timings) > 1 else timings
    rollout_s = float(np.mean([t[0] for t in timed]))
    update_s = float(np.mean([t[1] for t in timed]))
    return {"setup": name, "iterations": len(timed), "wall_s": wall_s,
            "steps_per_s": spec.rollout_size / (rollout_s + update_s), "rollout_s": rollout_s,
            "update_s": update_s, "rollout_ms_per_vector_step": 1000 * rollout_s / spec.n_steps,
            "update_share": update_s / (rollout_s + update_s)}


# --- the whole worker ---------------------------------------------------------------------
def worker_spec(spec: RunSpec, steps: int, engine: str) -> RunSpec:
    """`spec` as one worker run of `steps`, evaluations and periodic checkpoints off."""
    return spec.replace(total_timesteps=steps, eval_every_steps=steps + 1,
                        checkpoint_every_steps=steps + 1, obs_dump_every_steps=0, engine=engine,
                        env_backend="ale_vector" if engine == "fast" else "subproc")


def run_worker(spec: RunSpec) -> dict[str, float]:
    """Wall seconds, training steps/s (metrics.csv) and final steps of one worker run."""
    with tempfile.TemporaryDirectory(prefix="satrl-bench-") as tmp:
        run_dir = Path(tmp) / "run"
        write_run_json(run_dir, spec)
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "agents.train", str(run_dir)],
                                capture_output=True, text=True)
        wall_s = time.perf_counter() - start
        if result.returncode != 0:
            raise SystemExit(f"worker failed ({result.returncode}):\n{result.stderr[-3000:]}")
        with (run_dir / METRICS_CSV).open() as handle:
            rows = list(csv.DictReader(handle))
    # Each row: the steps of one rollout + update over their wall time; sum the times.
    previous, learn_s = 0, 0.0
    for row in rows:
        steps = int(row["timesteps"])
        learn_s += (steps - previous) / float(row["steps_per_s"])
        previous = steps
    return {"wall_s": wall_s, "steps_per_s": previous / learn_s, "steps": previous}


def run_plain_sb3(spec: RunSpec) -> dict[str, float]:
    """The same figures for plain SB3 (make_atari_env + VecFrameStack + PPO.learn)."""
    from stable_baselines3.common.env_util import make_atari_env
    from stable_baselines3.common.vec_env import SubprocVecEnv, VecFrameStack

    start = time.perf_counter()
    env = VecFrameStack(make_atari_env(spec.env_id, n_envs=spec.n_envs, seed=spec.seed,
                                       vec_env_cls=SubprocVecEnv), n_stack=4)
    model = new_ppo(spec, env)
    learn_start = time.perf_counter()
    model.learn(spec.total_timesteps)
    learn_s = time.perf_counter() - learn_start
    env.close()
    return {"wall_s": time.perf_counter() - start,
            "steps_per_s": model.num_timesteps / learn_s, "steps": model.num_timesteps}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    spec = PAPER.replace(game=args.game, attn=args.attn, n_envs=args.envs, device=args.device,
                         torch_threads=args.threads,
                         batch_size=min(PAPER.batch_size, args.envs * PAPER.n_steps))
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"{spec.game} {spec.attn}, {spec.n_envs} envs x {spec.n_steps} steps, batch "
          f"{spec.batch_size}, {spec.n_epochs} epochs; device {device} ({gpu}); "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    minimum = 2 * spec.rollout_size
    loops: list[tuple[str, Any, int]] = [
        ("reference", loop_reference, args.ref_steps),
        ("fast", loop_fast, args.fast_steps)]
    if device == "cuda":
        loops.append(("fast+graphs", lambda s, n: loop_fast(s, n, cuda_graphs=True),
                      args.fast_steps))
    results = []
    for name, runner, steps in loops:
        start = time.perf_counter()
        timings = runner(spec, max(steps, minimum))
        results.append(loop_figures(name, timings, spec, time.perf_counter() - start))
        print(f"  {name}: done in {results[-1]['wall_s']:.1f} s", flush=True)
    print(f"{'loop':<12} {'steps/s':>9} {'rollout s':>10} {'update s':>9} "
          f"{'ms/vec step':>11} {'update %':>9} {'iters':>6}")
    for r in results:
        print(f"{r['setup']:<12} {r['steps_per_s']:>9.0f} {r['rollout_s']:>10.3f} "
              f"{r['update_s']:>9.3f} {r['rollout_ms_per_vector_step']:>11.2f} "
              f"{100 * r['update_share']:>8.0f}% {r['iterations']:>6}")
    reference_rate = results[0]["steps_per_s"]
    for r in results[1:]:
        print(f"{r['setup']} / reference: {r['steps_per_s'] / reference_rate:.2f}x "
              f"(per {spec.rollout_size} agent steps: rollout + update)")
    workers: dict[str, dict[str, float]] = {}
    if args.worker:
        steps = max(args.worker_steps, minimum)
        workers["worker sb3"] = run_worker(worker_spec(spec, steps, "sb3"))
        workers["worker fast"] = run_worker(worker_spec(spec, steps, "fast"))
        workers["plain SB3"] = run_plain_sb3(worker_spec(spec, steps, "sb3"))
        print(f"{'whole run':<12} {'steps':>7} {'wall s':>8} {'train steps/s':>14}")
        for name, w in workers.items():
            print(f"{name:<12} {w['steps']:>7} {w['wall_s']:>8.1f} {w['steps_per_s']:>14.1f}")
        print(f"worker sb3 / plain SB3 training rate: "
              f"{workers['worker sb3']['steps_per_s'] / workers['plain SB3']['steps_per_s']:.2f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": device, "gpu": gpu, "loops": results, "workers": workers},
                      handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
