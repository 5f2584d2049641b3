#!/usr/bin/env bash
# The fast path's device check, one call on a GPU node (H100/H200, 16 cores), run from the repo
# root with the wheels of stable-baselines3 2.9.2, gymnasium 1.4.0, ale-py 0.12.1 (cp312) and
# farama-notifications in .whl/ (the image has torch, numpy, opencv, tensorboard):
#   1. a 2-rollout smoke test of the fast path on the GPU (fails fast);
#   2. benchmarks/fast_throughput.py: reference and fast path in the same run, paper settings;
#   3. the learning check: Breakout NA, 3 seeds x 1M agent steps on the fast path, in parallel,
#      through the real worker (python -m agents.train), evaluated by the reference protocol
#      (5 full games, stochastic actions) at 500k and 1M steps; summary in learning.txt.
# Results go to $OUT. BUDGET_S bounds the whole script (the workers get SATRL_DEADLINE).
set -u
OUT=${OUT:-/tmp/satrl-gpu-out}
BUDGET_S=${BUDGET_S:-540}
T0=$(date +%s)
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
{ nvidia-smi -L; echo "cores $(nproc)"; python3 -c "import torch, stable_baselines3 as s, \
ale_py, gymnasium as g; print('torch', torch.__version__, 'sb3', s.__version__, 'ale', \
ale_py.__version__, 'gym', g.__version__, torch.cuda.get_device_name(0))"; } \
    2>&1 | tee "$OUT/device.txt" || exit 4

echo "== smoke $(($(date +%s) - T0)) s"
timeout 120 python3 - <<'PY' 2>&1 | grep -v -e "A.L.E" -e Stella | tee "$OUT/smoke.txt"
import time, torch
from stable_baselines3.common.callbacks import BaseCallback
from agents.spec import PAPER
from agents.fast.ale_env import AtariVectorSource
from benchmarks.fast_throughput import build_model
from agents.fast.engine import FastPPO
class N(BaseCallback):
    def _on_step(self): return True
spec = PAPER.replace(game="Breakout", engine="fast", env_backend="ale_vector", device="cuda")
src = AtariVectorSource(spec)
model = build_model(spec, src.stand_in())
eng = FastPPO(model, src)
eng.learn(3 * 2048, callback=N())
print("smoke ok", model.num_timesteps, [(round(a, 3), round(b, 3)) for a, b in eng.timings])
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                        torch.profiler.ProfilerActivity.CUDA]) as prof:
    eng.train()
ranges = [e.time_range for e in prof.events() if e.name == "satrl::minibatch"]
syncs = [e.time_range for e in prof.events() if e.name in ("aten::item", "aten::_local_scalar_dense")]
inside = sum(1 for s in syncs if any(r.start <= s.start and s.end <= r.end for r in ranges))
print(f"profiler on cuda: {len(ranges)} minibatches, host syncs inside {inside}, per update {len(syncs)}")
t = time.perf_counter(); torch.cuda.synchronize()
for _ in range(5): eng.train()
torch.cuda.synchronize(); print(f"update of 2048 samples: {(time.perf_counter() - t) / 5:.4f} s")
src.close()
PY
grep -q "smoke ok" "$OUT/smoke.txt" || exit 5

echo "== benchmark $(($(date +%s) - T0)) s"
timeout 220 python3 benchmarks/fast_throughput.py --device cuda --ref-steps 49152 \
    --fast-steps 163840 --json "$OUT/bench.json" 2>&1 | grep -v -e "A.L.E" -e Stella \
    | tee "$OUT/bench.txt"

echo "== learning $(($(date +%s) - T0)) s"
DEADLINE=$((T0 + BUDGET_S - 25))
python3 - <<'PY'
from pathlib import Path
from agents.rundir import write_run_json
from agents.spec import PAPER
for seed in (0, 1, 10):
    write_run_json(Path(f"/tmp/runs/s{seed}"), PAPER.replace(
        game="Breakout", attn="NA", seed=seed, total_timesteps=1_000_000,
        eval_every_steps=500_000, checkpoint_every_steps=1_000_000, obs_dump_every_steps=0,
        engine="fast", env_backend="ale_vector", device="cuda", torch_threads=2,
        deadline_margin_s=5.0))
PY
for seed in 0 1 10; do
    SATRL_ALE_THREADS=5 SATRL_DEADLINE=$DEADLINE python3 -m agents.train /tmp/runs/s$seed \
        > "/tmp/runs/s$seed.log" 2>&1 &
done
wait
echo "== summary $(($(date +%s) - T0)) s"
python3 - <<'PY' 2>&1 | tee "$OUT/learning.txt"
import csv, json
from pathlib import Path
import numpy as np
finals = {}
for seed in (0, 1, 10):
    run = Path(f"/tmp/runs/s{seed}")
    exit_info = json.loads((run / "exit.json").read_text()) if (run / "exit.json").exists() else {}
    rows = list(csv.DictReader((run / "metrics.csv").open())) if (run / "metrics.csv").exists() else []
    rate = np.mean([float(r["steps_per_s"]) for r in rows[1:]]) if len(rows) > 1 else float("nan")
    print(f"seed {seed}: exit {exit_info.get('reason')} at {exit_info.get('timesteps')} steps, "
          f"{rate:.0f} steps/s (metrics.csv mean), {exit_info.get('message', '')[:120]}")
    if (run / "evaluations.npz").exists():
        with np.load(run / "evaluations.npz") as d:
            for t, res in zip(d["timesteps"], d["results"]):
                print(f"  eval at {t}: {res.tolist()} mean {res.mean():.1f}")
                if t == 1_000_000:
                    finals[seed] = float(res.mean())
    else:
        print("  no evaluations")
    log = Path(f"/tmp/runs/s{seed}.log").read_text().splitlines()
    print("  log tail:", *log[-3:], sep="\n    ")
if len(finals) == 3:
    mean = float(np.mean(list(finals.values())))
    ok = 11.0 <= mean <= 18.4 and min(finals.values()) >= 7
    print(f"Breakout NA at 1M, 3 seeds: mean {mean:.2f} (published range [11.0, 18.4]), "
          f"min seed {min(finals.values()):.1f} (>= 7): {'PASS' if ok else 'FAIL'}")
else:
    print(f"only {len(finals)} of 3 seeds reached 1M steps")
PY
for seed in 0 1 10; do cp /tmp/runs/s$seed/evaluations.npz "$OUT/eval_s$seed.npz" 2>/dev/null; done
echo "== end $(($(date +%s) - T0)) s"
