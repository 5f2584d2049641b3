#!/usr/bin/env bash
# The fast path's device checks, prepared to run on a GPU node (H100/H200, 16 cores) from the
# repo root, in two calls of at most 10 minutes each on the same warm machine:
#
#   bash benchmarks/gpu_check.sh bench   # 1. CUDA graphs == eager (benchmarks/graphs_check.py)
#                                        # 2. benchmarks/worker_throughput.py: reference, fast
#                                        #    and fast+graphs loops in the same run, paper
#                                        #    settings, 16 envs (about 4 minutes)
#   bash benchmarks/gpu_check.sh learn   # 3. benchmarks/learning_check.py: Breakout NA, 3 seeds
#                                        #    x 1M steps on the fast path (with CUDA graphs
#                                        #    unless LEARN_GRAPHS=0), in parallel, evaluated by the
#                                        #    reference protocol at 500k and 1M steps
#
# The GPU image has torch, numpy, opencv and tensorboard; the rest travels as cp312 wheels in the
# git-ignored .whl/ (carry it): stable-baselines3 2.9.2, gymnasium 1.4.0, ale-py 0.12.1,
# farama-notifications 0.0.4 (see /work/.library/device/README.md for the download command).
# Results go to $OUT; BUDGET_S bounds the whole script.
set -u
MODE=${1:-bench}
OUT=${OUT:-/tmp/satrl-gpu-out}
BUDGET_S=${BUDGET_S:-560}
T0=$(date +%s)
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
quiet() { grep -v -e "A.L.E" -e Stella; }
{ nvidia-smi -L; echo "cores $(nproc)"; python3 -c "import torch, stable_baselines3 as s, \
ale_py, gymnasium as g; print('torch', torch.__version__, 'sb3', s.__version__, 'ale', \
ale_py.__version__, 'gym', g.__version__, torch.cuda.get_device_name(0))"; } \
    2>&1 | tee "$OUT/device.txt" || exit 4

if [ "$MODE" = bench ]; then
    echo "== graphs check $(($(date +%s) - T0)) s"
    timeout 180 python3 benchmarks/graphs_check.py 2>&1 | quiet | tee "$OUT/graphs.txt"
    echo "== throughput $(($(date +%s) - T0)) s"
    timeout $((BUDGET_S - ($(date +%s) - T0) - 10)) python3 benchmarks/worker_throughput.py \
        --device cuda --ref-steps 49152 --fast-steps 163840 --json "$OUT/throughput.json" \
        2>&1 | quiet | tee "$OUT/throughput.txt"
elif [ "$MODE" = learn ]; then
    echo "== learning check $(($(date +%s) - T0)) s"
    GRAPHS=--cuda-graphs; [ "${LEARN_GRAPHS:-1}" = 0 ] && GRAPHS=
    python3 benchmarks/learning_check.py $GRAPHS \
        --out /tmp/learning --device cuda --parallel 3 --torch-threads 2 --ale-threads 5 \
        --deadline-s $((BUDGET_S - ($(date +%s) - T0) - 40)) 2>&1 | quiet \
        | tee "$OUT/learning.txt"
    for seed in 0 1 10; do
        cp "/tmp/learning/seed$seed/metrics.csv" "$OUT/metrics_s$seed.csv" 2>/dev/null
        tail -5 "/tmp/learning/seed$seed.log" > "$OUT/log_s$seed.txt" 2>/dev/null
    done
else
    echo "usage: gpu_check.sh bench|learn" >&2; exit 2
fi
echo "== end $(($(date +%s) - T0)) s"
