"""Agent steps per second of the reference path and the fast path, measured in one run.

Both train the study's PPO (the two-convolution extractor, the paper's hyper-parameters: 16 envs,
rollouts of 16 x 128, 3 epochs of minibatches of 256) on the same game:

- reference: SB3's `PPO.learn` on the worker's training envs (SubprocVecEnv, AtariWrapper,
  VecFrameStack(4), VecTransposeImage: agents.envs.make_train_env) — the paper's stack;
- fast: agents.fast's FastPPO on ale-py's AtariVectorEnv under the same protocol.

Printed per path: agent steps/s over the timed iterations (the first, warm-up iteration is left
out), and the split of each iteration of 2,048 steps into rollout and update seconds. The last
line is the ratio fast / reference. Figures are only comparable within one run.

    python benchmarks/fast_throughput.py [--device auto] [--ref-steps 16384]
        [--fast-steps 32768] [--game Breakout] [--attn NA] [--envs 16] [--threads 0]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import ale_py
import gymnasium as gym
import numpy as np

from agents.spec import PAPER, RunSpec

# SubprocVecEnv's forkserver workers re-import this module: they need ale-py's ids.
gym.register_envs(ale_py)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ref-steps", type=int, default=16_384, help="reference path steps")
    parser.add_argument("--fast-steps", type=int, default=32_768, help="fast path steps")
    parser.add_argument("--envs", type=int, default=PAPER.n_envs)
    parser.add_argument("--game", default="Breakout")
    parser.add_argument("--attn", default="NA")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    return parser.parse_args(argv)


def build_model(spec: RunSpec, env: Any) -> Any:
    from stable_baselines3 import PPO
    from stable_baselines3.common.utils import LinearSchedule

    from agents.extractor import policy_kwargs

    return PPO("CnnPolicy", env, learning_rate=LinearSchedule(spec.learning_rate, 0.0, 1.0),
               n_steps=spec.n_steps, batch_size=spec.batch_size, n_epochs=spec.n_epochs,
               gamma=spec.gamma, gae_lambda=spec.gae_lambda,
               clip_range=LinearSchedule(spec.clip_range, 0.0, 1.0), ent_coef=spec.ent_coef,
               vf_coef=spec.vf_coef, max_grad_norm=spec.max_grad_norm,
               policy_kwargs=policy_kwargs(spec.attn), seed=spec.seed, device=spec.device,
               verbose=0)


def run_reference(spec: RunSpec, steps: int) -> list[tuple[float, float]]:
    from stable_baselines3.common.callbacks import BaseCallback

    from agents.envs import make_train_env

    class Split(BaseCallback):
        def __init__(self) -> None:
            super().__init__()
            self.marks: list[tuple[str, float]] = []

        def _on_rollout_start(self) -> None:
            self.marks.append(("start", time.perf_counter()))

        def _on_rollout_end(self) -> None:
            self.marks.append(("end", time.perf_counter()))

        def _on_training_end(self) -> None:
            self.marks.append(("start", time.perf_counter()))

        def _on_step(self) -> bool:
            return True

    env = make_train_env(spec.replace(env_backend="subproc"), None, seed=spec.seed)
    try:
        model = build_model(spec, env)
        split = Split()
        model.learn(steps, callback=split)
    finally:
        env.close()
    times = [t for _, t in split.marks]
    # start, end, start, end, ..., start(training end): rollout = end - start, update = next - end
    return [(times[i + 1] - times[i], times[i + 2] - times[i + 1])
            for i in range(0, len(times) - 2, 2)]


def run_fast(spec: RunSpec, steps: int) -> list[tuple[float, float]]:
    from stable_baselines3.common.callbacks import BaseCallback

    from agents.fast.ale_env import AtariVectorSource
    from agents.fast.engine import FastPPO

    class Nothing(BaseCallback):
        def _on_step(self) -> bool:
            return True

    source = AtariVectorSource(spec.replace(engine="fast", env_backend="ale_vector"))
    try:
        model = build_model(spec, source.stand_in())
        engine = FastPPO(model, source)
        engine.learn(steps, callback=Nothing())
    finally:
        source.close()
    return engine.timings


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    spec = PAPER.replace(game=args.game, attn=args.attn, n_envs=args.envs, device=args.device)
    rollout = spec.n_envs * spec.n_steps
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"{spec.game} {spec.attn}, {spec.n_envs} envs x {spec.n_steps} steps, batch "
          f"{spec.batch_size}, {spec.n_epochs} epochs; device {device} ({gpu}); "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    results = []
    for name, runner, steps in (("reference", run_reference, args.ref_steps),
                                ("fast", run_fast, args.fast_steps)):
        start = time.perf_counter()
        timings = runner(spec, max(steps, 2 * rollout))
        wall = time.perf_counter() - start
        timed = timings[1:] if len(timings) > 1 else timings
        rollout_s = float(np.mean([t[0] for t in timed]))
        update_s = float(np.mean([t[1] for t in timed]))
        results.append({
            "path": name, "iterations": len(timed), "wall_s": wall,
            "steps_per_s": rollout / (rollout_s + update_s), "rollout_s": rollout_s,
            "update_s": update_s, "rollout_ms_per_vector_step": 1000 * rollout_s / spec.n_steps,
            "update_share": update_s / (rollout_s + update_s),
        })
        print(f"  {name}: done in {wall:.1f} s", flush=True)
    print(f"{'path':<10} {'steps/s':>9} {'rollout s':>10} {'update s':>9} "
          f"{'ms/vec step':>11} {'update %':>9} {'iters':>6}")
    for r in results:
        print(f"{r['path']:<10} {r['steps_per_s']:>9.0f} {r['rollout_s']:>10.3f} "
              f"{r['update_s']:>9.3f} {r['rollout_ms_per_vector_step']:>11.2f} "
              f"{100 * r['update_share']:>8.0f}% {r['iterations']:>6}")
    ratio = results[1]["steps_per_s"] / results[0]["steps_per_s"]
    print(f"fast / reference: {ratio:.2f}x (per {rollout} agent steps: rollout + update)")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": device, "gpu": gpu, "results": results, "ratio": ratio},
                      handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
