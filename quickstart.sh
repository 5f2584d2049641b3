#!/usr/bin/env bash
# The main job end to end on the embedded defaults: SQLite registry, local backend, a short study.
# Installs satrl into .venv on first use, then works in ./demo (a satrl workspace).
set -euo pipefail
root="$(cd "$(dirname "$0")" && pwd)"
cd "$root"
if [ ! -x .venv/bin/satrl ]; then
  python3 -m venv .venv
  # torch first and pinned (a CPU wheel on this machine); an unpinned torch pulls a CUDA build.
  .venv/bin/pip install -q torch==2.13.0
  .venv/bin/pip install -q -e ".[dev]"
fi
export PATH="$root/.venv/bin:$PATH"
mkdir -p demo && cd demo
[ -f satrl.toml ] || cat > satrl.toml <<'TOML'
# A satrl workspace: registry in .satrl/satrl.db, results in store/, run directories in runs/.
experiment = "demo"
TOML

# A short study: 2 games x 2 attention types x 1 seed on the smoke preset (minutes on a laptop).
satrl queue --games Pong,Breakout --attn NA,CWCA --seeds 1 --preset smoke
# Train them with the local backend (a detached runner), with a progress display until they end.
satrl dispatch --backend local --wait
satrl status --experiment demo
# Bring checkpoints, metrics and observation dumps into store/, verified, and into the registry.
satrl fetch --all
# The published study, for comparison, when its data lies beside the checkout.
published="$root/../shared/reference/post_processed_results_56.pkl"
if [ -f "$published" ]; then
  satrl import-results "$published" --experiment published
fi
# The paper's tables and figures for this study, from the registry: report/report.html.
compare=()
[ -f "$published" ] && compare=(--compare published)
satrl report --format html --out report --reps 200 "${compare[@]}"
# The text form too (to a file first: `| head` would cut satrl off mid-write, and pipefail fails).
satrl report --reps 200 > report/report.txt
head -40 report/report.txt
satrl sql "SELECT game, attn, seed, ROUND(mean_score, 1) AS mean_score, n_evaluations FROM run_scores WHERE experiment = 'demo'"
echo "report written to $PWD/report"
