"""On a CUDA device: the fast engine's CUDA graphs compute what its eager bodies compute.

Needs a GPU (it exits 2 without one); the bodies themselves are tested eagerly on the CPU in
tests/test_fast_engine.py. From one rollout of Breakout (paper settings, 16 envs):

1. update: two engines with the same weights, Adam state, rollout and minibatch order; two
   updates eagerly and two as a graph (the first captures it): weights and statistics agree;
2. advance: the same staged frames and flags recorded and stacked eagerly and by the graph,
   twice: buffers and frame stacks are identical;
3. act: the graph's values and log-probabilities are the policy's own on the same stacks;
4. profile: torch profiler tables of one whole rollout (games included), eager and graph;
5. cost: CUDA launches per vector step and per update (torch profiler: cudaLaunchKernel,
   cudaGraphLaunch), host syncs inside the update's minibatches, seconds per update.

Prints one line per check and PASS or FAIL; exit 1 on any failure.

    python benchmarks/graphs_check.py [--game Breakout] [--attn NA]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from typing import Any

import numpy as np
import torch
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import configure

from agents.fast.ale_env import AtariVectorSource
from agents.fast.engine import FastPPO, policy_outputs
from agents.spec import PAPER
from agents.train import new_ppo

failures: list[str] = []


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'PASS' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
    if not ok:
        failures.append(name)


class Nothing(BaseCallback):
    def _on_step(self) -> bool:
        return True


def twin(model: Any, spec: Any, env: Any) -> Any:
    """A second PPO with the same weights and optimizer state (copied, not shared)."""
    other = new_ppo(spec, env)
    other.policy.load_state_dict(model.policy.state_dict())
    other.policy.optimizer.load_state_dict(copy.deepcopy(model.policy.optimizer.state_dict()))
    other.set_logger(configure(None, []))
    other._current_progress_remaining = model._current_progress_remaining
    return other


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def launches(fn: Any) -> dict[str, int]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = ("cudaLaunchKernel", "cudaGraphLaunch", "cudaMemcpyAsync")
    return {n: sum(1 for e in prof.events() if e.name == n) for n in names}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--game", default="Breakout")
    parser.add_argument("--attn", default="NA")
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="check this script on the CPU: the 'graph' engine runs eagerly")
    args = parser.parse_args(argv)
    dry = args.cpu_dry_run
    if not dry and not torch.cuda.is_available():
        print("graphs_check: no CUDA device here; the graphs run on a GPU only")
        return 2
    spec = PAPER.replace(game=args.game, attn=args.attn, engine="fast",
                         env_backend="ale_vector", device="cpu" if dry else "cuda")
    source = AtariVectorSource(spec)
    model = new_ppo(spec, source.stand_in())
    eager = FastPPO(model, source, cuda_graphs=False)
    eager.learn(2 * spec.rollout_size, callback=Nothing())  # a real rollout in the buffer
    n = eager.size

    # 1. update (at 90% progress remaining: learn() ended at 0, where lr and clip range are 0)
    model._current_progress_remaining = 0.9
    before = [p.detach().clone() for p in model.policy.parameters()]
    other = twin(model, spec, source.stand_in())
    graphs = FastPPO(other, None, cuda_graphs=not dry)
    graphs.load_rollout(eager.obs[:n], eager.actions[:n], eager.values[:n],
                        eager.log_probs[:n], eager.advantages, eager.returns)
    model.set_logger(configure(None, []))
    stats = []
    for engine, ppo in ((eager, model), (graphs, other)):
        logged = []
        for seed in (1, 2):
            np.random.seed(seed)
            engine.train()
            logged.append(dict(ppo.logger.name_to_value))
        stats.append(logged)
    worst = max(float((a.detach() - b).abs().max()) for a, b in
                zip(model.policy.parameters(), [q.detach() for q in other.policy.parameters()],
                    strict=True))
    moved = max(float((a.detach() - b).abs().max()) for a, b in
                zip(model.policy.parameters(), before, strict=True))
    check("update: the updates moved the weights", moved > 1e-6, f"by up to {moved:.2e}")
    check("update: weights after two updates, eager vs graph", worst < 1e-4,
          f"largest difference {worst:.2e}")
    keys = ("train/loss", "train/approx_kl", "train/clip_fraction", "train/value_loss")
    agree = all(abs(stats[0][i][k] - stats[1][i][k]) <= 1e-3 * max(1.0, abs(stats[0][i][k]))
                for i in range(2) for k in keys)
    check("update: logged statistics, eager vs graph", agree,
          ", ".join(f"{k.split('/')[1]} {stats[0][1][k]:.4g}/{stats[1][1][k]:.4g}" for k in keys))
    steps = {float(s["step"]) for s in other.policy.optimizer.state.values()}
    check("update: torch's Adam step counts advanced", steps == {
        float(s["step"]) for s in model.policy.optimizer.state.values()}, f"{steps}")

    # 2. advance (load_state_dict copies in place: the graph's weights keep their addresses)
    graphs.policy.load_state_dict(model.policy.state_dict())
    rng = np.random.default_rng(0)
    for round_ in range(2):
        staged = torch.from_numpy(rng.integers(0, 256, tuple(eager.staged.shape), np.uint8))
        fb = eager._frame_bytes
        staged[:, fb:] = 0
        staged[:, fb + 1] = torch.from_numpy(rng.random(spec.n_envs) < 0.8)  # record
        staged[:, fb + 2] = torch.from_numpy(rng.integers(0, spec.n_steps, spec.n_envs))
        staged[:, fb] = torch.from_numpy(rng.random(spec.n_envs) < 0.2)  # fresh
        staged[:, fb + 5] = torch.from_numpy(rng.random(spec.n_envs) < 0.3)  # filled
        eager._act_body()  # the same policy outputs in both (sampling draws differ)
        for engine in (eager, graphs):
            engine.staged.copy_(staged)
            if round_ == 0:
                engine.stack.copy_(eager.stack)
                engine.last_stack.copy_(eager.last_stack)
            for key in ("step_actions", "step_values", "step_log_probs"):
                getattr(engine, key).copy_(getattr(eager, key))
        eager._advance(bootstrap=False)
        graphs._advance(bootstrap=False)
        same = all(torch.equal(getattr(eager, k)[:n], getattr(graphs, k)[:n]) for k in
                   ("obs", "actions", "values", "log_probs"))
        same = same and all(torch.equal(getattr(eager, k), getattr(graphs, k))
                            for k in ("stack", "last_stack"))
        check(f"advance {round_ + 1}: buffers and stacks, eager vs graph", same)

    # 3. act
    graphs._act()
    sync()
    with torch.no_grad():
        log_probs, values = policy_outputs(graphs.policy, graphs.stack)
    chosen = log_probs.gather(1, graphs.step_actions[:, None]).squeeze(1)
    check("act: graph values and log-probs are the policy's",
          torch.allclose(values, graphs.step_values, atol=1e-5)
          and torch.allclose(chosen, graphs.step_log_probs, atol=1e-5))

    # 4. where a rollout's time goes: torch profiler over one whole rollout, games included
    activities = [torch.profiler.ProfilerActivity.CPU]
    if not dry:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    for name, use_graphs in (("eager", False), ("graph", not dry)):
        engine = FastPPO(model, source, cuda_graphs=use_graphs)
        callback = Nothing()
        callback.init_callback(model)
        engine.start(seed=0)
        engine.collect_rollout(callback)  # warm-up (and the captures)
        with torch.profiler.profile(activities=activities) as prof:
            engine.collect_rollout(callback)
            sync()
        print(f"profile of one rollout, {name} (top 12 by self CPU time):")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    if dry:
        source.close()
        print("graphs_check (CPU dry run):", "all passed" if not failures else f"FAILED {failures}")
        return 1 if failures else 0

    # 5. cost
    def one_step(engine: FastPPO) -> None:
        engine._act()
        engine._advance(bootstrap=False)

    for name, engine in (("eager", eager), ("graph", graphs)):
        print(f"launches per vector step, {name}: {launches(lambda e=engine: one_step(e))}")
        print(f"launches per update, {name}: {launches(engine.train)}")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        eager.train()
    ranges = [e.time_range for e in prof.events() if e.name == "satrl::minibatch"]
    syncs = [e.time_range for e in prof.events()
             if e.name in ("aten::item", "aten::_local_scalar_dense")]
    inside = sum(1 for s in syncs if any(r.start <= s.start and s.end <= r.end for r in ranges))
    check("no host sync inside the eager update's minibatches", inside == 0 and len(ranges) > 0,
          f"{len(ranges)} minibatches, {inside} syncs inside, {len(syncs)} per update")
    for name, engine in (("eager", eager), ("graph", graphs)):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            engine.train()
        torch.cuda.synchronize()
        print(f"update of {n} samples, {name}: {(time.perf_counter() - start) / 10:.4f} s")
    source.close()
    print("graphs_check:", "all passed" if not failures else f"FAILED {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
