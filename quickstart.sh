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
satrl status
satrl sql "SELECT game, attn, seed, state FROM runs ORDER BY game, attn"
